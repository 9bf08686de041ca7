"""alerts/alertmanager.yml: valid, routes each severity and remediation, inhibits exactly.

Validity and routes use the real ``amtool``; inhibitions and the remediation webhook
use a real Alertmanager on loopback (tests/promstack.py), fed synthetic alerts that
carry the labels the rules set (alerts/README.md conventions).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from tests.conftest import REPO, need_binary, wait_for
from tests.promstack import Alertmanager, WebhookSink, alertmanager_config_for_test

CONFIG = REPO / "alerts" / "alertmanager.yml"
TOKEN = "gpufleet-test-token-7f3a"

pytestmark = pytest.mark.integration


def _cfg() -> dict:
    return yaml.safe_load(CONFIG.read_text())


# --- validity and routing (amtool) ---------------------------------------------------


def test_amtool_check_config_passes():
    amtool = need_binary("amtool")
    proc = subprocess.run([amtool, "check-config", str(CONFIG)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    assert " - 3 inhibit rules" in proc.stdout
    assert " - 5 receivers" in proc.stdout


def _routes(amtool: str, labels: dict[str, str], verify: list[str]) -> list[str]:
    args = [amtool, "config", "routes", "test", f"--config.file={CONFIG}",
            f"--verify.receivers={','.join(verify)}", *(f"{k}={v}" for k, v in labels.items())]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    got = lines[-1].split(",") if lines else []
    assert proc.returncode == 0, f"{labels}: expected {verify}, amtool says {got}: {proc.stdout}{proc.stderr}"
    return got


GPU = {"alertname": "GpuXidRebootRequired", "domain": "gpu", "node": "gpu-node-3", "gpu": "3",
       "uuid": "GPU-3"}


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        pytest.param({**GPU, "severity": "critical"}, ["page"], id="critical-pages"),
        pytest.param({**GPU, "alertname": "GpuTemperatureHigh", "severity": "warning"}, ["ticket"],
                     id="warning-tickets"),
        pytest.param({"alertname": "JobGpusAllocatedIdle", "domain": "jobs", "node": "gpu-node-3",
                      "severity": "warning"}, ["ticket"], id="idle-gpus-ticket-never-page"),
        pytest.param({"alertname": "RdmaCongestion", "domain": "fabric", "severity": "info"}, ["null"],
                     id="info-recorded-only"),
        pytest.param({**GPU, "severity": "critical", "remediation": "reboot"}, ["gpufleet-remediation", "page"],
                     id="critical-reboot-to-remediation-and-pages"),
        pytest.param({**GPU, "alertname": "GpuRowRemapFailure", "severity": "critical", "remediation": "drain"},
                     ["gpufleet-remediation", "page"], id="critical-drain-to-remediation-and-pages"),
        pytest.param({**GPU, "alertname": "GpuRowRemapPending", "severity": "warning", "remediation": "drain"},
                     ["gpufleet-remediation", "ticket"], id="warning-drain-to-remediation-and-ticket"),
        pytest.param({**GPU, "severity": "critical", "remediation": "investigate"}, ["page"],
                     id="unknown-remediation-value-not-sent-to-service"),
        pytest.param({"alertname": "SomethingWithoutSeverity", "node": "gpu-node-3"}, ["default"],
                     id="no-severity-default"),
    ],
)
def test_routes(labels, receivers):
    amtool = need_binary("amtool")
    assert _routes(amtool, labels, receivers) == receivers


def test_remediation_receiver_settings():
    cfg = _cfg()
    root = cfg["route"]
    assert {"alertname", "node"} <= set(root["group_by"])
    assert all(k in root for k in ("group_wait", "group_interval", "repeat_interval"))
    first = root["routes"][0]
    assert first["receiver"] == "gpufleet-remediation"
    assert first["matchers"] == ['remediation=~"drain|reboot"']
    assert first["continue"] is True
    (hook,) = next(r for r in cfg["receivers"] if r["name"] == "gpufleet-remediation")["webhook_configs"]
    assert hook["send_resolved"] is True and hook["max_alerts"] == 0
    assert hook["http_config"]["authorization"] == {
        "type": "Bearer", "credentials_file": "/etc/gpufleet/remediation-webhook-token"}
    secrets = (REPO / "alerts" / "secrets" / "README.md").read_text()
    assert "/etc/gpufleet/remediation-webhook-token" in secrets


def _alert_rules(pattern: str = "*.yml") -> list[tuple[str, dict]]:
    out = []
    for path in sorted((REPO / "alerts" / "rules").glob(pattern)):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            out += [(path.name, r) for r in group.get("rules", []) if "alert" in r]
    return out


def test_rules_use_only_label_values_the_routes_know():
    """A severity or remediation value outside the routes' matchers would silently go elsewhere."""
    rules = _alert_rules()
    if not rules:
        pytest.skip("alerts/rules/*.yml defines no alerting rules yet")
    for file, rule in rules:
        labels = rule.get("labels") or {}
        assert labels.get("severity") in ("critical", "warning", "info"), (file, rule["alert"], labels)
        if "remediation" in labels:
            assert labels["remediation"] in ("drain", "reboot"), (file, rule["alert"], labels)


