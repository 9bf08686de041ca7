"""Alert and recording rules: valid, tested, documented, and only about metrics that exist.

Every alert must carry severity, domain, a static summary, a templated description and
a runbook_url whose runbook has the four sections; every metric an expression reads
must be one an exporter emits (the generated catalogue) or a recording rule defines,
checked by parsing the PromQL, not by regexes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml

from exporters import metricsdoc
from tests.conftest import REPO, need_binary
from tests.promql_names import selectors

RULES = sorted((REPO / "alerts" / "rules").glob("*.yml"))
TESTS = sorted((REPO / "alerts" / "tests").glob("*.yml"))
RUNBOOKS = REPO / "alerts" / "runbooks"
RUNBOOK_URL = "https://github.com/gpufleet/gpufleet/blob/main/alerts/runbooks/{}.md"
SECTIONS = ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation")
SEVERITIES = {"critical", "warning", "info"}
DOMAINS = {"gpu", "fabric", "storage", "jobs", "scheduler", "self"}
REMEDIATIONS = {"drain", "reboot"}
# Series Prometheus itself provides for every scrape target.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
RECORDING_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")


def load_rules() -> list[tuple[Path, dict]]:
    out = []
    for path in RULES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                out.append((path, rule))
    return out


ALL = load_rules()
ALERTS = [(p, r) for p, r in ALL if "alert" in r]
RECORDS = [(p, r) for p, r in ALL if "record" in r]


def test_rule_files_exist_for_every_domain():
    assert {p.stem for p in RULES} >= {"config", "gpu", "fabric", "storage", "jobs", "scheduler", "exporters"}


def test_promtool_check_rules():
    promtool = need_binary("promtool")
    proc = subprocess.run([promtool, "check", "rules", *map(str, RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass():
    promtool = need_binary("promtool")
    proc = subprocess.run([promtool, "test", "rules", *map(str, TESTS)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("path", "rule"), ALERTS, ids=[r["alert"] for _, r in ALERTS])
def test_alert_is_labelled_annotated_and_has_a_runbook(path, rule):
    name = rule["alert"]
    labels = rule.get("labels", {})
    ann = rule.get("annotations", {})
    assert labels.get("severity") in SEVERITIES
    assert labels.get("domain") in DOMAINS
    if "remediation" in labels:
        assert labels["remediation"] in REMEDIATIONS
        assert labels["severity"] == "critical", "only critical alerts may act on nodes"
    assert ann.get("summary") and "{{" not in ann["summary"], "summary must be static"
    assert "{{" in ann.get("description", ""), "description must name the object and value"
    assert ann.get("runbook_url") == RUNBOOK_URL.format(name)
    runbook = RUNBOOKS / f"{name}.md"
    assert runbook.is_file(), f"missing {runbook}"
    text = runbook.read_text()
    positions = [text.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions), f"{runbook} lacks one of {SECTIONS}"
    assert positions == sorted(positions), f"{runbook}: sections out of order"


@pytest.mark.parametrize(("path", "rule"), RECORDS, ids=[r["record"] for _, r in RECORDS])
def test_recording_rules_follow_level_metric_operations(path, rule):
    assert RECORDING_NAME.match(rule["record"]), rule["record"]


def test_every_metric_in_every_expression_exists():
    known = metricsdoc.all_metric_names() | {r["record"] for _, r in RECORDS} | BUILTIN
    # A counter family is also addressable by its sample name.
    known |= {n + "_total" for n in known if not n.endswith("_total")}
    unknown = {}
    for path, rule in ALL:
        for name in selectors(promql_parser.parse(str(rule["expr"]))):
            if name not in known:
                unknown.setdefault(name, []).append(f"{path.name}:{rule.get('alert') or rule.get('record')}")
    assert not unknown, f"metrics no exporter emits and no rule records: {unknown}"


def test_every_alert_and_recording_rule_is_unit_tested():
    tested_alerts: set[str] = set()
    tested_exprs = ""
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        for case in doc.get("tests", []):
            for a in case.get("alert_rule_test", []):
                if a.get("exp_alerts"):
                    tested_alerts.add(a["alertname"])
            for e in case.get("promql_expr_test", []):
                tested_exprs += " " + e["expr"]
    untested = sorted({r["alert"] for _, r in ALERTS} - tested_alerts)
    assert not untested, f"alerts without a firing test case: {untested}"
    unrecorded = sorted(r["record"] for p, r in RECORDS if p.stem != "config" and r["record"] not in tested_exprs)
    assert not unrecorded, f"recording rules without a promql_expr_test: {unrecorded}"


def test_every_alert_has_a_near_miss_case():
    """A case where the alert's rule is evaluated and must stay silent."""
    quiet: set[str] = set()
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        for case in doc.get("tests", []):
            for a in case.get("alert_rule_test", []):
                if not a.get("exp_alerts"):
                    quiet.add(a["alertname"])
    missing = sorted({r["alert"] for _, r in ALERTS} - quiet)
    assert not missing, f"alerts without a near-miss case: {missing}"


def test_selector_walker_finds_nested_metrics():
    expr = promql_parser.parse(
        'sum by (node) (rate(a_total[5m])) / on(node) group_left count(b{x="1"}) > scalar(c:d:e) '
        "or absent(f) unless max_over_time(g[1h:1m]) and -h"
    )
    assert selectors(expr) == {"a_total", "b", "c:d:e", "f", "g", "h"}
