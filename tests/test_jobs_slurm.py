"""GPU -> job attribution against a real Slurm: real job processes, the shipped prolog/epilog."""

from __future__ import annotations

import psutil
import pytest

from exporters.gpu_sim import SimulatedNVML
from exporters.jobs import JobsCollector
from exporters.localslurm import LocalSlurm
from tests.conftest import scrape_collector, wait_for


def job_info(samples: dict) -> set[tuple[str, str, str, str]]:
    return {(lab["gpu"], lab["job_id"], lab["user"], lab["source"]) for lab, _ in samples.get("gpu_job_info", [])}


def job_processes(job_id: int) -> list[psutil.Process]:
    """The job's own processes (the batch script and its sleep), found through real /proc."""
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.environ().get("SLURM_JOB_ID") == str(job_id) and p.info["name"] == "sleep":
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def mapping_files(jobs_dir) -> list[str]:
    return sorted(p.name for p in jobs_dir.iterdir() if not p.name.startswith("."))  # .lock is the prolog's


def wait_running(slurm: LocalSlurm, job_id: int) -> None:
    wait_for(lambda: slurm.run("squeue", "-h", "-j", str(job_id), "-o", "%T").stdout.strip() == "RUNNING",
             timeout=30)


@pytest.fixture
def collector(sim_state):
    made = []

    def _make(mapping_dir: str) -> JobsCollector:
        sim = SimulatedNVML(gpus=8, state_file=str(sim_state.path), state_poll_interval=0)
        c = JobsCollector(sim, procfs="/proc", mapping_dir=mapping_dir)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.close()


def test_real_job_process_on_a_gpu_is_attributed_to_its_job(slurm, sim_state, collector, tmp_path):
    job = slurm.submit("sleep 300", gres="gpu:2", extra=["--nodelist=gpu-node-2"])
    wait_running(slurm, job)
    procs = wait_for(lambda: job_processes(job), timeout=30)
    # NVML (simulated) reports the job's real process on GPU 5; everything else is real /proc.
    sim_state.gpu(5, processes=[{"pid": procs[0].pid, "used_memory_bytes": 3 * 2**30}])
    empty = tmp_path / "no-mappings"
    empty.mkdir()
    m = scrape_collector(collector(str(empty)))
    assert job_info(m) == {("5", str(job), "root", "environ")}
    mem = {(lab["gpu"], lab["job_id"]): v for lab, v in m["gpu_process_memory_used_bytes"]}
    assert mem == {("5", str(job)): 3 * 2**30}


def test_shipped_prolog_and_epilog_attribute_idle_allocated_gpus(slurm, collector):
    job = slurm.submit("sleep 300", gres="gpu:3", extra=["--nodelist=gpu-node-3"])
    wait_running(slurm, job)
    jobs_dir = slurm.node_dir("gpu-node-3") / "jobs"
    # The prolog writes one mapping file per GPU, then the progress directory: wait for the end.
    wait_for(lambda: (slurm.node_dir("gpu-node-3") / "progress" / str(job)).is_dir(), timeout=30)
    files = mapping_files(jobs_dir)
    assert len(files) == 3
    for name in files:
        assert (jobs_dir / name).read_text().split() == [str(job)]
    # No process runs on those GPUs: the prolog's mapping files alone attribute them.
    c = collector(str(jobs_dir))
    assert job_info(scrape_collector(c)) == {(gpu, str(job), "", "mapping") for gpu in files}
    slurm.run("scancel", str(job))
    wait_for(lambda: not mapping_files(jobs_dir), timeout=30)
    assert "gpu_job_info" not in scrape_collector(c)
    wait_for(lambda: not (slurm.node_dir("gpu-node-3") / "progress" / str(job)).exists(), timeout=30)