@pytest.mark.parametrize(("name", "file"), [("SlurmNodeDown", "scheduler.yml"),
                                            ("GpufleetExporterDown", "exporters.yml"), ("GpuLost", "gpu.yml")])
def test_inhibition_sources_are_alerts_the_rules_define(name, file):
    """The inhibitions name alerts; a renamed rule would silently stop inhibiting."""
    if not (REPO / "alerts" / "rules" / file).exists():
        pytest.skip(f"alerts/rules/{file} not written yet")
    assert name in {r["alert"] for _, r in _alert_rules(file)}, f"{name} not defined in {file}"


# --- a real Alertmanager --------------------------------------------------------------


@pytest.fixture(scope="module")
def am(tmp_path_factory):
    binary = need_binary("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("alertmanager")
    token = tmp / "remediation-webhook-token"
    token.write_text(TOKEN + "\n")  # as `openssl rand -hex 32 > file` writes it
    sink = WebhookSink()
    config = tmp / "alertmanager.yml"
    # Same routes and inhibitions; webhooks to the sink, seconds instead of minutes.
    alertmanager_config_for_test(CONFIG, config, webhook_base=sink.url, credentials_file=token,
                                 timings={"group_wait": "1s", "group_interval": "1s"})
    server = Alertmanager(config, tmp, binary=binary)
    server.sink = sink
    try:
        server.start()
        yield server
    finally:
        server.stop()
        sink.close()


def _alert(alertname: str, ends_in: timedelta = timedelta(minutes=10), **labels: str) -> dict:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": alertname, **labels},
        "annotations": {"summary": alertname},
        "startsAt": now.isoformat(),
        "endsAt": (now + ends_in).isoformat(),
    }


def _check_inhibition(am: Alertmanager, source: dict, muted: list[dict], kept: list[dict],
                      also_sources: tuple[dict, ...] = ()) -> None:
    """Post everything; ``muted`` must be inhibited by ``source``, ``kept`` (and the source) not.

    ``also_sources`` are in ``kept`` and may be named as the inhibitor instead of ``source``.
    """
    am.post_alerts([source, *muted, *kept])

    def by_labels(alerts: list[dict], want: dict) -> dict | None:
        return next((a for a in alerts if a["labels"] == want["labels"]), None)

    def settled():
        alerts = am.alerts()
        found = [by_labels(alerts, a) for a in (source, *muted, *kept)]
        if any(f is None for f in found):
            return None
        if not all(by_labels(alerts, a)["status"]["inhibitedBy"] for a in muted):
            return None
        return alerts

    alerts = wait_for(settled, timeout=15, interval=0.1)
    src = by_labels(alerts, source)
    assert src["status"]["state"] == "active" and src["status"]["inhibitedBy"] == [], src
    inhibitors = {src["fingerprint"], *(by_labels(alerts, a)["fingerprint"] for a in also_sources)}
    for a in muted:
        got = by_labels(alerts, a)
        assert got["status"]["state"] == "suppressed", got
        assert len(got["status"]["inhibitedBy"]) == 1 and set(got["status"]["inhibitedBy"]) <= inhibitors, got
    for a in kept:
        got = by_labels(alerts, a)
        assert got["status"]["state"] == "active" and got["status"]["inhibitedBy"] == [], got
    # The API's own filter agrees: inhibited=false leaves out exactly the muted ones.
    visible = am.alerts(inhibited=False)
    assert all(by_labels(visible, a) is None for a in muted)
    assert all(by_labels(visible, a) is not None for a in (source, *kept))


