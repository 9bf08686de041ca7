"""End to end: a real Alertmanager, the shipped routing, the service, real Slurm.

Alerts are posted to Alertmanager's API (POST /api/v2/alerts) with the labels the alert
rules set; Alertmanager routes them with a temporary copy of alerts/alertmanager.yml
(short timings; the gpufleet-remediation receiver pointed at the service, its
``credentials_file`` at the test's webhook token; the other receivers at a sink). The
delivery arrives with the bearer token and drains the node in Slurm. Posting the same
alert again and letting ``repeat_interval`` resend it several times produces exactly
one action.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
import yaml

from tests.conftest import need_binary, wait_for
from tests.promstack import Alertmanager, WebhookSink, alertmanager_config_for_test
from tests.remediation_proc import REPO, ServiceProcess, policy_file

pytestmark = pytest.mark.integration


def webhook_count(metrics: str, code: str) -> float:
    m = re.search(rf'^gpufleet_remediation_webhook_requests_total{{code="{code}"}} (\S+)$', metrics, re.M)
    return float(m[1]) if m else 0.0


@pytest.fixture
def stack(tmp_path, slurm):
    binary = need_binary("prometheus-alertmanager")
    svc = ServiceProcess(tmp_path / "svc", policy=policy_file(tmp_path / "policy.yml"), slurm_conf=slurm.conf_path)
    svc.start()
    sink = WebhookSink()
    config = tmp_path / "alertmanager.yml"
    cfg = alertmanager_config_for_test(REPO / "alerts" / "alertmanager.yml", config, webhook_base=sink.url,
                                       credentials_file=svc.webhook_token_file,
                                       timings={"group_wait": "1s", "group_interval": "1s", "repeat_interval": "2s"})
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "gpufleet-remediation"]
    receiver["webhook_configs"][0]["url"] = svc.url + "/alerts"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    am = Alertmanager(config, tmp_path / "am", binary=binary)
    try:
        am.start()
        yield svc, am, sink
    finally:
        am.stop()
        sink.close()
        assert svc.stop() == 0, svc.log_tail()


def test_alertmanager_delivers_with_the_token_and_drains_once(stack, slurm):
    svc, am, sink = stack
    starts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    labels = {"alertname": "GpuRowRemapFailure", "node": "gpu-node-2", "severity": "critical",
              "remediation": "drain", "domain": "gpu"}  # fmt: skip
    firing = {"labels": labels, "annotations": {"summary": "row remapping failed on GPU 3"}, "startsAt": starts}
    am.post_alerts([firing])

    wait_for(lambda: "drain" in slurm.node_state("gpu-node-2"), timeout=30)
    reason = slurm.run("sinfo", "-h", "-n", "gpu-node-2", "-O", "Reason:|").stdout.strip().rstrip("|")
    assert reason.startswith("gpufleet: GpuRowRemapFailure on gpu-node-2: row remapping failed on GPU 3"), reason
    assert {n for n, st in slurm.node_states().items() if "drain" in st} == {"gpu-node-2"}
    metrics = svc.metrics()
    assert webhook_count(metrics, "200") >= 1 and webhook_count(metrics, "401") == 0, metrics
    # continue: true: the critical alert also reached the page receiver (without our token).
    page = sink.wait(lambda n: n.path == "/page" and n.body["commonLabels"].get("node") == "gpu-node-2", timeout=20)
    assert "Authorization" not in page.headers

    # The same alert again, and repeat_interval resends: duplicates, never a second action.
    am.post_alerts([firing])
    wait_for(lambda: len(svc.decisions("gpu-node-2", "duplicate")) >= 2, timeout=30)
    history = svc.history("gpu-node-2")
    acted = [h for h in history if h["decision"] == "acted"]
    assert len(acted) == 1 and acted[0]["action"] == "drain" and acted[0]["action_state"] == "done", history
    assert {h["decision"] for h in history} <= {"acted", "duplicate"}, history
    assert len({h["delivery_id"] for h in history}) >= 3  # one delivery that acted, resends that did not
    assert webhook_count(svc.metrics(), "200") >= 3
    assert slurm.run("sinfo", "-h", "-n", "gpu-node-2", "-O", "Reason:|").stdout.strip().rstrip("|") == reason
