"""gpufleet-remediation against real Slurm (munged, slurmctld, slurmd on loopback).

The service runs as a process (``python -m remediation.service --actuator slurm``
with the test cluster's slurm.conf), alerts arrive on its webhook with the token, and
every assertion about the scheduler reads ``sinfo``: never the service's own opinion.
The cluster has four nodes (gpu-node-1..4; partitions gpu = all, debug = 1-2); the
``slurm`` fixture resumes every node between tests.
"""

from __future__ import annotations

import threading
import time

import pytest

from exporters.localslurm import LocalSlurm
from tests.conftest import wait_for
from tests.remediation_proc import ServiceProcess, alert, payload, policy_file

pytestmark = pytest.mark.integration

AUTO_RESUME_RULE = {
    "name": "drain-auto-resume",
    "match": {"remediation": "drain"},
    "action": "drain",
    "reason": "{alertname} on {node}",
    "auto_resume": True,
    "resume_hold_down": "1s",
    "cooldown": "0",
}


def reasons(slurm: LocalSlurm) -> dict[str, str]:
    out = slurm.run("sinfo", "-h", "-N", "-O", "NodeList:|,Reason:|").stdout
    return {ln.split("|")[0]: ln.split("|")[1].strip() for ln in out.splitlines() if "|" in ln}


def drained(slurm: LocalSlurm) -> dict[str, str]:
    """Nodes sinfo shows as drained or draining, with their reasons."""
    why = reasons(slurm)
    return {n: why[n] for n, st in slurm.node_states().items() if "drain" in st}


@pytest.fixture
def service(tmp_path, slurm):
    started: list[ServiceProcess] = []

    def start(policy=None, args=()) -> ServiceProcess:
        svc = ServiceProcess(tmp_path / f"svc{len(started)}", policy=policy or policy_file(tmp_path / "policy.yml"),
                             slurm_conf=slurm.conf_path, args=args)  # fmt: skip
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        assert svc.stop() == 0, svc.log_tail()


def test_remediable_alert_drains_with_gpufleet_reason_and_stays_drained_after_resolution(slurm, service):
    svc = service()  # the shipped rules: drain-hardware-suspect, no auto-resume
    r = svc.post(payload(alert("gpu-node-2")))
    assert r.status_code == 200, r.text
    assert r.json()["decisions"][0]["decision"] == "acted", r.json()
    assert slurm.node_state("gpu-node-2") in ("idle+drain", "drained")
    reason = reasons(slurm)["gpu-node-2"]
    assert reason.startswith("gpufleet: GpuRowRemapFailure on gpu-node-2"), reason
    assert set(drained(slurm)) == {"gpu-node-2"}

    r = svc.post(payload(alert("gpu-node-2", status="resolved")))
    assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "resolved"
    assert "not auto-resumed" in r.json()["decisions"][0]["reason"]
    time.sleep(1.0)  # several ticks
    assert "drain" in slurm.node_state("gpu-node-2") and reasons(slurm)["gpu-node-2"] == reason

    # A human returns it through the admin API (audited with who).
    out = svc.admin("POST", "nodes/gpu-node-2/resume", who="alice@test")
    assert out["decision"] == "acted"
    assert "drain" not in slurm.node_state("gpu-node-2")
    audit = svc.admin("GET", "audit")["audit"]
    assert any(a["who"] == "alice@test" and a["what"] == "resume" and a["target"] == "gpu-node-2" for a in audit)


def test_resolution_resumes_only_where_policy_allows(slurm, tmp_path, service):
    policy = policy_file(tmp_path / "auto.yml", rules=[AUTO_RESUME_RULE])
    svc = service(policy)
    assert svc.post(payload(alert("gpu-node-1"))).json()["decisions"][0]["decision"] == "acted"
    assert "drain" in slurm.node_state("gpu-node-1")
    r = svc.post(payload(alert("gpu-node-1", status="resolved")))
    assert "scheduled" in r.json()["decisions"][0]["reason"]
    wait_for(lambda: "drain" not in slurm.node_state("gpu-node-1"), timeout=15)
    # the decision is committed right after the read-back confirms the resume
    resumes = wait_for(lambda: [h for h in svc.decisions("gpu-node-1", "acted") if h["action"] == "resume"])
    assert len(resumes) == 1 and resumes[0]["who"] == "engine", resumes
    assert reasons(slurm)["gpu-node-1"] in ("", "none", "(null)")