@pytest.mark.parametrize(("down", "domain"), [("SlurmNodeDown", "scheduler"), ("GpufleetExporterDown", "self")])
def test_node_down_inhibits_that_nodes_gpu_fabric_storage_alerts(am, down, domain):
    node, other = f"down-{down}", f"up-{down}"
    source = _alert(down, severity="critical", domain=domain, node=node)
    muted = [
        _alert("GpuXidRebootRequired", severity="critical", domain="gpu", node=node, gpu="0", uuid="GPU-0",
               remediation="reboot"),
        _alert("RdmaPortDown", severity="critical", domain="fabric", node=node, device="mlx5_0", port="1"),
        _alert("FilesystemStuck", severity="critical", domain="storage", node=node, mountpoint="/scratch"),
    ]
    kept = [
        # Another domain on the same node (a stalled job is news even on a dead node).
        _alert("TrainingStalled", severity="warning", domain="jobs", node=node, job_id="42"),
        # The same GPU alert on a healthy node.
        _alert("GpuXidRebootRequired", severity="critical", domain="gpu", node=other, gpu="0", uuid="GPU-0",
               remediation="reboot"),
        # A node-down alert that lost its node label must not mute node-less alerts.
        _alert(down, severity="critical", domain=domain, cluster="no-node-label"),
        _alert("FilesystemStuck", severity="critical", domain="storage", cluster="no-node-label",
               mountpoint="/shared"),
    ]
    _check_inhibition(am, source, muted, kept)


def test_gpu_lost_inhibits_only_that_gpus_other_alerts(am):
    node = "lost-node"
    source = _alert("GpuLost", severity="critical", domain="gpu", node=node, gpu="3", uuid="GPU-3",
                    remediation="reboot")
    muted = [
        _alert("GpuXidRebootRequired", severity="critical", domain="gpu", node=node, gpu="3", uuid="GPU-3",
               remediation="reboot"),
        _alert("GpuEccUncorrectable", severity="critical", domain="gpu", node=node, gpu="3", uuid="GPU-3"),
    ]
    kept = [
        # A different GPU of the same node.
        _alert("GpuEccUncorrectable", severity="critical", domain="gpu", node=node, gpu="4", uuid="GPU-4"),
        # The same GPU index on another node.
        _alert("GpuEccUncorrectable", severity="critical", domain="gpu", node="other-node", gpu="3",
               uuid="GPU-3"),
        # Node-level GPU alert (no gpu label): fewer GPUs than expected must still fire.
        _alert("GpuCountBelowExpected", severity="critical", domain="gpu", node=node),
        # Not a GPU alert.
        _alert("RdmaPortDown", severity="critical", domain="fabric", node=node, device="mlx5_0", port="1"),
        # A second GpuLost for the same GPU (other labels differ): GpuLost never mutes GpuLost.
        second_lost := _alert("GpuLost", severity="critical", domain="gpu", node=node, gpu="3", uuid="GPU-3",
                              remediation="reboot", reason="reset_required"),
    ]
    _check_inhibition(am, source, muted, kept, also_sources=(second_lost,))


def test_critical_inhibits_only_its_warning_twin(am):
    node = "twin-node"
    source = _alert("GpuTemperatureHigh", severity="critical", domain="gpu", node=node, gpu="1", uuid="GPU-1")
    muted = [_alert("GpuTemperatureHigh", severity="warning", domain="gpu", node=node, gpu="1", uuid="GPU-1")]
    kept = [
        _alert("GpuTemperatureHigh", severity="warning", domain="gpu", node=node, gpu="2", uuid="GPU-2"),
        _alert("GpuTemperatureHigh", severity="warning", domain="gpu", node="twin-other", gpu="1",
               uuid="GPU-1"),
        _alert("GpuPcieReplaysIncreasing", severity="warning", domain="gpu", node=node, gpu="1", uuid="GPU-1"),
    ]
    _check_inhibition(am, source, muted, kept)


