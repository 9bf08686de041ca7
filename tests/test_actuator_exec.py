"""The exec actuator (a site command) and the notify-only 'none' actuator.

The command runs for real (small scripts written by the tests); its live view is a
real SlurmActuator on the shared test cluster where ownership matters, and a stub
where only delegation does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from remediation.actuators.base import ActuatorError, NodeStatus
from remediation.actuators.exec import EX_TEMPFAIL, ExecActuator
from remediation.actuators.kubernetes import KubernetesActuator
from remediation.actuators.none import NoneActuator
from remediation.actuators.slurm import SlurmActuator
from remediation.actuators.slurmrestd import SlurmRestActuator

RECORDER = """\
import json, os, sys
data = sys.stdin.read()
with open(os.environ["RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "stdin": json.loads(data),
               "env": {k: v for k, v in os.environ.items() if k.startswith("GPUFLEET_")}}, f)
print("ok")
"""


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[list[str], Path, dict[str, str]]:
    script = tmp_path / "site-remediate.py"
    script.write_text(RECORDER)
    record = tmp_path / "record.json"
    return [sys.executable, str(script)], record, {"RECORD": str(record), "PATH": "/usr/bin:/bin"}


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "cmd.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


class StubView:
    """A scheduler view that only answers; what an exec actuator delegates to."""

    name = "stub"

    def __init__(self, **nodes: NodeStatus):
        self.statuses = dict(nodes)
        self.pinged = 0

    def nodes(self) -> dict[str, NodeStatus]:
        return dict(self.statuses)

    def node(self, name: str) -> NodeStatus:
        return self.statuses.get(name) or NodeStatus(name=name, exists=False)

    def ping(self) -> None:
        self.pinged += 1


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- running the command ----------------------------------------------------------------
def test_run_passes_node_argument_action_alert_json_and_env(recorder):
    cmd, record, env = recorder
    alert = {"labels": {"alertname": "GpuXid", "node": "gpu-node-1"}, "startsAt": "2026-01-01T00:00:00Z"}
    res = ExecActuator([*cmd, "--node={node}", "--site", "a"], env=env).run(
        "gpu-node-1", "exec", reason="gpufleet: xid 79\nsecond line", alert=alert)
    got = json.loads(record.read_text())
    assert got["argv"] == ["--node=gpu-node-1", "--site", "a"]
    assert got["stdin"] == {"action": "exec", "node": "gpu-node-1", "reason": "gpufleet: xid 79\nsecond line",
                            "alert": alert}
    assert got["env"] == {"GPUFLEET_ACTION": "exec", "GPUFLEET_NODE": "gpu-node-1",
                          "GPUFLEET_REASON": "gpufleet: xid 79 second line"}
    assert res.returncode == 0 and res.stdout.strip() == "ok"


def test_node_is_appended_when_no_argument_names_it(recorder):
    cmd, record, env = recorder
    ExecActuator(cmd, env=env).run("gpu-node-7", "drain")
    assert json.loads(record.read_text())["argv"] == ["gpu-node-7"]


def test_nonzero_exit_is_an_error_with_the_stderr_tail(tmp_path):
    noisy = "".join(f"echo line{i} >&2\n" for i in range(500))
    a = ExecActuator([script(tmp_path, noisy + "echo 'ipmitool: BMC unreachable' >&2\nexit 3\n")])
    with pytest.raises(ActuatorError) as err:
        a.run("gpu-node-1", "drain")
    msg = str(err.value)
    assert err.value.transient is False and "exited 3" in msg and msg.endswith("ipmitool: BMC unreachable")
    assert "line0\n" not in msg and len(msg) < 2300  # a tail, not the whole stream


def test_exit_75_tempfail_is_transient(tmp_path):
    with pytest.raises(ActuatorError) as err:
        ExecActuator([script(tmp_path, f"echo busy >&2\nexit {EX_TEMPFAIL}\n")]).run("gpu-node-1", "drain")
    assert err.value.transient is True


def test_timeout_kills_the_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    cmd = script(tmp_path, f"sleep 60 &\necho $$ $! > {pids}\necho started >&2\nwait\n")
    start = time.monotonic()
    with pytest.raises(ActuatorError) as err:
        ExecActuator([cmd], timeout=0.5).run("gpu-node-1", "reboot")
    assert time.monotonic() - start < 5
    assert err.value.transient is True and "timed out" in str(err.value) and "started" in str(err.value)
    shell, child = map(int, pids.read_text().split())
    deadline = time.monotonic() + 5
    while (alive(shell) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(shell) and not alive(child)


def test_bad_commands_and_node_names(tmp_path):
    with pytest.raises(ValueError):
        ExecActuator("echo {node}")  # a string is not an argv
    with pytest.raises(ActuatorError) as err:
        ExecActuator([str(tmp_path / "missing")]).run("gpu-node-1", "drain")
    assert err.value.transient is False
    for name in ("-rf", "", "a/b", "a\nb"):
        with pytest.raises(ActuatorError):
            ExecActuator(["/bin/true"]).run(name, "drain")


# -- the view ----------------------------------------------------------------------------
def test_without_a_view_the_actuator_methods_refuse(tmp_path):
    a = ExecActuator(["/bin/true"])
    for call in (a.nodes, lambda: a.node("n"), lambda: a.drain("n", "gpufleet: x"), lambda: a.resume("n")):
        with pytest.raises(ActuatorError) as err:
            call()
        assert err.value.transient is False and "view" in str(err.value)
    a.ping()  # the command exists; there is no scheduler to ask
    with pytest.raises(ActuatorError):
        ExecActuator([str(tmp_path / "missing")]).ping()


def test_view_is_delegated_and_guards_ownership(recorder):
    cmd, record, env = recorder
    view = StubView(
        free=NodeStatus(name="free"),
        admin=NodeStatus(name="admin", unavailable=True, reason="admin: psu"),
        mine=NodeStatus(name="mine", unavailable=True, ours=True, reason="gpufleet: xid"),
    )
    a = ExecActuator(cmd, view=view, env=env)
    assert a.nodes() == view.statuses and a.node("admin").reason == "admin: psu"
    a.ping()
    assert view.pinged == 1
    for refused in (lambda: a.drain("admin", "gpufleet: x"), lambda: a.reboot("admin", "gpufleet: x"),
                    lambda: a.resume("free"), lambda: a.resume("admin"), lambda: a.drain("ghost", "gpufleet: x")):
        with pytest.raises(ActuatorError) as err:
            refused()
        assert err.value.transient is False
    assert not record.exists()  # the command never ran for a refused action
    assert a.resume("mine").name == "mine"
    assert json.loads(record.read_text())["stdin"]["action"] == "resume"
    a.drain("free", "gpufleet: y", alert={"labels": {"alertname": "X"}})
    assert json.loads(record.read_text())["stdin"]["alert"] == {"labels": {"alertname": "X"}}


def test_site_script_drains_real_slurm_and_the_view_sees_ours(slurm, tmp_path):
    scontrol = slurm.binary("scontrol")
    site = script(tmp_path, f'exec {scontrol} update NodeName="$1" State=DRAIN Reason="\\"$GPUFLEET_REASON\\""\n')
    view = SlurmActuator(conf=slurm.conf_path)
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": str(slurm.conf_path)}
    a = ExecActuator([site], view=view, env=env)
    st = a.drain("gpu-node-2", "gpufleet: via site script")
    assert st.ours and st.unavailable and st.reason == "gpufleet: via site script"

    slurm.drain("gpu-node-3", "admin: hands off")
    with pytest.raises(ActuatorError):
        a.drain("gpu-node-3", "gpufleet: x")
    with pytest.raises(ActuatorError):
        a.resume("gpu-node-3")

    undo = tmp_path / "undo.sh"
    undo.write_text(f'#!/bin/sh\nexec {scontrol} update NodeName="$1" State=RESUME\n')
    undo.chmod(0o755)
    st = ExecActuator([str(undo)], view=view, env=env).resume("gpu-node-2")
    assert not st.ours and "DRAIN" not in st.state
    assert slurm.node_state("gpu-node-3") == "idle+drain"


# -- notify-only -------------------------------------------------------------------------------
def test_none_actuator_sees_nothing_and_acts_on_nothing():
    a = NoneActuator()
    assert a.nodes() == {}
    st = a.node("gpu-node-1")
    assert not st.unavailable and not st.ours
    a.ping()
    for call in (lambda: a.drain("gpu-node-1", "gpufleet: x"), lambda: a.reboot("gpu-node-1", "gpufleet: x"),
                 lambda: a.resume("gpu-node-1")):
        with pytest.raises(ActuatorError) as err:
            call()
        assert err.value.transient is False and "notify-only" in str(err.value)


@pytest.mark.parametrize("cls", [SlurmActuator, SlurmRestActuator, KubernetesActuator, ExecActuator, NoneActuator])
def test_every_actuator_has_the_protocol_methods(cls):
    assert isinstance(cls.name, str) and cls.name
    for method in ("nodes", "node", "drain", "reboot", "resume", "ping"):
        assert callable(getattr(cls, method))
