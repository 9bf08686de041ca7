"""LocalSlurm: a real munged + slurmctld + slurmds on loopback, and nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from exporters.localslurm import LocalSlurm, LocalSlurmError
from tests.conftest import wait_for
from tests.slurm_fixture import NODES, slurm_available

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_every_node_registers_idle_with_eight_gpus(slurm):
    lines = slurm.run("sinfo", "-h", "-N", "-p", "gpu", "-O", "NodeList:|,StateComplete:|,Gres:|").stdout.split()
    assert lines == [f"{n}|idle|gpu:h100:8|" for n in NODES]
    # Each node is its own slurmd on its own loopback port.
    assert len(set(slurm.node_ports.values())) == len(NODES)
    assert slurm.conf_path.is_relative_to(slurm.run_dir) and not slurm.conf_path.is_relative_to("/etc")
    assert slurm.env()["SLURM_CONF"] == str(slurm.conf_path)
    assert f"AuthInfo=socket={slurm.munge_socket}" in slurm.conf_path.read_text()


def test_jobs_run_on_every_node_and_get_the_gpu_stand_ins(slurm):
    jobs = {n: slurm.submit("echo gpus=$CUDA_VISIBLE_DEVICES; sleep 300", gres="gpu:8", extra=["-w", n])
            for n in NODES}
    for job in jobs.values():
        slurm.wait_job_state(job, "RUNNING")
    placed = dict(line.split() for line in slurm.run("squeue", "-h", "-o", "%i %N").stdout.splitlines())
    assert {placed[str(j)] for j in jobs.values()} == set(NODES)
    out = slurm.job_dir / f"slurm-{jobs[NODES[2]]}.out"
    assert wait_for(lambda: out.exists() and "gpus=" in out.read_text(), timeout=10)
    assert out.read_text().strip() == "gpus=0,1,2,3,4,5,6,7"
    # Every GPU taken, one CPU of 32: Slurm's node states follow CPUs, so "mixed".
    assert slurm.node_states() == {n: "mixed" for n in NODES}
    used = slurm.run("sinfo", "-h", "-N", "-p", "gpu", "-O", "GresUsed:|").stdout.split()
    assert used == ["gpu:h100:8(IDX:0-7)|"] * len(NODES)


def test_drain_resume_and_node_state(slurm):
    slurm.drain(NODES[0], "NHC: test drain")
    assert slurm.node_state(NODES[0]) == "idle+drain"
    reasons = slurm.run("sinfo", "-h", "-R", "-o", "%n|%E|%u").stdout.splitlines()
    assert reasons == [f"{NODES[0]}|NHC: test drain|root"]
    job = slurm.submit(gres="gpu:2", extra=["-w", NODES[1]])
    slurm.wait_job_state(job)
    slurm.drain(NODES[1], "busy")
    assert slurm.node_state(NODES[1]) in ("mixed+drain", "allocated+drain")
    slurm.resume(NODES[0])
    slurm.wait_node_state(NODES[0], "idle")  # idle+not_responding until slurmctld pings it


def test_drain_survives_a_controller_restart(slurm):
    slurm.drain(NODES[3], "NHC: keep me")
    slurm.restart_controller()
    slurm.wait_node_state(NODES[3], "idle+drain")
    assert slurm.run("sinfo", "-h", "-R", "-o", "%n|%E").stdout.split("\n")[0] == f"{NODES[3]}|NHC: keep me"


def test_stop_leaves_no_process_and_a_second_cluster_starts(tmp_path):
    slurm_available()
    first = LocalSlurm(tmp_path / "one", nodes=2)
    first.start()
    try:
        job = first.submit(gres="gpu:1")
        first.wait_job_state(job)
        pids = [p.pid for p in first._procs.values()] + first._marked_pids()
        assert len(pids) > 5  # munged, slurmctld, 2 slurmds, slurmstepd, the job's shell and sleep
    finally:
        first.stop()
    assert wait_for(lambda: not any(alive(p) for p in pids), timeout=5)
    first.stop()  # idempotent
    second = LocalSlurm(tmp_path / "two", nodes=1, gpu_type=None, gpus_per_node=2)
    with second:
        assert second.run("sinfo", "-h", "-N", "-O", "NodeList:|,Gres:|").stdout.split() == ["gpu-node-1|gpu:2|"]
        pids = [p.pid for p in second._procs.values()]
    assert wait_for(lambda: not any(alive(p) for p in pids), timeout=5)


def test_failed_start_names_the_daemon_shows_its_log_and_cleans_up(tmp_path):
    slurm_available()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("munged", "slurmd", "sinfo", "squeue", "sbatch", "scontrol", "scancel"):
        real = next(Path(d) / name for d in ("/usr/sbin", "/usr/bin") if (Path(d) / name).exists())
        (bin_dir / name).symlink_to(real)
    fake = bin_dir / "slurmctld"
    fake.write_text("#!/bin/sh\necho 'slurmctld: fatal: invented failure for the test' >&2\nexit 1\n")
    fake.chmod(0o755)
    cluster = LocalSlurm(tmp_path / "base", nodes=1, bin_dir=str(bin_dir), start_timeout=10)
    with pytest.raises(LocalSlurmError) as err:
        cluster.start()
    assert "slurmctld exited during start-up" in str(err.value)
    assert "invented failure for the test" in str(err.value)
    assert cluster._procs == {}
    assert not cluster._marked_pids()
    assert not cluster.run_dir.exists()


def test_missing_programs_are_named(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to get past the root check")
    with pytest.raises(LocalSlurmError, match="missing programs: munged"):
        LocalSlurm(tmp_path, bin_dir=str(tmp_path)).start()
