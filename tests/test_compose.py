"""compose/: the stack a site deploys, checked without a Docker engine.

- docker-compose.yml validates against the Compose Specification's JSON schema
  (tests/data/compose_spec.json, vendored: see tests/data/README.md), and the schema
  does reject a broken file (so the check can fail);
- every image is pinned; every repository path the file mounts or builds from exists;
- ``promtool check config`` accepts compose/prometheus.yml as shipped, and a copy whose
  rule and target globs point at alerts/rules/ and the demo targets (so promtool loads
  and checks every rule file through the config, as the container would);
- Grafana's provisioning names the datasource uid the dashboards use and the directory
  the compose file mounts dashboards/json at.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, need_binary

COMPOSE = REPO / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
SCHEMA = json.loads((REPO / "tests" / "data" / "compose_spec.json").read_text())
_DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def host_path(text: str) -> str:
    """``${VAR:-default}`` interpolated with its default, as compose does with VAR unset."""
    return _DEFAULT.sub(lambda m: m[1], text)


def test_compose_file_matches_the_compose_specification():
    assert errors(compose()) == []


def test_the_schema_rejects_a_broken_compose_file():
    doc = copy.deepcopy(compose())
    doc["services"]["prometheus"]["volume"] = doc["services"]["prometheus"].pop("volumes")  # a typo
    doc["services"]["grafana"]["restart"] = ["always"]  # a list where a string belongs
    found = errors(doc)
    assert any("volume" in e for e in found) and any("restart" in e for e in found), found


def test_every_image_is_pinned():
    for name, svc in compose()["services"].items():
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{name}: {image}"


def test_every_repository_path_the_compose_file_uses_exists():
    doc = compose()
    checked = 0
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            source = host_path(vol.split(":", 1)[0])
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: mounts {source}, missing in the repository"
                checked += 1
        build = svc.get("build")
        if build:
            context = COMPOSE / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build}"
    assert checked >= 8


def test_dockerfile_copies_only_what_exists():
    for line in (COMPOSE / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), line


def test_grafana_provisioning_matches_the_mounts_and_the_dashboards_uid():
    ds = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == "gpufleet-prometheus" and source["name"] == "Prometheus"
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/gpufleet.yml").read_text())["providers"][0]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"../dashboards/json:{provider['options']['path']}:ro" in mounts
    assert compose()["services"]["grafana"]["image"] == "grafana/grafana-oss:11.3.1"


def test_alertmanager_gets_the_token_where_alertmanager_yml_reads_it():
    am = yaml.safe_load((REPO / "alerts" / "alertmanager.yml").read_text())
    (receiver,) = [r for r in am["receivers"] if r["name"] == "gpufleet-remediation"]
    path = receiver["webhook_configs"][0]["http_config"]["authorization"]["credentials_file"]
    targets = [s["target"] for s in compose()["services"]["alertmanager"]["secrets"] if isinstance(s, dict)]
    assert path in targets
    url = receiver["webhook_configs"][0]["url"]
    listen = next(a for a in compose()["services"]["remediation"]["command"] if a.startswith("--web.listen-address"))
    assert url == f"http://{listen.split('=', 1)[1]}/alerts"


def promtool(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.integration
def test_promtool_accepts_the_prometheus_config():
    proc = promtool(COMPOSE / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
def test_promtool_accepts_the_config_with_the_rules_it_mounts(tmp_path):
    """The container's paths mapped back to the repository: promtool checks each rule file."""
    cfg = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(REPO / "alerts" / "rules" / "*.yml")]
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [f.replace("/etc/prometheus/targets", str(COMPOSE / "targets-demo")) for f in sd["files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = promtool(path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rule_files = sorted((REPO / "alerts" / "rules").glob("*.yml"))
    for rf in rule_files:
        assert f"Checking {rf}" in out and "SUCCESS" in out.split(f"Checking {rf}", 1)[1].split("\n", 2)[1], out
    # And a broken rule is caught through the config (the check can fail).
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(\n")
    cfg["rule_files"].append(str(bad))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert promtool(path).returncode != 0
