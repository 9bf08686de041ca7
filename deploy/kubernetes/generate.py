#!/usr/bin/env python3
"""Generate the Kubernetes objects that are copies of the repository's own sources.

One source of truth each, so nothing is edited twice:

* ``alerts/rules/*.yml`` -> one ``PrometheusRule`` per file
  (overlays/kube-prometheus-stack/generated/prometheusrules.yaml);
* ``dashboards/json/*.json`` -> one ConfigMap per dashboard, labelled
  ``grafana_dashboard: "1"`` for the Grafana sidecar of kube-prometheus-stack
  (overlays/kube-prometheus-stack/generated/dashboards.yaml);
* the ``gpufleet-remediation`` route and receiver and the inhibitions of
  ``alerts/alertmanager.yml`` -> an ``AlertmanagerConfig`` (overlays/kube-prometheus-stack/generated/alertmanagerconfig.yaml);
* ``alerts/remediation-policy.yml`` -> base/generated/remediation-policy.yml, copied
  byte for byte, because kustomize reads generator files only below the kustomization.

Run it after changing any of those sources; ``--check`` exits 1 (and names the files)
when the committed output differs from a fresh generation (tests/test_kubernetes_manifests.py
runs it).

    .venv/bin/python deploy/kubernetes/generate.py
    .venv/bin/python deploy/kubernetes/generate.py --check
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KPS = HERE / "overlays" / "kube-prometheus-stack" / "generated"
BASE = HERE / "base" / "generated"

# kube-prometheus-stack's Prometheus and Alertmanager select monitoring objects by the
# Helm release's name (release: <name>); "kube-prometheus-stack" is the chart's usual one.
RELEASE_LABEL = {"release": "kube-prometheus-stack"}
PART_OF = {"app.kubernetes.io/part-of": "gpufleet"}
# The remediation Service, as the AlertmanagerConfig must reach it from Alertmanager's
# namespace. The overlay's kustomize `replacements` rewrite the namespace part (".gpufleet.")
# to wherever the Service is deployed.
REMEDIATION_URL = "http://gpufleet-remediation.gpufleet.svc:9847/alerts"
TOKEN_SECRET = {"name": "gpufleet-remediation-tokens", "key": "webhook-token"}
MAX_CONFIGMAP_BYTES = 1024 * 1024  # the API server's limit for a ConfigMap
MAX_CLIENT_APPLY_BYTES = 256 * 1024  # kubectl apply's last-applied annotation limit


class GenerateError(Exception):
    """A source cannot be turned into its object (said why, with the file)."""


# -- YAML out -----------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, templates) as literal blocks, so the output reads like the source."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    if "\n" in text:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", text)


_Dumper.add_representer(str, _str)


def dump_all(objects: list[dict[str, Any]], header: str) -> str:
    body = yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True,
                         explicit_start=True)
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines()) + body


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GenerateError(f"{path.relative_to(REPO)}: {exc}") from None


def _k8s_name(stem: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    if not name:
        raise GenerateError(f"{stem!r} gives no usable Kubernetes object name")
    return name


# -- the objects ----------------------------------------------------------------------------------
def prometheus_rules() -> list[dict[str, Any]]:
    files = sorted((REPO / "alerts" / "rules").glob("*.yml"))
    if not files:
        raise GenerateError("alerts/rules/*.yml: no rule files")
    out = []
    for path in files:
        doc = _load_yaml(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or set(doc) != {"groups"}:
            raise GenerateError(f"{path.relative_to(REPO)}: expected a rule file with only `groups:`")
        out.append({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": f"gpufleet-{_k8s_name(path.stem)}", "labels": {**PART_OF, **RELEASE_LABEL},
                         "annotations": {"gpufleet.io/source": f"alerts/rules/{path.name}"}},
            "spec": {"groups": doc["groups"]},
        })
    return out


def dashboard_configmaps() -> list[dict[str, Any]]:
    out = []
    for path in sorted((REPO / "dashboards" / "json").glob("*.json")):
        text = path.read_text()
        try:
            dash = json.loads(text)
        except ValueError as exc:
            raise GenerateError(f"{path.relative_to(REPO)}: not JSON: {exc}") from None
        if not isinstance(dash, dict) or "panels" not in dash and "rows" not in dash:
            raise GenerateError(f"{path.relative_to(REPO)}: not a Grafana dashboard (no panels)")
        if len(text.encode()) > MAX_CONFIGMAP_BYTES - 4096:
            raise GenerateError(f"{path.relative_to(REPO)}: {len(text.encode())} bytes, over a ConfigMap's 1 MiB")
        out.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"gpufleet-dashboard-{_k8s_name(path.stem)}",
                         "labels": {**PART_OF, "grafana_dashboard": "1"},
                         # the sidecar's folderAnnotation (sidecar.dashboards.folderAnnotation)
                         "annotations": {"grafana_folder": "gpufleet",
                                         "gpufleet.io/source": f"dashboards/json/{path.name}"}},
            "data": {path.name: text},
        })
    return out


_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"?(.*?)"?\s*$')
_DURATIONS = ("group_wait", "group_interval", "repeat_interval")


def _matchers(route: dict[str, Any], key: str = "matchers") -> list[dict[str, str]]:
    out = []
    for text in route.get(key) or []:
        m = _MATCHER.fullmatch(text)
        if not m:
            raise GenerateError(f"alerts/alertmanager.yml: matcher {text!r} not understood")
        out.append({"name": m.group(1), "matchType": m.group(2), "value": m.group(3)})
    for key, value in (route.get("match") or {}).items():
        out.append({"name": key, "matchType": "=", "value": str(value)})
    for key, value in (route.get("match_re") or {}).items():
        out.append({"name": key, "matchType": "=~", "value": str(value)})
    return out


def alertmanager_config() -> dict[str, Any]:
    """The remediation route of alerts/alertmanager.yml, for the Prometheus Operator."""
    am = _load_yaml(REPO / "alerts" / "alertmanager.yml")
    route = next((r for r in (am.get("route") or {}).get("routes") or []
                  if r.get("receiver") == "gpufleet-remediation"), None)
    receiver = next((r for r in am.get("receivers") or [] if r.get("name") == "gpufleet-remediation"), None)
    if route is None or receiver is None or len(receiver.get("webhook_configs") or []) != 1:
        raise GenerateError("alerts/alertmanager.yml: no gpufleet-remediation route with one webhook receiver")
    hook = receiver["webhook_configs"][0]
    spec_route: dict[str, Any] = {
        "receiver": "gpufleet-remediation",
        "groupBy": list(route.get("group_by") or am["route"].get("group_by") or []),
        "matchers": _matchers(route),
        # The operator puts every AlertmanagerConfig's route first with continue: true (so
        # these alerts also page); saying so keeps the object identical to the source route.
        "continue": bool(route.get("continue", False)),
    }
    for key in _DURATIONS:
        value = route.get(key) or am["route"].get(key)
        if value:
            spec_route[re.sub(r"_(\w)", lambda m: m.group(1).upper(), key)] = value
    return {
        "apiVersion": "monitoring.coreos.com/v1alpha1", "kind": "AlertmanagerConfig",
        "metadata": {"name": "gpufleet-remediation", "labels": {**PART_OF, **RELEASE_LABEL},
                     "annotations": {"gpufleet.io/source": "alerts/alertmanager.yml (route and receiver "
                                                           "gpufleet-remediation)"}},
        "spec": {
            "route": spec_route,
            # The same inhibitions (a down node mutes its symptoms, a lost GPU its other alerts,
            # a critical alert its warning twin), for the alerts Alertmanager gets from these rules.
            "inhibitRules": [{"sourceMatch": _matchers(r, "source_matchers"),
                              "targetMatch": _matchers(r, "target_matchers"),
                              "equal": list(r.get("equal") or [])} for r in am.get("inhibit_rules") or []],
            "receivers": [{
                "name": "gpufleet-remediation",
                "webhookConfigs": [{
                    "url": REMEDIATION_URL,
                    "sendResolved": bool(hook.get("send_resolved", True)),
                    "maxAlerts": int(hook.get("max_alerts", 0)),
                    "httpConfig": {
                        "authorization": {"type": "Bearer", "credentials": dict(TOKEN_SECRET)},
                        "followRedirects": bool((hook.get("http_config") or {}).get("follow_redirects", True)),
                    },
                }],
            }],
        },
    }


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    src = "Generated by deploy/kubernetes/generate.py from {}; do not edit, run the script."
    return {
        KPS / "prometheusrules.yaml": dump_all(prometheus_rules(), src.format("alerts/rules/*.yml")),
        KPS / "dashboards.yaml": dump_all(dashboard_configmaps(), src.format("dashboards/json/*.json")),
        KPS / "alertmanagerconfig.yaml": dump_all([alertmanager_config()], src.format("alerts/alertmanager.yml")),
        BASE / "remediation-policy.yml": (REPO / "alerts" / "remediation-policy.yml").read_text(),
    }


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a committed file differs from a fresh generation")
    args = p.parse_args(argv)
    try:
        want = outputs()
    except GenerateError as exc:
        print(f"generate.py: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, text in want.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {_shown(path)} (run deploy/kubernetes/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(want[path])
        print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
