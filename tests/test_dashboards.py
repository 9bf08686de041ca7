"""The generated Grafana dashboards: structure, PromQL, links, and reproducibility.

Reads the committed JSON in dashboards/json/ (what Grafana loads) and checks it against
the rules docs/dashboards.md promises: panels fit the 24-column grid without overlap, ids
and refIds are unique, every target is on ``${datasource}``, every panel says what it
shows (description) and in what unit; every PromQL expression parses once Grafana's
variables are substituted and reads only metrics an exporter emits or a recording rule
defines (tests/promql_names.py, shared with the rule lint); dashboards link to each other
and problems to runbooks; and the committed JSON is exactly what a fresh build writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from dashboards import cli
from tests.conftest import REPO
from tests.promql_names import known_names, selector_name, selectors, vector_selectors

JSON_DIR = REPO / "dashboards" / "json"
FILES = sorted(JSON_DIR.glob("*.json"))
DASHBOARDS = {p.name: json.loads(p.read_text()) for p in FILES}
RUNBOOKS = REPO / "alerts" / "runbooks"
RUNBOOK_PATTERN = "https://github.com/gpufleet/gpufleet/blob/main/alerts/runbooks/${__data.fields.alertname}.md"
EXPECTED = {"gpufleet-fleet-overview", "gpufleet-node", "gpufleet-job", "gpufleet-fabric", "gpufleet-storage",
            "gpufleet-remediation", "gpufleet-usage"}

# Values Grafana would put in for its own variables and ours (any valid value will do:
# the point is that the expression parses as PromQL once substituted).
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "30s", "__range": "6h", "__range_s": "21600",
                "__range_ms": "21600000", "__interval_ms": "30000"}
OUR_VARS = {"cluster": "demo", "partition": "gpu", "node": "gpu-node-1", "gpu": "0", "job": "1234"}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, and panels nested in collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def visual(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(dash) if p["type"] != "row"]


def substitute(expr: str, variables: set[str]) -> str:
    def repl(m: re.Match) -> str:
        name = m[1] or m[2]
        if name in GRAFANA_VARS:
            return GRAFANA_VARS[name]
        assert name in variables, f"${name} is not a variable of this dashboard"
        return OUR_VARS[name]

    return VAR_RE.sub(repl, expr)


def all_exprs() -> list[tuple[str, str, str, str]]:
    """(file, panel title, refId, expression) of every target."""
    out = []
    for name, dash in DASHBOARDS.items():
        for p in visual(dash):
            for t in p.get("targets", []):
                out.append((name, p["title"], t["refId"], t["expr"]))
    return out


def variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


EXPRS = all_exprs()
KNOWN = known_names(alerts=True)


# ---- the set of dashboards ------------------------------------------------------------------

def test_every_dashboard_of_the_issue_is_built_with_a_stable_prefixed_uid():
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert sorted(uids) == sorted(EXPECTED)
    for name, dash in DASHBOARDS.items():
        assert name == dash["uid"].removeprefix("gpufleet-") + ".json"
        assert "gpufleet" in dash["tags"] and len(dash["tags"]) >= 2
        assert dash["title"].startswith("gpufleet / ") and dash["description"]
        assert dash["schemaVersion"] >= 36, "panels use the timeseries/stat/table schema of Grafana 9+"


def test_committed_json_equals_a_fresh_build():
    assert cli.stale() == [], "run `gpufleet dashboards build` and commit dashboards/json/"


def test_build_is_deterministic_and_check_reports_stale_missing_and_unexpected_files(tmp_path, capsys):
    first = cli.rendered()
    assert first == cli.rendered()
    assert cli.main(["build", "--out", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.glob("*.json")} == first
    assert cli.main(["build", "--check", "--out", str(tmp_path)]) == 0

    victim = tmp_path / "node.json"
    victim.write_text(victim.read_text().replace("gpufleet / Node", "gpufleet / Nod"))
    (tmp_path / "fabric.json").unlink()
    (tmp_path / "old-dashboard.json").write_text("{}")
    capsys.readouterr()
    assert cli.main(["build", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "node.json: differs" in err and "fabric.json: missing" in err and "old-dashboard.json: no dashboard" in err

    assert cli.main(["build", "--out", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.glob("*.json")} == first


def test_umbrella_cli_runs_the_check():
    from remediation import cli as umbrella

    assert umbrella.main(["dashboards", "build", "--check"]) == 0


# ---- structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panel_ids_and_ref_ids_are_unique(name):
    dash = DASHBOARDS[name]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for p in visual(dash):
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panel_titles_are_unique_within_a_dashboard(name):
    titles = [p["title"] for p in visual(DASHBOARDS[name])]
    assert len(titles) == len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_fit_the_24_column_grid_without_overlap(name):
    cells: dict[tuple[int, int], str] = {}
    for p in panels(DASHBOARDS[name]):
        gp = p["gridPos"]
        assert gp["w"] > 0 and gp["h"] > 0 and gp["x"] >= 0 and gp["y"] >= 0, p["title"]
        assert gp["x"] + gp["w"] <= 24, f"{p['title']} leaves the grid: {gp}"
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]} at {(x, y)}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_target_and_panel_uses_the_datasource_variable(name):
    dash = DASHBOARDS[name]
    ds = variables(dash)["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, var["name"]
    for p in visual(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (p["title"], t["refId"])


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_has_a_description_and_a_unit(name):
    for p in visual(DASHBOARDS[name]):
        assert len(p.get("description", "")) >= 20, f"{p['title']}: say what it shows and why"
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert p["title"]


def test_stat_panels_have_thresholds_and_the_fleet_first_row_answers_what_is_broken():
    for dash in DASHBOARDS.values():
        for p in visual(dash):
            if p["type"] == "stat":
                assert p["fieldConfig"]["defaults"]["thresholds"]["steps"], p["title"]
    fleet = DASHBOARDS["fleet-overview.json"]
    first_row = [p for p in visual(fleet) if p["gridPos"]["y"] < 9]
    assert first_row and all(p["type"] == "stat" for p in first_row)
    titles = " ".join(p["title"] for p in first_row).lower()
    for words in ("healthy", "critical", "out of service", "drained", "idle", "power"):
        assert words in titles, words
    # A red step: these are alarms, not decoration.
    assert any(s["color"] == "red" for p in first_row for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"])


# ---- PromQL ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "title", "ref", "expr"), EXPRS, ids=[f"{n}:{t}:{r}" for n, t, r, _ in EXPRS])
def test_every_expression_parses_and_reads_only_known_metrics(name, title, ref, expr):
    text = substitute(expr, set(variables(DASHBOARDS[name])))
    parsed = promql_parser.parse(text)
    names = selectors(parsed)
    assert names, "an expression that reads no metric"
    unknown = names - KNOWN
    assert not unknown, f"metrics no exporter emits and no rule records: {unknown}"


def test_aggregations_by_node_keep_the_cluster():
    """sum by (node) over several clusters would add up two clusters' gpu-node-1."""
    offenders = [f"{name}: {title} [{ref}]" for name, title, ref, expr in EXPRS
                 if re.search(r"\b(by|on)\s*\((?![^)]*\bcluster\b)[^)]*\bnode\b", expr)]
    assert not offenders, "aggregations or joins by node without cluster:\n" + "\n".join(offenders)


