"""`gpufleet demo --once`: the whole loop, end to end, as `make demo` runs it.

The scenario runs as a separate process (``python -m demo --once``) against a real
Slurm, Prometheus, Alertmanager, remediation service and simulator-backed node agents
of its own (it needs 4 nodes with its own prolog/epilog wrapper and a fresh slurmctld
state, so it does not borrow the session cluster). The demo checks each step's
expectation itself and exits non-zero if one is missed; this test also reads the
table, and checks that nothing the demo started outlives it. Deadlines are generous
(a slow 2-core CI box); nothing here asserts a latency.

The cheaper tests pin the pieces the scenario relies on: the demo's derived policy is
valid for the service and differs from the shipped one only where the demo says, and
the demo's rule copies keep every rule.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from demo import config
from remediation.policy import load_policy
from tests.conftest import REPO, need_binary, wait_for
from tests.slurm_fixture import slurm_available


def demo_pids(workdir: Path) -> list[int]:
    """Processes whose command line or environment names the demo's work directory."""
    needle = str(workdir).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in cmd or needle in env:
            pids.append(int(entry))
    return pids


def run_demo(args: list[str], workdir: Path, timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    """``python -m demo ARGS --workdir WORKDIR``; past the timeout it is stopped the way a user
    would (SIGTERM: the demo stops its stack) before the test fails, so nothing lingers."""
    proc = subprocess.Popen([sys.executable, "-m", "demo", *args, "--workdir", str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_demo(proc, workdir)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_demo(proc: subprocess.Popen, workdir: Path) -> None:
    """End a demo still running (a failed test): SIGTERM lets it stop what it started; then
    SIGKILL, and anything left that names the work directory."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in demo_pids(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
def test_demo_once_runs_the_scenario_and_every_step_meets_its_expectation(tmp_path):
    slurm_available()
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    workdir = tmp_path / "demo"
    proc = run_demo(["--once", "--color", "never"], workdir, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    header = out.index("detected after")
    table = out[out.rindex("\n", 0, header) + 1:]
    rows = {line.split("  ")[0]: line for line in table.splitlines()[2:6]}
    assert set(rows) == {"Xid 79 on gpu-node-3 GPU 5", "IB link flap on gpu-node-2 mlx5_0",
                         "row-remap failure on 3 nodes at once", "faults cleared"}, table
    assert all(" ok: " in line for line in rows.values()), table
    # The timeline shows the chain: alert, webhook decision, the drain as sinfo reports it.
    assert "firing   GpuXidRebootRequired on gpu-node-3 GPU 5 firing" in out
    assert 'sinfo: gpu-node-3' in out and 'reason "gpufleet: GpuXidRebootRequired on gpu-node-3' in out
    assert "pending  GpuRowRemapFailed" in out and "firing   GpufleetRemediationBreakerOpen" in out
    assert "declined GpuRowRemapFailed" in out
    assert "\033[" not in out  # --color never (and not a terminal): plain text
    assert not demo_pids(workdir), "processes outlived the demo"


@pytest.mark.integration
def test_demo_keeps_running_until_ctrl_c_and_a_second_ctrl_c_does_not_cut_the_clean_up(tmp_path):
    """Interactive mode: after the table it prints the URLs and waits; Ctrl-C stops every
    process it started, even when a second Ctrl-C arrives while it is stopping. Two nodes
    and a short --wait keep it quick (steps that need more nodes miss; that is not the point)."""
    slurm_available()
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    workdir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--nodes", "2", "--wait", "3", "--color", "never",
                             "--workdir", str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_for(lambda: any("Still running" in ln for ln in lines) or proc.poll() is not None, timeout=300,
                 interval=0.5)
        assert proc.poll() is None, "".join(lines)[-4000:]
        wait_for(lambda: any(ln.strip().startswith("Slurm ") for ln in lines), timeout=10)  # the last URL line
        assert any(ln.strip().startswith("Prometheus") and "http://127.0.0.1:" in ln for ln in lines)
        assert demo_pids(workdir), "the stack should still be running"
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: any("stopping every process" in ln for ln in lines), timeout=30)
        proc.send_signal(signal.SIGINT)  # impatient: again, while it stops
        assert proc.wait(timeout=120) == 130
    finally:
        stop_demo(proc, workdir)
    reader.join(timeout=10)
    out = "".join(lines)
    assert "Traceback" not in out, out[-4000:]
    wait_for(lambda: not demo_pids(workdir), timeout=15)


@pytest.mark.integration
def test_demo_names_what_is_missing_and_runs_the_rest(tmp_path):
    """Without Prometheus/Alertmanager on PATH: says so with the fix, still starts the
    agents (and Slurm where it can), skips what needs alerts, exits 2 (incomplete)."""
    workdir = tmp_path / "demo"
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    proc = run_demo(["--once", "--color", "never", "--nodes", "2"], workdir, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "missing: prometheus -> no alerts (Prometheus). To get it: make setup (as root), or: apt-get install -y " \
           "prometheus" in out
    assert "missing: prometheus-alertmanager" in out
    assert "starting 2 node agents" in out
    assert "SKIPPED: needs Prometheus and Alertmanager" in out
    assert not demo_pids(workdir)


def test_demo_policy_is_valid_and_changes_only_what_the_demo_says(tmp_path):
    path = config.write_policy(tmp_path / "policy.yml", 4)
    policy = load_policy(path)  # the service's own validation
    shipped = yaml.safe_load(config.SHIPPED_POLICY.read_text())
    demo = yaml.safe_load(path.read_text())
    assert demo["caps"]["max_unavailable_nodes"] == 2 and demo["caps"]["max_unavailable_ratio"] == 0.5
    assert {k: v for k, v in demo.items() if k not in ("caps", "rules", "resume_hold_down")} == \
           {k: v for k, v in shipped.items() if k not in ("caps", "rules", "resume_hold_down")}
    by_match = {tuple(sorted(r["match"].items())): r for r in demo["rules"]}
    reboot = by_match[(("remediation", "reboot"),)]
    assert reboot["action"] == "drain" and reboot["auto_resume"] is True
    drain = by_match[(("remediation", "drain"),)]
    shipped_drain = next(r for r in shipped["rules"] if r["match"] == {"remediation": "drain"})
    assert drain == shipped_drain  # hardware inspection: the shipped rule, never auto-resumed
    assert [r.name for r in policy.rules] == [r["name"] for r in demo["rules"]]


def test_demo_rule_copies_keep_every_rule_and_cut_only_the_listed_for(tmp_path):
    files = config.write_rules(tmp_path / "rules")
    assert [f.name for f in files] == sorted(p.name for p in config.RULES_DIR.glob("*.yml"))
    for copy in files:
        shipped = yaml.safe_load((config.RULES_DIR / copy.name).read_text())
        demo = yaml.safe_load(copy.read_text())
        for g_ship, g_demo in zip(shipped["groups"], demo["groups"], strict=True):
            assert "interval" not in g_demo
            assert len(g_ship["rules"]) == len(g_demo["rules"])
            for r_ship, r_demo in zip(g_ship["rules"], g_demo["rules"], strict=True):
                assert r_ship["expr"] == r_demo["expr"]
                if r_demo.get("alert") in config.FOR_CUTS:
                    assert r_demo["for"] == config.FOR_CUTS[r_demo["alert"]]
                else:
                    assert r_ship.get("for") == r_demo.get("for")


def test_every_demo_flag_has_help():
    proc = subprocess.run([sys.executable, "-m", "remediation.cli", "demo", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for flag in ("--nodes", "--gpus", "--once", "--workdir", "--wait", "--color"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(flag))
        assert len(line.split(None, 2)) >= 2, f"{flag} has no help text"
