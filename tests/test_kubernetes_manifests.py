"""deploy/kubernetes: every overlay rendered with ``kubectl kustomize`` and checked offline.

* Kubernetes objects are validated with kubernetes-validate (the API's OpenAPI schemas,
  strict: unknown fields fail) at the oldest and newest versions it ships that we support.
* The Prometheus Operator's objects (PodMonitor, ServiceMonitor, PrometheusRule,
  AlertmanagerConfig), which kubernetes-validate does not know and of which no CRD schema
  is available offline, are validated against ``CRD_SUBSETS``: the parts of the
  operator's CRD schemas (monitoring.coreos.com v1 / v1alpha1) these manifests use,
  with ``additionalProperties: false`` so a misspelt or misplaced field fails.
* The PrometheusRules are the rule files (equal groups) and pass ``promtool check rules``.
* The container arguments parse with the programs' own flag parsers, and the paths they
  name are mounted.
* The remediation ClusterRole grants exactly what the Kubernetes actuator calls: the
  actuator runs a drain/resume cycle against tests/fake_kube.py with the role enforced
  (403 for anything else), and every grant must have been used.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from exporters import agent
from remediation import service
from remediation.actuators.base import ActuatorError
from remediation.actuators.kubernetes import RBAC_VERBS, KubernetesActuator
from tests.conftest import REPO
from tests.fake_kube import FakeKube, role_grants

DEPLOY = REPO / "deploy" / "kubernetes"
OVERLAYS = ("base", "overlays/kube-prometheus-stack", "overlays/dry-run")
K8S_VERSIONS = ("1.29.0", "1.37.0")  # GPU Operator's oldest supported line .. newest schemas shipped
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not on PATH: deploy/kubernetes is rendered with `kubectl kustomize` "
                    "(kustomize v5 built in), so these checks cannot run without it")
    return path


class _Loader(yaml.SafeLoader):
    """YAML as kubectl means it: a bare ``=`` (matchType) is a string, not YAML 1.1's value key."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def render(target: Path | str) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return [d for d in yaml.load_all(out.stdout, Loader=_Loader) if d]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(name: str) -> list[dict[str, Any]]:
    if name not in _RENDERED:
        _RENDERED[name] = render(DEPLOY / name)
    return _RENDERED[name]


def with_component(tmp_path: Path, component: str, base: str = "base") -> list[dict[str, Any]]:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # kustomize takes relative paths only
        "resources": [os.path.relpath(DEPLOY / base, tmp_path)],
        "components": [os.path.relpath(DEPLOY / "components" / component, tmp_path)]}))
    return render(tmp_path)


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def container(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (c,) = one(objs, kind, name)["spec"]["template"]["spec"]["containers"]
    return c


# -- the operator's CRDs, the subset used here --------------------------------------------------
def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_STR = {"type": "string"}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                           r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS,
                                          "annotations": _LABELS}, "required": ["name", "namespace"]}
_SELECTOR = _obj({"matchLabels": _LABELS})
_RELABEL = _obj({
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
                        "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
                        "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": _STR, "targetLabel": _STR, "regex": _STR, "modulus": {"type": "integer"}, "replacement": _STR})
_ENDPOINT = {"port": _STR, "path": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION,
             "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array", "items": _RELABEL},
             "metricRelabelings": {"type": "array", "items": _RELABEL}}
_RULE = _obj({"alert": _STR, "record": _STR, "expr": {"type": ["string", "integer"]}, "for": _DURATION,
              "keep_firing_for": _DURATION, "labels": _LABELS, "annotations": _LABELS}, ("expr",))
