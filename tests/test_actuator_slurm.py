"""The Slurm actuators against real Slurm (slurmctld, slurmd, munged on loopback).

scontrol: every behaviour runs against the shared test cluster (``slurm`` fixture),
except reboot requests, which need ``RebootProgram`` in slurm.conf: they get a
one-node cluster of their own whose RebootProgram is ``/bin/true`` and whose node is
kept busy, so the request stays pending (REBOOT_REQUESTED) until we cancel it.

slurmrestd: the real one (Debian's 22.05, OpenAPI v0.0.38) for reading, for the
version negotiation and for the refusal to act where v0.0.38 has no node update;
the write path (v0.0.39+) against tests/fake_slurmrestd.py, which serves the paths
and bodies of Slurm 23.02+.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from exporters.localslurm import LocalSlurm
from remediation.actuators.base import REASON_PREFIX, ActuatorError
from remediation.actuators.slurm import MAX_REASON, SlurmActuator, sanitize_reason
from remediation.actuators.slurmrestd import SlurmRestActuator
from tests.fake_slurmrestd import FakeSlurmrestd
from tests.slurm_fixture import NODES, slurm_available


def actuator(slurm: LocalSlurm, **kw) -> SlurmActuator:
    return SlurmActuator(conf=slurm.conf_path, **kw)


def reason_of(slurm: LocalSlurm, node: str) -> str:
    out = slurm.run("sinfo", "-h", "-N", "-O", "NodeList:|,Reason:|").stdout
    return {ln.split("|")[0]: ln.split("|")[1] for ln in out.splitlines() if "|" in ln}[node]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- pure helpers -------------------------------------------------------------------
def test_sanitize_reason_makes_one_bounded_prefixed_line():
    assert sanitize_reason("gpufleet: a\nb\r\tc\x00d") == "gpufleet: a b c d"
    assert sanitize_reason("xid 79") == f"{REASON_PREFIX} xid 79"  # the prefix is ownership: restored
    long = sanitize_reason("gpufleet: " + "x" * 5000)
    assert len(long) == MAX_REASON and long.endswith("...")


# -- scontrol, real Slurm --------------------------------------------------------------
def test_nodes_are_the_live_view_with_partitions(slurm):
    view = actuator(slurm).nodes()
    assert sorted(view) == NODES
    assert view["gpu-node-1"].partitions == ("debug", "gpu")  # sorted
    assert view["gpu-node-4"].partitions == ("gpu",)
    assert not any(s.unavailable or s.ours for s in view.values())
    assert view["gpu-node-1"].state == "IDLE"


def test_drain_sets_the_gpufleet_reason_and_sinfo_shows_it(slurm):
    st = actuator(slurm).drain("gpu-node-2", "gpufleet: XidCritical xid=79 gpu=3")
    assert st.exists and st.unavailable and st.ours
    assert "DRAIN" in st.state and st.reason == "gpufleet: XidCritical xid=79 gpu=3"
    assert slurm.node_state("gpu-node-2") == "idle+drain"
    assert reason_of(slurm, "gpu-node-2") == "gpufleet: XidCritical xid=79 gpu=3"
    assert slurm.node_state("gpu-node-1") == "idle"


def test_drain_of_a_busy_node_leaves_the_job_running(slurm):
    job = slurm.submit(gres="gpu:2", extra=["--nodelist=gpu-node-3"])
    slurm.wait_job_state(job, "RUNNING")
    st = actuator(slurm).drain("gpu-node-3", "gpufleet: ecc")
    assert st.ours and st.unavailable and st.extra["slurm_state"] == "draining"
    assert slurm.job_state(job) == "RUNNING"


def test_drain_refuses_a_node_an_admin_drained_and_keeps_their_reason(slurm):
    slurm.drain("gpu-node-3", "admin: bad DIMM, ticket 4711")
    a = actuator(slurm)
    before = a.node("gpu-node-3")
    assert before.unavailable and not before.ours
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-node-3", "gpufleet: xid 79")
    assert err.value.transient is False and "someone else" in str(err.value)
    assert reason_of(slurm, "gpu-node-3") == "admin: bad DIMM, ticket 4711"


def test_drain_again_of_our_own_node_is_allowed(slurm):
    a = actuator(slurm)
    a.drain("gpu-node-1", "gpufleet: first")
    st = a.drain("gpu-node-1", "gpufleet: second")
    assert st.ours and st.reason == "gpufleet: second"


def test_resume_only_resumes_our_own_drains(slurm):
    a = actuator(slurm)
    slurm.drain("gpu-node-4", "admin: maintenance")
    with pytest.raises(ActuatorError) as err:
        a.resume("gpu-node-4")
    assert err.value.transient is False
    assert slurm.node_state("gpu-node-4") == "idle+drain" and reason_of(slurm, "gpu-node-4") == "admin: maintenance"

    with pytest.raises(ActuatorError):  # in service: nothing of ours to resume
        a.resume("gpu-node-1")

    a.drain("gpu-node-2", "gpufleet: xid 48")
    st = a.resume("gpu-node-2")
    assert not st.ours and "DRAIN" not in st.state and st.reason == ""
    assert slurm.node_state("gpu-node-2").startswith("idle")


def test_hostile_reasons_reach_slurm_verbatim_on_one_line(slurm, tmp_path):
    marker = tmp_path / "pwned"
    hostile = (f'gpufleet: x" State=RESUME NodeName=gpu-node-2 $(touch {marker}) `touch {marker}`; '
               f"rm -rf /nonexistent\nsecond 'line'\t\\ end\"")
    st = actuator(slurm).drain("gpu-node-1", hostile)
    want = sanitize_reason(hostile)
    assert "\n" not in want and want.endswith('end"')
    assert st.reason == want and reason_of(slurm, "gpu-node-1") == want
    assert slurm.node_state("gpu-node-2") == "idle"  # the words in the reason did nothing
    assert not marker.exists()


def test_long_reasons_are_bounded_and_round_trip(slurm):
    st = actuator(slurm).drain("gpu-node-1", "gpufleet: " + "very long explanation " * 300)
    assert len(st.reason) == MAX_REASON and st.reason.endswith("...")
    assert reason_of(slurm, "gpu-node-1") == st.reason


@pytest.mark.parametrize("name", ["gpu-node-[1-2]", "gpu-node-1,gpu-node-2", "ALL", "all", "-h", "gpu node", ""])
def test_names_that_are_not_one_node_are_refused_before_anything_runs(slurm, name):
    a = actuator(slurm)
    for act in (lambda: a.drain(name, "gpufleet: x"), lambda: a.reboot(name, "gpufleet: x"), lambda: a.resume(name)):
        with pytest.raises(ActuatorError) as err:
            act()
        assert err.value.transient is False
    assert set(slurm.node_states().values()) == {"idle"}


def test_unknown_node(slurm):
    a = actuator(slurm)
    assert a.node("gpu-node-99").exists is False
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-node-99", "gpufleet: x")
    assert err.value.transient is False


def test_failing_scontrol_invalid_node_name_is_not_transient(slurm):
    with pytest.raises(ActuatorError) as err:
        actuator(slurm).scontrol("update", "NodeName=gpu-node-99", "State=DRAIN", "Reason=gpufleet: x")
    assert err.value.transient is False and "Invalid node name" in str(err.value)


def test_reboot_without_reboot_program_fails_permanently(slurm):
    # The shared cluster has no RebootProgram: slurmctld refuses every reboot request.
    with pytest.raises(ActuatorError) as err:
        actuator(slurm).reboot("gpu-node-1", "gpufleet: reboot")
    assert err.value.transient is False and "RebootProgram" in str(err.value)
    assert slurm.node_state("gpu-node-1") == "idle"


def test_hung_scontrol_times_out_transiently_and_its_process_group_is_killed(slurm, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("sinfo"), bin_dir / "sinfo")
    pids = tmp_path / "pids"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\nsleep 60 &\necho $$ $! > {pids}\nwait\n")
    (bin_dir / "scontrol").chmod(0o755)
    a = SlurmActuator(bin_dir=bin_dir, conf=slurm.conf_path, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-node-1", "gpufleet: x")
    assert time.monotonic() - start < 5
    assert err.value.transient is True and "timed out" in str(err.value)
    shell, child = map(int, pids.read_text().split())
    deadline = time.monotonic() + 5
    while (alive(shell) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(shell) and not alive(child)


def test_unreachable_slurmctld_is_transient(slurm, tmp_path):
    conf = tmp_path / "slurm.conf"
    lines = [ln for ln in slurm.conf_path.read_text().splitlines() if not ln.startswith("SlurmctldPort=")]
    conf.write_text("\n".join([*lines, "SlurmctldPort=1", "MessageTimeout=2"]) + "\n")
    a = SlurmActuator(conf=conf, timeout=20)
    for call in (a.nodes, a.ping, lambda: a.drain("gpu-node-1", "gpufleet: x"),
                 lambda: a.scontrol("update", "NodeName=gpu-node-1", "State=DRAIN", "Reason=gpufleet: x")):
        with pytest.raises(ActuatorError) as err:
            call()
        assert err.value.transient is True, str(err.value)
    assert slurm.node_state("gpu-node-1") == "idle"


def test_ping_reaches_slurmctld(slurm):
    actuator(slurm).ping()


def test_sinfo_without_json_falls_back_to_formatted_output(slurm, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("scontrol"), bin_dir / "scontrol")
    calls = tmp_path / "calls"
    (bin_dir / "sinfo").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'for a in "$@"; do [ "$a" = --json ] && { echo "sinfo: unrecognized option \'--json\'" >&2; exit 1; }; done\n'
        f'exec {shutil.which("sinfo")} "$@"\n')
    (bin_dir / "sinfo").chmod(0o755)
    slurm.drain("gpu-node-4", "admin: cabling")
    text = SlurmActuator(bin_dir=bin_dir, conf=slurm.conf_path)
    st = text.drain("gpu-node-2", "gpufleet: xid 31")
    assert st.ours and "DRAIN" in st.state
    json_view = actuator(slurm).nodes()
    text_view = text.nodes()
    for name in NODES:
        j, t = json_view[name], text_view[name]
        assert (t.unavailable, t.ours, t.reason, t.partitions) == (j.unavailable, j.ours, j.reason, j.partitions)
    assert sum("--json" in ln for ln in calls.read_text().splitlines()) == 1  # noticed once, then formatted


# -- reboot, on a cluster with a RebootProgram --------------------------------------------
class _RebootableSlurm(LocalSlurm):
    def slurm_conf(self) -> str:
        # /bin/true never reboots anything; the node stays busy, so the request stays pending.
        return super().slurm_conf() + "RebootProgram=/bin/true\nResumeTimeout=3600\n"


@pytest.fixture(scope="module")
def reboot_cluster(tmp_path_factory):
    slurm_available()
    cluster = _RebootableSlurm(tmp_path_factory.mktemp("slurm-reboot"), nodes=2, node_prefix="rb-node-",
                               partitions={"gpu": ["rb-node-1", "rb-node-2"]}, cluster_name="gpufleet-reboot")
    cluster.start()
    yield cluster
    cluster.stop()


def test_reboot_requests_asap_reboot_with_our_reason_and_resume_after(reboot_cluster):
    c = reboot_cluster
    job = c.submit(gres="gpu:1", extra=["--nodelist=rb-node-1"])
    try:
        c.wait_job_state(job, "RUNNING")
        st = SlurmActuator(conf=c.conf_path).reboot("rb-node-1", "gpufleet: GpuFallenOffBus needs a reboot")
        assert st.ours and st.unavailable
        assert {"DRAIN", "REBOOT_REQUESTED"} <= set(st.state.split("+"))
        shown = c.run("scontrol", "show", "node", "rb-node-1").stdout
        assert "REBOOT_REQUESTED" in shown and "NextState=RESUME" in shown
        assert "Reason=gpufleet: GpuFallenOffBus needs a reboot" in shown
        assert c.job_state(job) == "RUNNING"  # ASAP: after the running job, not through it
    finally:
        c.run("scontrol", "cancel_reboot", "rb-node-1", check=False)
        c.cancel(job)
    c.wait_node_state("rb-node-1", "idle")


def test_reboot_refuses_a_node_an_admin_drained(reboot_cluster):
    c = reboot_cluster
    c.drain("rb-node-2", "admin: firmware update")
    try:
        with pytest.raises(ActuatorError) as err:
            SlurmActuator(conf=c.conf_path).reboot("rb-node-2", "gpufleet: reboot")
        assert err.value.transient is False
        assert "REBOOT" not in c.run("scontrol", "show", "node", "rb-node-2").stdout.split("State=")[1].split()[0]
    finally:
        c.resume("rb-node-2")


# -- slurmrestd, the real one (22.05, v0.0.38: read-only) ---------------------------------
@pytest.fixture
def rest(slurm) -> SlurmRestActuator:
    sock = slurm.start_rest()
    a = SlurmRestActuator(f"unix://{sock}")
    yield a
    a.close()


def test_real_slurmrestd_gives_the_same_view_as_sinfo(slurm, rest):
    slurm.drain("gpu-node-3", "admin: psu")
    actuator(slurm).drain("gpu-node-2", "gpufleet: xid 79")
    cli = actuator(slurm).nodes()
    view = rest.nodes()
    assert sorted(view) == NODES
    for name in NODES:
        r, c = view[name], cli[name]
        assert (r.unavailable, r.ours, r.reason, r.partitions) == (c.unavailable, c.ours, c.reason, c.partitions)
    assert rest.node("gpu-node-2").ours and not rest.node("gpu-node-3").ours
    assert rest.node("gpu-node-99").exists is False
    rest.ping()


def test_real_slurmrestd_2205_cannot_act_and_says_so(slurm, rest):
    for act in (lambda: rest.drain("gpu-node-1", "gpufleet: x"), lambda: rest.resume("gpu-node-1"),
                lambda: rest.reboot("gpu-node-1", "gpufleet: x")):
        with pytest.raises(ActuatorError) as err:
            act()
        assert err.value.transient is False
    with pytest.raises(ActuatorError, match=r"v0\.0\.38.*scontrol actuator"):
        rest.drain("gpu-node-1", "gpufleet: x")
    assert slurm.node_state("gpu-node-1") == "idle"


# -- slurmrestd write path (v0.0.39+), against the fake -----------------------------------
@pytest.fixture
def fake_rest(tmp_path):
    with FakeSlurmrestd(user="gpufleet", token="s3cret") as f:
        for i in range(1, 4):
            f.add_node(f"gpu-node-{i}")
        f.add_node("gpu-node-4", state=["IDLE", "DRAIN"], reason="admin: bad DIMM")
        token = tmp_path / "token"
        token.write_text("SLURM_JWT=s3cret\n")
        f.token_file = str(token)
        yield f


def rest_actuator(f: FakeSlurmrestd, **kw) -> SlurmRestActuator:
    return SlurmRestActuator(f.url, token_file=f.token_file, user="gpufleet", poll_interval=0.01, **kw)


def test_rest_drain_posts_update_node_msg_and_reads_back(fake_rest):
    st = rest_actuator(fake_rest).drain("gpu-node-1", "gpufleet: xid\n79")
    assert st.ours and st.unavailable and st.reason == "gpufleet: xid 79"
    assert fake_rest.posts() == [("/slurm/v0.0.41/node/gpu-node-1", {"state": ["DRAIN"], "reason": "gpufleet: xid 79"})]
    sent = [h for m, _, h, _ in fake_rest.requests if m == "POST"][0]
    assert sent["x-slurm-user-name"] == "gpufleet" and sent["x-slurm-user-token"] == "s3cret"


def test_rest_negotiates_the_best_writable_version(fake_rest):
    fake_rest.versions = ("v0.0.39", "v0.0.40")
    rest_actuator(fake_rest).drain("gpu-node-1", "gpufleet: x")
    assert fake_rest.posts()[0][0] == "/slurm/v0.0.40/node/gpu-node-1"


def test_rest_refuses_foreign_drains_and_resumes_only_ours(fake_rest):
    a = rest_actuator(fake_rest)
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-node-4", "gpufleet: x")
    assert err.value.transient is False
    with pytest.raises(ActuatorError):
        a.resume("gpu-node-4")
    with pytest.raises(ActuatorError):
        a.resume("gpu-node-2")
    assert fake_rest.posts() == []
    assert fake_rest.nodes["gpu-node-4"]["reason"] == "admin: bad DIMM"
    a.drain("gpu-node-2", "gpufleet: y")
    st = a.resume("gpu-node-2")
    assert not st.unavailable and st.reason == ""
    assert fake_rest.posts()[-1] == ("/slurm/v0.0.41/node/gpu-node-2", {"state": ["RESUME"]})


def test_rest_errors_are_classified(fake_rest):
    a = rest_actuator(fake_rest)
    assert a.node("gpu-node-99").exists is False
    fake_rest.fail_next = [(503, {"errors": [{"error": "busy"}]})]
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-node-1", "gpufleet: x")
    assert err.value.transient is True
    fake_rest.fail_next = [(500, {"errors": [{"error_number": 1007, "error": "Unable to contact slurm controller "
                                              "(connect failure)", "description": "Failure to update node"}]})]
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-node-1", "gpufleet: x")
    assert err.value.transient is True
    with pytest.raises(ActuatorError) as err:
        a.reboot("gpu-node-1", "gpufleet: x")
    assert err.value.transient is False and "scontrol" in str(err.value)
    wrong = SlurmRestActuator(fake_rest.url, user="gpufleet")  # no token
    with pytest.raises(ActuatorError) as err:
        wrong.nodes()
    assert err.value.transient is False and "401" in str(err.value)


def test_rest_unreachable_is_transient(tmp_path):
    a = SlurmRestActuator(f"unix://{tmp_path / 'nothing.socket'}", timeout=2)
    for call in (a.nodes, a.ping, lambda: a.drain("gpu-node-1", "gpufleet: x")):
        with pytest.raises(ActuatorError) as err:
            call()
        assert err.value.transient is True


def test_token_file_is_reread_after_rotation(fake_rest):
    a = rest_actuator(fake_rest)
    a.nodes()
    fake_rest.token = "rotated"
    Path(fake_rest.token_file).write_text("rotated\n")
    os.utime(fake_rest.token_file, (time.time() + 5, time.time() + 5))
    assert "gpu-node-1" in a.nodes()