def test_every_selector_filters_on_the_cluster_variable():
    """One Prometheus may hold several clusters with the same node names: a selector without
    cluster=~"$cluster" mixes them (the knobs are fleet-wide and read through scalar())."""
    missing = []
    for name, title, ref, expr in EXPRS:
        for sel in vector_selectors(promql_parser.parse(substitute(expr, set(variables(DASHBOARDS[name]))))):
            if selector_name(sel).startswith("gpufleet:config:"):
                continue
            if not any(m.name == "cluster" for m in sel.matchers.matchers):
                missing.append(f"{name}: {title} [{ref}]: {selector_name(sel)}")
    assert not missing, "selectors without a cluster matcher:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_template_variables_query_known_metrics_and_chain(name):
    dash = DASHBOARDS[name]
    defined = list(variables(dash))
    assert defined[0] == "datasource" and "cluster" in defined
    for i, var in enumerate(dash["templating"]["list"]):
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
        assert m, var["query"]
        used = {a or b for a, b in VAR_RE.findall(m[1])}
        assert used <= set(defined[:i]), f"{var['name']} uses a variable defined after it: {used}"
        names = selectors(promql_parser.parse(substitute(m[1], set(defined))))
        assert names <= KNOWN, names
        if var["includeAll"]:
            assert var["allValue"] == ".*", "All must be a regex matching every value"


