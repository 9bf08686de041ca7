"""The demo's own copies of the shipped configuration, and exactly what they change.

Everything is derived from the files a site deploys (alerts/rules/*.yml,
alerts/alertmanager.yml, alerts/remediation-policy.yml); the changes are listed in
``DEMO_CHANGES`` and printed by the demo, so nobody mistakes demo timings for the
shipped ones:

- rules: every group is evaluated at the global 1 s interval (a group's
  ``interval:`` is dropped) and the ``for:`` of the alerts in ``FOR_CUTS`` is cut;
- Alertmanager: ``group_wait`` 1 s, ``group_interval`` 2 s, ``repeat_interval`` 30 s
  on every route that sets them; the remediation receiver points at the demo's
  service and its token file; the page/ticket/default receivers at the demo's own
  "pager" (which the timeline reads);
- policy: caps sized for a handful of nodes (10 % of 4 nodes would be none), a short
  resume hold-down, and one rule swapped: ``remediation=reboot`` alerts *drain with
  auto-resume* instead of asking Slurm to reboot (``scontrol reboot`` needs a machine
  that reboots; on loopback nothing would ever come back). The ``remediation=drain``
  rule (hardware inspection, never auto-resumed) is the shipped one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from demo.stack import alertmanager_config_for_test

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "alerts" / "rules"
ALERTMANAGER_YML = REPO / "alerts" / "alertmanager.yml"
SHIPPED_POLICY = REPO / "alerts" / "remediation-policy.yml"
CLUSTER = "demo"

#: Alerts whose ``for:`` the demo shortens (the storm's alert shows pending -> firing).
FOR_CUTS = {"GpuRowRemapFailed": "5s"}
AM_TIMINGS = {"group_wait": "1s", "group_interval": "2s", "repeat_interval": "30s"}
RESUME_HOLD_DOWN = "5s"


def demo_changes(nodes: int) -> list[str]:
    """What the demo runs differently from the shipped files (printed at start)."""
    cap = max_unavailable_nodes(nodes)
    return [
        "scrape and rule evaluation every 1s (shipped: the site's prometheus.yml, 15s-30s)",
        "for: cut for " + ", ".join(f"{a} -> {d}" for a, d in FOR_CUTS.items()),
        "Alertmanager " + ", ".join(f"{k} {v}" for k, v in AM_TIMINGS.items()),
        f"caps: at most {cap} node(s) and half of a partition unavailable (shipped: 10 nodes, 10 %)",
        "remediation=reboot alerts drain with auto-resume after a " + RESUME_HOLD_DOWN + " hold-down "
        "(shipped: scontrol reboot ASAP nextstate=RESUME; nothing reboots on loopback)",
    ]


def max_unavailable_nodes(nodes: int) -> int:
    return max(1, nodes // 2)


def write_rules(dest: Path) -> list[Path]:
    """Copies of alerts/rules/*.yml with the demo's evaluation interval and ``for:`` cuts."""
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []):
            group.pop("interval", None)
            for rule in group.get("rules", []):
                if rule.get("alert") in FOR_CUTS:
                    rule["for"] = FOR_CUTS[rule["alert"]]
        out = dest / path.name
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(out)
    return files


def write_alertmanager(dest: Path, *, service_url: str, token_file: Path, pager_url: str) -> dict[str, Any]:
    """alerts/alertmanager.yml with demo timings, the service's URL and the demo's pager."""
    cfg = alertmanager_config_for_test(ALERTMANAGER_YML, dest, webhook_base=pager_url, credentials_file=token_file,
                                       timings=AM_TIMINGS)
    for receiver in cfg["receivers"]:
        if receiver["name"] == "gpufleet-remediation":
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = service_url.rstrip("/") + "/alerts"
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def policy(nodes: int, *, cooldown: str | None = None, flap_max_drains: int | None = None) -> dict[str, Any]:
    """The shipped policy with the demo's caps and its stand-in for reboots (module docstring)."""
    doc = yaml.safe_load(SHIPPED_POLICY.read_text())
    doc["caps"] = {**doc["caps"], "max_unavailable_ratio": 0.5, "max_unavailable_nodes": max_unavailable_nodes(nodes),
                   "partition_overrides": {}}
    doc["resume_hold_down"] = RESUME_HOLD_DOWN
    if cooldown is not None:
        doc["cooldown"] = cooldown
    if flap_max_drains is not None:
        doc["flap"] = {**doc["flap"], "max_drains": flap_max_drains}
    rules = []
    for rule in doc["rules"]:
        if rule.get("match") == {"remediation": "reboot"}:
            rule = copy.deepcopy(rule)
            rule.update(name="reboot-gpu-reset-demo", action="drain", auto_resume=True,
                        resume_hold_down=RESUME_HOLD_DOWN)
            if cooldown is not None:
                rule["cooldown"] = cooldown
        rules.append(rule)
    doc["rules"] = rules
    return doc


def write_policy(dest: Path, nodes: int, **kw: Any) -> Path:
    dest.write_text("# Generated by the gpufleet demo from alerts/remediation-policy.yml (demo/config.py).\n"
                    + yaml.safe_dump(policy(nodes, **kw), sort_keys=False))
    return dest


def prometheus_config(*, rule_files: list[Path], alertmanager: str, agents_sd: Path, slurm_exporter: str | None,
                      remediation: str | None) -> dict[str, Any]:  # fmt: skip
    """The demo's prometheus.yml: the shape of compose/prometheus.yml with 1 s intervals.

    Node agents come from a file_sd file that carries the ``node`` and ``cluster``
    labels (as a site's inventory would); the Slurm exporter and the service are static.
    """
    scrape: list[dict[str, Any]] = [{
        "job_name": "gpufleet-exporter",
        "file_sd_configs": [{"files": [str(agents_sd)], "refresh_interval": "5s"}],
    }]
    if slurm_exporter:
        scrape.append({"job_name": "gpufleet-slurm-exporter",
                       "static_configs": [{"targets": [slurm_exporter], "labels": {"cluster": CLUSTER}}]})
    if remediation:
        scrape.append({"job_name": "gpufleet-remediation",
                       "static_configs": [{"targets": [remediation], "labels": {"cluster": CLUSTER}}]})
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s",
                   "external_labels": {"cluster": CLUSTER}},
        "rule_files": [str(p) for p in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}]},
        "scrape_configs": scrape,
    }


def write_agents_sd(dest: Path, agents: dict[str, str]) -> None:
    """file_sd targets: one entry per node agent with its ``node`` and ``cluster`` labels."""
    entries = [{"targets": [addr], "labels": {"node": node, "cluster": CLUSTER}} for node, addr in agents.items()]
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(yaml.safe_dump(entries, sort_keys=False))
    tmp.replace(dest)