def test_critical_filesystem_mutes_the_warning_on_the_same_mount_only(am):
    node = "fs-node"
    source = _alert("FilesystemNearlyFull", severity="critical", domain="storage", node=node, mountpoint="/home")
    muted = [_alert("FilesystemNearlyFull", severity="warning", domain="storage", node=node, mountpoint="/home")]
    kept = [_alert("FilesystemNearlyFull", severity="warning", domain="storage", node=node,
                   mountpoint="/scratch")]
    _check_inhibition(am, source, muted, kept)


def test_remediation_webhook_gets_bearer_token_v4_payload_and_resolved(am):
    labels = {"severity": "critical", "domain": "gpu", "node": "hook-node", "gpu": "3", "uuid": "GPU-3",
              "remediation": "reboot"}
    firing = _alert("GpuXidRebootRequired", **labels)
    am.post_alerts([firing])

    def for_node(path: str, status: str):
        return lambda n: (n.path == path and n.body.get("status") == status
                          and n.body.get("groupLabels", {}).get("node") == "hook-node")

    hook = am.sink.wait(for_node("/gpufleet-remediation", "firing"), timeout=20)
    assert hook.headers["Authorization"] == f"Bearer {TOKEN}"
    body = hook.body
    assert body["version"] == "4"
    assert body["receiver"] == "gpufleet-remediation"
    assert body["groupLabels"] == {"alertname": "GpuXidRebootRequired", "node": "hook-node"}
    assert body["truncatedAlerts"] == 0
    (alert,) = body["alerts"]
    assert alert["labels"] == firing["labels"]
    assert alert["status"] == "firing" and alert["fingerprint"]
    # continue: true, so the same alert also pages, and the page carries no remediation token.
    page = am.sink.wait(for_node("/page", "firing"), timeout=20)
    assert "Authorization" not in page.headers
    assert not [n for n in am.sink.received("/ticket") if n.body["groupLabels"].get("node") == "hook-node"]

    am.post_alerts([_alert("GpuXidRebootRequired", ends_in=timedelta(0), **labels)])
    resolved = am.sink.wait(for_node("/gpufleet-remediation", "resolved"), timeout=20)
    assert resolved.headers["Authorization"] == f"Bearer {TOKEN}"
    assert resolved.body["alerts"][0]["status"] == "resolved"
    assert resolved.body["alerts"][0]["fingerprint"] == alert["fingerprint"]

# ---- several clusters behind one Alertmanager: node names repeat, clusters stay apart -------


def test_node_down_mutes_only_its_own_clusters_node(am):
    source = _alert("SlurmNodeDown", severity="warning", domain="scheduler", cluster="east", node="n-1")
    muted = [_alert("GpuXidRebootRequired", severity="critical", domain="gpu", cluster="east", node="n-1",
                    gpu="0", uuid="GPU-E", remediation="reboot")]
    kept = [_alert("GpuXidRebootRequired", severity="critical", domain="gpu", cluster="west", node="n-1",
                   gpu="0", uuid="GPU-W", remediation="reboot")]
    _check_inhibition(am, source, muted, kept)


def test_critical_mutes_only_its_own_clusters_warning_twin(am):
    source = _alert("GpuTemperatureHigh", severity="critical", domain="gpu", cluster="east", node="n-2", gpu="1",
                    uuid="GPU-1")
    muted = [_alert("GpuTemperatureHigh", severity="warning", domain="gpu", cluster="east", node="n-2", gpu="1",
                    uuid="GPU-1")]
    kept = [_alert("GpuTemperatureHigh", severity="warning", domain="gpu", cluster="west", node="n-2", gpu="1",
                   uuid="GPU-1")]
    _check_inhibition(am, source, muted, kept)


def test_groups_are_per_cluster(am):
    for c in ("east", "west"):
        am.post_alerts([_alert("GpuLost", severity="critical", domain="gpu", cluster=c, node="n-3", gpu="0",
                               uuid=f"GPU-{c}", remediation="reboot")])
    got = {}
    for c in ("east", "west"):
        n = am.sink.wait(lambda n, c=c: n.path == "/gpufleet-remediation"
                         and n.body["groupLabels"].get("node") == "n-3"
                         and n.body["groupLabels"].get("cluster") == c, timeout=20)
        got[c] = n.body
    for c, body in got.items():
        assert body["groupLabels"] == {"alertname": "GpuLost", "cluster": c, "node": "n-3"}
        assert [a["labels"]["cluster"] for a in body["alerts"]] == [c]