def test_the_variables_the_issue_asks_for_exist_where_they_help():
    assert {"datasource", "cluster", "partition", "node"} <= set(variables(DASHBOARDS["fleet-overview.json"]))
    assert {"datasource", "cluster", "node", "gpu"} <= set(variables(DASHBOARDS["node.json"]))
    assert {"datasource", "cluster", "partition", "job"} <= set(variables(DASHBOARDS["job.json"]))
    # Chained: the node list follows the partition, the GPU list the node, the job list the partition.
    assert "$partition" in variables(DASHBOARDS["fleet-overview.json"])["node"]["query"]
    assert "$node" in variables(DASHBOARDS["node.json"])["gpu"]["query"]
    assert "$partition" in variables(DASHBOARDS["job.json"])["job"]["query"]


def test_job_gpus_are_found_by_joining_gpu_job_info_not_by_a_job_label_on_gpu_series():
    for _, _, _, expr in (e for e in EXPRS if e[0] == "job.json"):
        parsed_names = selectors(promql_parser.parse(substitute(expr, set(OUR_VARS))))
        if parsed_names & {"gpu_utilization_ratio", "gpu_sm_active_ratio", "gpu_memory_used_bytes"}:
            assert "gpu_job_info" in parsed_names and "group_left" in expr, expr


# ---- links ----------------------------------------------------------------------------------

def data_links(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, field, url) of every field data link."""
    out = []
    for p in visual(dash):
        for o in p["fieldConfig"].get("overrides", []):
            for prop in o["properties"]:
                if prop["id"] == "links":
                    out += [(p["title"], o["matcher"]["options"], link["url"]) for link in prop["value"]]
    return out


def test_problem_tables_link_alerts_to_their_runbooks():
    linked = 0
    for dash in DASHBOARDS.values():
        for p in visual(dash):
            if any("ALERTS" in t["expr"] for t in p["targets"]) and p["type"] == "table":
                links = {f: u for t, f, u in data_links(dash) if t == p["title"]}
                assert links.get("alertname") == RUNBOOK_PATTERN, p["title"]
                linked += 1
    assert linked >= 3
    # Every alert the rules define has the runbook the pattern points to.
    from tests.test_alert_rules import ALERTS

    for _, rule in ALERTS:
        assert (RUNBOOKS / f"{rule['alert']}.md").is_file()


def test_fleet_links_to_node_and_node_and_fleet_link_to_job_with_variables():
    uids = {d["uid"] for d in DASHBOARDS.values()}
    for dash in DASHBOARDS.values():
        for _, field, url in data_links(dash):
            if url.startswith("/d/"):
                uid = url[3:].split("?")[0]
                assert uid in uids, url
                var = {"gpufleet-node": "var-node", "gpufleet-job": "var-job"}[uid]
                assert f"{var}=${{__data.fields.{field}}}" in url and "var-datasource=${datasource}" in url
        for link in dash["links"]:
            assert link["url"].removeprefix("/d/") in uids and link["keepTime"] and link["includeVars"]
    fleet, node = DASHBOARDS["fleet-overview.json"], DASHBOARDS["node.json"]
    assert any("/d/gpufleet-node?" in u and f == "node" for _, f, u in data_links(fleet))
    assert any("/d/gpufleet-job?" in u and f == "job_id" for _, f, u in data_links(fleet))
    assert any("/d/gpufleet-job?" in u and f == "job_id" for _, f, u in data_links(node))
    linked_to = {link["url"] for d in DASHBOARDS.values() for link in d["links"]}
    assert {f"/d/{u}" for u in uids} <= linked_to, "every dashboard is reachable from another"


def test_json_files_are_what_grafana_provisioning_reads():
    for path in FILES:
        text = path.read_text()
        assert text.endswith("\n") and json.loads(text)["uid"]
        assert '"id": null' not in text and "__inputs" not in text, "provisioned dashboards need no import inputs"
    assert Path(JSON_DIR).is_dir()