def test_a_node_drained_by_an_admin_is_never_resumed_and_keeps_its_reason(slurm, tmp_path, service):
    svc = service(policy_file(tmp_path / "auto.yml", rules=[AUTO_RESUME_RULE]))
    slurm.drain("gpu-node-3", "admin: bad fan, ticket 4711")
    r = svc.post(payload(alert("gpu-node-3")))
    d = r.json()["decisions"][0]
    assert d["decision"] == "declined" and "already unavailable" in d["reason"] and "someone else" in d["reason"], d
    assert svc.post(payload(alert("gpu-node-3", status="resolved"))).status_code == 200

    # Drained by us, then an admin takes the node over with their own reason.
    assert svc.post(payload(alert("gpu-node-4"))).json()["decisions"][0]["decision"] == "acted"
    slurm.drain("gpu-node-4", "admin: taking this one over")
    assert svc.post(payload(alert("gpu-node-4", status="resolved"))).status_code == 200

    time.sleep(2.5)  # past the 1s hold-down, many ticks
    why = reasons(slurm)
    assert "drain" in slurm.node_state("gpu-node-3") and why["gpu-node-3"] == "admin: bad fan, ticket 4711"
    assert "drain" in slurm.node_state("gpu-node-4") and why["gpu-node-4"] == "admin: taking this one over"
    r = svc.session.post(svc.url + "/api/v1/nodes/gpu-node-3/resume", json={"who": "bob@test"},
                         headers={"Authorization": f"Bearer {svc.admin_token_file.read_text().strip()}"})
    assert r.status_code == 409 and "not taken out by gpufleet" in r.json()["error"]
    assert reasons(slurm)["gpu-node-3"] == "admin: bad fan, ticket 4711"
    assert not [h for h in svc.history() if h["action"] == "resume" and h["decision"] == "acted"]


def _burst(svc: ServiceProcess, nodes: list[str]) -> list[int]:
    codes: list[int] = []
    barrier = threading.Barrier(len(nodes))

    def send(node: str) -> None:
        barrier.wait()
        codes.append(svc.post(payload(alert(node))).status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return codes


def test_caps_hold_under_a_concurrent_burst(slurm, tmp_path, service):
    svc = service(policy_file(tmp_path / "cap1.yml", caps={"max_unavailable_nodes": 1}))
    assert _burst(svc, ["gpu-node-1", "gpu-node-2", "gpu-node-3"]) == [200, 200, 200]
    assert len(drained(slurm)) == 1, drained(slurm)
    (node, reason), = drained(slurm).items()
    assert reason.startswith("gpufleet:")
    firing = [h for h in svc.history() if h["alert_status"] == "firing"]
    assert sorted(h["decision"] for h in firing) == ["acted", "declined", "declined"], firing
    declined = sorted((h for h in firing if h["decision"] == "declined"), key=lambda h: h["id"])
    # the first is a cap hit, which trips the shipped breaker; the next meets the cap or the open breaker
    assert declined[0]["reason"].startswith("cap:"), declined
    assert declined[1]["reason"].startswith(("cap:", "circuit breaker open")), declined
    status = svc.admin("GET", "status")
    assert status["breaker"]["open"], status["breaker"]  # the shipped breaker trips on the first cap hit
    assert [o["node"] for o in status["owned_nodes"]] == [node]


def test_caps_count_nodes_someone_else_took_out(slurm, tmp_path, service):
    slurm.drain("gpu-node-4", "admin: maintenance")
    svc = service(policy_file(tmp_path / "cap2.yml", caps={"max_unavailable_nodes": 2}))
    assert _burst(svc, ["gpu-node-1", "gpu-node-2", "gpu-node-3"]) == [200, 200, 200]
    ours = {n: r for n, r in drained(slurm).items() if r.startswith("gpufleet:")}
    assert len(ours) == 1 and len(drained(slurm)) == 2, drained(slurm)
    assert reasons(slurm)["gpu-node-4"] == "admin: maintenance"


def test_dry_run_changes_nothing_in_slurm(slurm, tmp_path, service):
    svc = service(args=["--dry-run"])
    before = (slurm.node_states(), reasons(slurm))
    r = svc.post(payload(alert("gpu-node-1"), alert("gpu-node-2", "GpuXidHardwareInspection")))
    assert r.status_code == 200
    decisions = r.json()["decisions"]
    assert [d["decision"] for d in decisions] == ["dry_run", "dry_run"], decisions
    assert all("would drain" in d["reason"] for d in decisions)
    assert svc.post(payload(alert("gpu-node-1", status="resolved"))).status_code == 200
    time.sleep(0.5)
    assert (slurm.node_states(), reasons(slurm)) == before
    assert svc.admin("GET", "status")["dry_run"] is True
    assert "gpufleet_remediation_dry_run 1.0" in svc.metrics()