_MATCHER = _obj({"name": _STR, "value": _STR, "matchType": {"enum": ["=", "!=", "=~", "!~"]}}, ("name",))
_SECRET_KEY = _obj({"name": _STR, "key": _STR, "optional": {"type": "boolean"}}, ("key",))
CRD_SUBSETS: dict[str, dict[str, Any]] = {
    "PodMonitor": _obj({"spec": _obj({
        "selector": _SELECTOR, "jobLabel": _STR,
        "podMetricsEndpoints": {"type": "array", "items": _obj(_ENDPOINT)}}, ("selector",))}),
    "ServiceMonitor": _obj({"spec": _obj({
        "selector": _SELECTOR, "jobLabel": _STR,
        "endpoints": {"type": "array", "items": _obj(_ENDPOINT)}}, ("selector",))}),
    "PrometheusRule": _obj({"spec": _obj({"groups": {"type": "array", "items": _obj({
        "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "limit": {"type": "integer"},
        "query_offset": _DURATION, "labels": _LABELS,
        "rules": {"type": "array", "items": _RULE}}, ("name",))}})}),
    "AlertmanagerConfig": _obj({"spec": _obj({
        "route": _obj({"receiver": _STR, "groupBy": {"type": "array", "items": _STR},
                       "groupWait": _DURATION, "groupInterval": _DURATION, "repeatInterval": _DURATION,
                       "matchers": {"type": "array", "items": _MATCHER}, "continue": {"type": "boolean"}}),
        "inhibitRules": {"type": "array", "items": _obj({
            "sourceMatch": {"type": "array", "items": _MATCHER}, "targetMatch": {"type": "array", "items": _MATCHER},
            "equal": {"type": "array", "items": _STR}})},
        "receivers": {"type": "array", "items": _obj({"name": _STR, "webhookConfigs": {
            "type": "array", "items": _obj({
                "url": {"type": "string", "pattern": "^https?://"}, "sendResolved": {"type": "boolean"},
                "maxAlerts": {"type": "integer", "minimum": 0},
                "httpConfig": _obj({"authorization": _obj({"type": _STR, "credentials": _SECRET_KEY}),
                                    "followRedirects": {"type": "boolean"}})})}}, ("name",))}})}),
}
for _kind, _schema in CRD_SUBSETS.items():
    _schema["properties"].update({"apiVersion": {"const": "monitoring.coreos.com/v1alpha1" if _kind ==
                                                 "AlertmanagerConfig" else "monitoring.coreos.com/v1"},
                                  "kind": {"const": _kind}, "metadata": _META})
    _schema["required"] = ["apiVersion", "kind", "metadata", "spec"]


# -- render and validate ---------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_to_objects_valid_against_their_schemas(overlay):
    objs = rendered(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"DaemonSet", "Deployment", "ClusterRole", "Service", "PersistentVolumeClaim"} <= kinds
    for obj in objs:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in OPERATOR_KINDS:
            try:
                jsonschema.validate(obj, CRD_SUBSETS[obj["kind"]])
            except jsonschema.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {list(exc.path)}")
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"].get("namespace") == "gpufleet", where
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gpufleet", where


def test_the_subset_schemas_reject_a_misspelt_field():
    pm = dict(one(rendered("overlays/kube-prometheus-stack"), "PodMonitor", "gpufleet-node-agent"))
    bad = json.loads(json.dumps(pm))
    bad["spec"]["podMetricsEndpoints"][0]["relabellings"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SUBSETS["PodMonitor"])
    jsonschema.validate(pm, CRD_SUBSETS["PodMonitor"])


def test_kubernetes_validate_rejects_an_unknown_field():
    ds = json.loads(json.dumps(one(rendered("base"), "DaemonSet", "gpufleet-node-agent")))
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


