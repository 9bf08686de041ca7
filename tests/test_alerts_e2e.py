"""End to end: a fault injected into a node agent reaches a real Alertmanager, labelled.

The chain is the production one: the simulator-backed node agent (``--gpu.backend=sim``)
is scraped by a real Prometheus as target ``node="gpu-node-3"``; Prometheus evaluates
every file in alerts/rules/ and sends to a real Alertmanager running the routes and
inhibitions of alerts/alertmanager.yml, whose webhooks go to an in-test sink.

What the test changes for speed, in its own copies only: every rule group is evaluated
each second (the global interval; a group's ``interval:`` is dropped), and the ``for:``
of the alert under test is cut to a few seconds when it is longer than MAX_FOR. The
rules' timing is pinned by the promtool unit tests (alerts/tests/); this test pins the
plumbing: rules load, expressions see the agent's series, labels survive to Alertmanager
and the webhook. The alerts are found by reading the rule files, so the test follows the
rules as they are written, and skips (naming what is missing) only while no rule for the
fault exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import yaml

from exporters.agent import Exporter, build_parser
from tests.conftest import REPO, SimState, need_binary, parse, wait_for
from tests.promstack import Alertmanager, Prometheus, WebhookSink, alertmanager_config_for_test

pytestmark = pytest.mark.integration

RULES_DIR = REPO / "alerts" / "rules"
NODE = "gpu-node-3"
TOKEN = "e2e-token"
MAX_FOR = 30.0  # seconds: a longer `for:` on the alert under test is shortened to SHORT_FOR
SHORT_FOR = "5s"
SLACK = 30.0  # scrape + evaluation + delivery, generously


# --- reading the rules -----------------------------------------------------------------


def parse_duration(text: str | None) -> float:
    """Prometheus duration ('90s', '1m30s', '2h') -> seconds; None/'' -> 0."""
    if not text:
        return 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def alerting_rules() -> list[dict[str, Any]]:
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    out.append({**rule, "_file": path.name})
    return out


def find_rule(name: str, matches) -> dict[str, Any] | None:
    """The rule called ``name``, else the first whose expression ``matches``."""
    rules = alerting_rules()
    return (next((r for r in rules if r["alert"] == name), None)
            or next((r for r in rules if matches(str(r["expr"]))), None))


def xid_reboot_rule() -> dict[str, Any] | None:
    return find_rule("GpuXidRebootRequired", lambda e: "gpu_xid_errors_total" in e
                     and re.search(r'class\s*=~?\s*"[^"]*reboot', e) is not None)


def gpu_lost_rule() -> dict[str, Any] | None:
    return find_rule("GpuLost", lambda e: re.search(r"\bgpu_up\b", e) is not None
                     and re.search(r"(==\s*0|<\s*1)(?![\d.])", e) is not None)


def rules_for_test(dest: Path, alert_names: set[str]) -> tuple[list[Path], dict[str, str]]:
    """Copies of alerts/rules/*.yml, every group at the global interval; long `for:` cut."""
    dest.mkdir(parents=True, exist_ok=True)
    files, shortened = [], {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []):
            group.pop("interval", None)
            for rule in group.get("rules", []):
                if rule.get("alert") in alert_names and parse_duration(rule.get("for")) > MAX_FOR:
                    shortened[rule["alert"]] = f"{rule['for']} -> {SHORT_FOR}"
                    rule["for"] = SHORT_FOR
        (dest / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(dest / path.name)
    return files, shortened


# --- the stack -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus_bin = need_binary("prometheus")
    alertmanager_bin = need_binary("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("e2e")
    state = SimState(tmp / "state.yaml")
    args = build_parser().parse_args(["--gpu.backend=sim", f"--sim.state-file={state.path}",
                                      "--web.listen-address=127.0.0.1:0", "--collector.interval=0.5s",
                                      "--gpu.expected-count=8"])
    agent = Exporter(args)
    sink = WebhookSink()
    am = prom = None
    try:
        agent.start()
        host, port = agent.server.server_address[:2]
        token = tmp / "remediation-webhook-token"
        token.write_text(TOKEN + "\n")
        am_config = tmp / "alertmanager.yml"
        alertmanager_config_for_test(REPO / "alerts" / "alertmanager.yml", am_config, webhook_base=sink.url,
                                     credentials_file=token,
                                     timings={"group_wait": "1s", "group_interval": "1s"})
        am = Alertmanager(am_config, tmp / "am", binary=alertmanager_bin).start()
        under_test = {r["alert"] for r in (xid_reboot_rule(), gpu_lost_rule()) if r}
        rule_files, shortened = rules_for_test(tmp / "rules", under_test)
        prom = Prometheus(tmp / "prom", binary=prometheus_bin, rule_files=rule_files, alertmanagers=[am.url],
                          scrape_configs=[{"job_name": "gpufleet-exporter",
                                           "static_configs": [{"targets": [f"{host}:{port}"],
                                                               "labels": {"node": NODE}}]}])
        prom.start()
        # Prometheus hands new targets to the scrapers after ~5 s (discovery throttle).
        wait_for(lambda: prom.query(f'up{{job="gpufleet-exporter",node="{NODE}"}} == 1'), timeout=20,
                 interval=0.2)
        yield SimpleNamespace(state=state, agent_url=f"http://{host}:{port}/metrics", am=am, prom=prom,
                              sink=sink, rule_files=rule_files, shortened=shortened)
    finally:
        for server in (prom, am):
            if server is not None:
                server.stop()
        sink.close()
        agent.stop()


def agent_metrics(stack) -> dict:
    return parse(requests.get(stack.agent_url, timeout=5).text)


def gpu_uuid(stack, gpu: int) -> str:
    return next(lab["uuid"] for lab, _ in agent_metrics(stack)["gpu_up"] if lab["gpu"] == str(gpu))


def wait_alert(stack, rule: dict[str, Any], gpu: int) -> dict[str, Any]:
    """The rule's alert for NODE/gpu as Alertmanager holds it (waits `for:` + slack)."""
    name = rule["alert"]
    timeout = min(parse_duration(rule.get("for")), MAX_FOR) + SLACK

    def arrived():
        return next(iter(stack.am.find(alertname=name, node=NODE, gpu=str(gpu))), None)

    try:
        return wait_for(arrived, timeout=timeout, interval=0.25)
    except AssertionError:
        raise AssertionError(
            f"{name} for {NODE} GPU {gpu} did not reach Alertmanager within {timeout}s "
            f"(`for:` shortened in the test's copy: {stack.shortened}); "
            f"Prometheus alerts: {[a['labels'] for a in stack.prom.alerts()]}; "
            f"Alertmanager alerts: {[a['labels'] for a in stack.am.alerts()]}") from None


def check_labels(alert: dict[str, Any], rule: dict[str, Any], gpu: int, uuid: str) -> None:
    labels = alert["labels"]
    assert labels["alertname"] == rule["alert"]
    assert labels["node"] == NODE
    assert labels["gpu"] == str(gpu)
    assert labels["uuid"] == uuid
    for key, val in (rule.get("labels") or {}).items():
        if "{{" not in str(val):
            assert labels.get(key) == str(val), f"{key}: rule says {val!r}, alert has {labels.get(key)!r}"
    assert labels["severity"] == "critical"
    assert labels["domain"] == "gpu"
    assert labels.get("remediation") in ("drain", "reboot"), labels


def check_delivered(stack, alert: dict[str, Any]) -> None:
    """A remediable critical alert goes to the remediation webhook (with the token) and pages."""
    name = alert["labels"]["alertname"]

    def got(path: str):
        return lambda n: n.path == path and any(a["labels"] == alert["labels"] for a in n.body["alerts"])

    hook = stack.sink.wait(got("/gpufleet-remediation"), timeout=20)
    assert hook.headers["Authorization"] == f"Bearer {TOKEN}"
    assert hook.body["version"] == "4" and hook.body["groupLabels"] == {"alertname": name, "node": NODE}
    stack.sink.wait(got("/page"), timeout=20)


# --- tests -----------------------------------------------------------------------------


def test_prometheus_loads_every_rule_file_healthy(stack):
    expected = {}
    for path in stack.rule_files:
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            expected[(path.name, group["name"])] = len(group.get("rules", []))
    assert expected, "alerts/rules/ has no rule groups"

    def evaluated():
        groups = stack.prom.rules()
        rules = [r for g in groups for r in g["rules"]]
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not broken, f"rules failing to evaluate: {broken}"
        return groups if all(r["health"] == "ok" for r in rules) else None

    groups = wait_for(evaluated, timeout=20, interval=0.25)
    loaded = {(Path(g["file"]).name, g["name"]): len(g["rules"]) for g in groups}
    assert loaded == expected


def test_xid_reboot_class_fault_reaches_alertmanager(stack):
    rule = xid_reboot_rule()
    if rule is None:
        pytest.skip("alerts/rules/*.yml defines no reboot-class Xid alert yet "
                    '(GpuXidRebootRequired, on gpu_xid_errors_total{class="reboot"})')
    # Xids raised before the agent registered for NVML events are not delivered (as with NVML).
    wait_for(lambda: any(lab == {"source": "nvml"} and v == 1
                         for lab, v in agent_metrics(stack).get("gpufleet_exporter_xid_source_up", [])))
    uuid = gpu_uuid(stack, 3)
    assert not stack.am.find(alertname=rule["alert"], node=NODE, gpu="3"), "fired before the fault"
    stack.state.gpu(3, xid={"79": 1})  # 79: fallen off the bus, reboot class
    alert = wait_alert(stack, rule, 3)
    check_labels(alert, rule, 3, uuid)
    assert alert["labels"].get("xid", "79") == "79"
    check_delivered(stack, alert)


def test_lost_gpu_reaches_alertmanager_and_mutes_that_gpus_other_alerts(stack):
    rule = gpu_lost_rule()
    if rule is None:
        pytest.skip("alerts/rules/*.yml defines no alert for a lost GPU (gpu_up == 0) yet (GpuLost)")
    # Alertmanager's GpuLost inhibition is keyed on this name.
    assert rule["alert"] == "GpuLost", f"the gpu_up == 0 alert is {rule['alert']}; alertmanager.yml expects GpuLost"
    uuid = gpu_uuid(stack, 6)
    stack.state.gpu(6, lost=True)
    alert = wait_alert(stack, rule, 6)
    check_labels(alert, rule, 6, uuid)
    assert alert["status"]["state"] == "active"
    check_delivered(stack, alert)
    # Whatever else fires for that GPU is muted while GpuLost fires (the labels line up).
    def others_muted():
        others = [a for a in stack.am.alerts() if a["labels"].get("node") == NODE
                  and a["labels"].get("gpu") == "6" and a["labels"].get("domain") == "gpu"
                  and a["labels"]["alertname"] != "GpuLost"]
        return all(a["status"]["inhibitedBy"] for a in others) or None

    wait_for(others_muted, timeout=5)