# -- generated objects ------------------------------------------------------------------------------
def test_committed_generated_objects_equal_a_fresh_generation():
    out = subprocess.run([sys.executable, str(DEPLOY / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_generate_check_names_a_stale_file(tmp_path, monkeypatch):
    sys.path.insert(0, str(DEPLOY))
    try:
        import generate
    finally:
        sys.path.remove(str(DEPLOY))
    monkeypatch.setattr(generate, "KPS", tmp_path / "kps")
    monkeypatch.setattr(generate, "BASE", tmp_path / "base")
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0
    (tmp_path / "kps" / "dashboards.yaml").write_text("# edited by hand\n")
    assert generate.main(["--check"]) == 1


def test_prometheus_rules_are_the_rule_files_and_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make setup installs the prometheus package)")
    rules = [o for o in rendered("overlays/kube-prometheus-stack") if o["kind"] == "PrometheusRule"]
    sources = sorted((REPO / "alerts" / "rules").glob("*.yml"))
    assert {o["metadata"]["annotations"]["gpufleet.io/source"] for o in rules} == {
        f"alerts/rules/{p.name}" for p in sources}
    files = []
    for obj in rules:
        src = REPO / obj["metadata"]["annotations"]["gpufleet.io/source"]
        assert obj["spec"]["groups"] == yaml.safe_load(src.read_text())["groups"], src
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        path = tmp_path / f"{obj['metadata']['name']}.yml"
        path.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}, sort_keys=False))
        files.append(str(path))
    out = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboards_are_configmaps_for_the_grafana_sidecar():
    cms = [o for o in rendered("overlays/kube-prometheus-stack")
           if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    files = sorted((REPO / "dashboards" / "json").glob("*.json"))
    assert sorted(k for cm in cms for k in cm["data"]) == sorted(p.name for p in files)
    for cm in cms:
        ((key, text),) = cm["data"].items()
        assert text == (REPO / "dashboards" / "json" / key).read_text()
        assert len(json.dumps(cm).encode()) < 1024 * 1024  # the API server's ConfigMap limit


def test_alertmanager_config_sends_remediation_alerts_to_the_service_with_the_webhook_token():
    objs = rendered("overlays/kube-prometheus-stack")
    amc = one(objs, "AlertmanagerConfig", "gpufleet-remediation")
    svc = one(objs, "Service", "gpufleet-remediation")
    am = yaml.safe_load((REPO / "alerts" / "alertmanager.yml").read_text())
    (src,) = [r for r in am["route"]["routes"] if r["receiver"] == "gpufleet-remediation"]
    route = amc["spec"]["route"]
    assert [f'{m["name"]}{m["matchType"]}"{m["value"]}"' for m in route["matchers"]] == src["matchers"]
    assert route["continue"] is True and route["groupBy"] == am["route"]["group_by"]
    assert [([f'{m["name"]}{m["matchType"]}"{m["value"]}"' for m in r["sourceMatch"]],
             [f'{m["name"]}{m["matchType"]}"{m["value"]}"' for m in r["targetMatch"]], r["equal"])
            for r in amc["spec"]["inhibitRules"]] == [
        (r["source_matchers"], r["target_matchers"], r["equal"]) for r in am["inhibit_rules"]]
    (hook,) = amc["spec"]["receivers"][0]["webhookConfigs"]
    port = svc["spec"]["ports"][0]["port"]
    assert hook["url"] == f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}/alerts"
    creds = hook["httpConfig"]["authorization"]["credentials"]
    deploy = one(objs, "Deployment", "gpufleet-remediation")["spec"]["template"]["spec"]
    (tokens,) = [v for v in deploy["volumes"] if v["name"] == "tokens"]
    assert creds["name"] == tokens["secret"]["secretName"]
    args = parse_remediation(objs)
    assert args.webhook_token_file.endswith("/" + creds["key"])


# -- the node agent ----------------------------------------------------------------------------------
def parse_agent(objs: list[dict[str, Any]]):
    c = container(objs, "DaemonSet", "gpufleet-node-agent")
    assert c["command"] == ["gpufleet-exporter"]
    return agent.build_parser().parse_args(c["args"])


def mounted(c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volumeMount that holds ``path``."""
    hits = [m for m in c["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert hits, f"{path} is not mounted: {shlex.join(m['mountPath'] for m in c['volumeMounts'])}"
    return max(hits, key=lambda m: len(m["mountPath"]))


def host_path(objs: list[dict[str, Any]], kind: str, name: str, mount: dict[str, Any]) -> str:
    vols = {v["name"]: v for v in one(objs, kind, name)["spec"]["template"]["spec"]["volumes"]}
    return vols[mount["name"]]["hostPath"]["path"]


def test_node_agent_runs_on_every_gpu_node_with_the_host_views_it_needs():
    objs = rendered("base")
    ds = one(objs, "DaemonSet", "gpufleet-node-agent")["spec"]["template"]["spec"]
    c = container(objs, "DaemonSet", "gpufleet-node-agent")
    args = parse_agent(objs)
    assert ds["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tolerated = {(t["key"], t.get("effect")) for t in ds["tolerations"]}
    taint_key = inspect.signature(KubernetesActuator).parameters["taint_key"].default
    assert ("nvidia.com/gpu", "NoSchedule") in tolerated
    assert (taint_key, "NoSchedule") in tolerated  # keeps running on nodes the service drained
    assert ds["runtimeClassName"] == "nvidia" and ds["hostPID"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    # every host path the flags name is mounted read-only from the host's
    for flag_value, host in ((args.sysfs, "/sys"), (args.procfs, "/proc"), (args.rootfs, "/")):
        m = mounted(c, flag_value)
        assert m["readOnly"] is True and host_path(objs, "DaemonSet", "gpufleet-node-agent", m) == host
    sock = mounted(c, args.jobs_pod_resources_socket)
    assert host_path(objs, "DaemonSet", "gpufleet-node-agent", sock) + "/kubelet.sock" == \
        "/var/lib/kubelet/pod-resources/kubelet.sock" and sock["readOnly"] is True
    assert mounted(c, args.progress_dir)["readOnly"] is True
    assert args.jobs_read_environ is False and args.xid_source == "nvml"
    # probes on the served port; resources set
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.listen == f":{port['metrics']}"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["privileged"] is False


def test_kmsg_component_reads_the_kernel_log_read_only_from_a_privileged_container(tmp_path):
    objs = with_component(tmp_path, "kmsg-xid")
    args = parse_agent(objs)
    c = container(objs, "DaemonSet", "gpufleet-node-agent")
    assert args.xid_source == "both"
    m = mounted(c, args.kmsg_path)
    assert m["readOnly"] is True and host_path(objs, "DaemonSet", "gpufleet-node-agent", m) == "/dev/kmsg"
    assert c["securityContext"] == {"privileged": True, "readOnlyRootFilesystem": True}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(one(objs, "DaemonSet", "gpufleet-node-agent"), version, strict=True)


def test_pod_monitor_gives_the_agents_series_the_labels_the_rules_use():
    objs = rendered("overlays/kube-prometheus-stack")
    pm = one(objs, "PodMonitor", "gpufleet-node-agent")
    ds = one(objs, "DaemonSet", "gpufleet-node-agent")
    assert pm["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in {p["name"] for p in container(objs, "DaemonSet", "gpufleet-node-agent")["ports"]}
    set_by = {r["targetLabel"]: r for r in ep["relabelings"] if r["action"] == "replace"}
    assert set_by["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
    assert set_by["job"]["replacement"] == "gpufleet-exporter"
    assert "cluster" in set_by
    assert 'job="gpufleet-exporter"' in (REPO / "alerts" / "rules" / "exporters.yml").read_text()
    dropped = [r["regex"] for r in ep["relabelings"] if r["action"] == "labeldrop"]
    assert dropped and all(lab in dropped[0].split("|") for lab in ("namespace", "pod"))
    sm = one(objs, "ServiceMonitor", "gpufleet-remediation")
    svc = one(objs, "Service", "gpufleet-remediation")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {r.get("replacement") for r in sm["spec"]["endpoints"][0]["relabelings"]} >= {"gpufleet-remediation"}


# -- the remediation service -------------------------------------------------------------------------
def parse_remediation(objs: list[dict[str, Any]]):
    c = container(objs, "Deployment", "gpufleet-remediation")
    assert c["command"] == ["gpufleet-remediation"]
    return service.build_parser().parse_args(c["args"])


def test_remediation_is_one_recreated_replica_with_its_database_on_a_volume_claim():
    objs = rendered("base")
    dep = one(objs, "Deployment", "gpufleet-remediation")
    spec = dep["spec"]["template"]["spec"]
    c = container(objs, "Deployment", "gpufleet-remediation")
    args = parse_remediation(objs)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert args.actuator == "kubernetes" and args.kube_in_cluster is True and args.dry_run is False
    vols = {v["name"]: v for v in spec["volumes"]}
    db = vols[mounted(c, args.db)["name"]]
    pvc = one(objs, "PersistentVolumeClaim", db["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for token in (args.webhook_token_file, args.admin_token_file):
        assert "secret" in vols[mounted(c, token)["name"]]
    policy = vols[mounted(c, args.policy)["name"]]["configMap"]["name"]
    cm = one(objs, "ConfigMap", policy)  # the name carries kustomize's content hash
    assert cm["data"][Path(args.policy).name] == (REPO / "alerts" / "remediation-policy.yml").read_text()
    port = c["ports"][0]["containerPort"]
    assert args.listen == f":{port}"
    svc = one(objs, "Service", "gpufleet-remediation")
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("overlay, dry_run", [("base", False), ("overlays/kube-prometheus-stack", False),
                                              ("overlays/dry-run", True)])
def test_only_the_dry_run_overlay_runs_the_service_in_dry_run(overlay, dry_run):
    assert parse_remediation(rendered(overlay)).dry_run is dry_run


# -- RBAC against what the actuator really calls --------------------------------------------------------
def shipped_grants() -> set[tuple[str, str]]:
    objs = rendered("base")
    dep = one(objs, "Deployment", "gpufleet-remediation")
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [b for b in objs if b["kind"] == "ClusterRoleBinding"
                and {"kind": "ServiceAccount", "name": sa, "namespace": dep["metadata"]["namespace"]}
                in b["subjects"]]
    assert len(bindings) == 1 and not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]
    return role_grants(one(objs, "ClusterRole", bindings[0]["roleRef"]["name"]))


def drain_and_resume(kube: FakeKube) -> None:
    """Everything the service asks of the actuator: ping, the live view, a drain with a
    PDB-blocked eviction, and the resume of its own drain."""
    kube.add_node("gpu-1", labels={"node.kubernetes.io/instance-type": "p5.48xlarge"})
    kube.add_node("gpu-2")
    kube.add_pod("ml", "train-0", "gpu-1")
    kube.add_pod("kube-system", "dcgm-exporter", "gpu-1", owner_kind="DaemonSet")
    kube.script_eviction("ml", "train-0", 429)
    act = KubernetesActuator(configuration=kube.configuration(), sleep=lambda s: None, backoff_initial=0.01)
    try:
        act.ping()
        assert set(act.nodes()) == {"gpu-1", "gpu-2"}
        st = act.drain("gpu-1", "gpufleet: GpuXidRebootRequired xid=79")
        assert st.ours and st.extra["evicted"] == "1"
        assert act.resume("gpu-1").unavailable is False
    finally:
        act.close()


def test_cluster_role_grants_exactly_what_the_actuator_calls():
    grants = shipped_grants()
    assert grants == set(RBAC_VERBS)
    with FakeKube(grants=grants) as kube:
        drain_and_resume(kube)
    assert kube.denied == []
    assert kube.rbac() == grants  # every grant is used: nothing in the role is spare


def test_a_verb_the_role_does_not_grant_fails_the_drain():
    grants = shipped_grants() - {("pods/eviction", "create")}
    with FakeKube(grants=grants) as kube, pytest.raises(ActuatorError, match="403"):
        drain_and_resume(kube)
    assert {(r.resource, r.verb) for r in kube.denied} == {("pods/eviction", "create")}
