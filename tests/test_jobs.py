"""GPU -> job attribution: cgroup layouts, environ, mapping files, the prolog/epilog pair,
lost GPUs and vanished processes, and a real process seen through the real /proc."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exporters import agent, jobs
from exporters.collector import render
from exporters.gpu_sim import SimulatedNVML, uuid_for
from exporters.jobs import JobsCollector, Owner, parse_cgroup, parse_environ, parse_mapping, parse_status_uid
from tests.conftest import REPO, need_binary, scrape_collector, value

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jobs"
PROC = FIXTURES / "proc"
PROLOG = REPO / "scripts" / "slurm" / "prolog.sh"
EPILOG = REPO / "scripts" / "slurm" / "epilog.sh"

POD = "8dbc5577-d0e2-4706-8787-57d52c03ddf2"
POD2 = "3f1c9a7e-51b2-4c7d-9e0f-1a2b3c4d5e6f"
POD3 = "c0ffee00-1234-4abc-8def-0123456789ab"

# pid -> (job_id, source, user) as the fixtures README tabulates them.
FIXTURE_OWNERS = {
    1001: ("4242", "cgroup", "61000"),
    1002: ("4242", "cgroup", "61000"),
    2001: ("4343", "cgroup", "61001"),
    2002: ("4646", "cgroup", "root"),
    2003: ("4747", "cgroup", "61002"),
    3001: (f"pod:{POD}", "kubernetes", "61003"),
    3002: (f"pod:{POD2}", "kubernetes", "root"),
    3003: (f"pod:{POD3}", "kubernetes", "61003"),
    3004: ("4848", "cgroup", "61004"),
    4001: ("4545", "environ", "61005"),
    4002: ("4546", "environ", "61006"),
    5001: None,
    5002: None,
}


@pytest.fixture
def make(sim_state, tmp_path):
    made: list[JobsCollector] = []

    def _make(procfs: Path | str = PROC, mapping_dir: Path | str | None = None, gpus: int = 8,
              **kw) -> JobsCollector:
        sim = SimulatedNVML(gpus=gpus, seed=0, state_file=str(sim_state.path), state_poll_interval=0)
        c = JobsCollector(sim, procfs=str(procfs), mapping_dir=str(mapping_dir or tmp_path / "map"), **kw)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.close()


def info(m: dict) -> set[tuple[str, str, str, str]]:
    """gpu_job_info as {(gpu, job_id, user, source)}; asserts value 1 and the sim's uuid."""
    out = set()
    for lab, v in m.get("gpu_job_info", []):
        assert v == 1
        assert lab["uuid"] == uuid_for(0, int(lab["gpu"]))
        out.add((lab["gpu"], lab["job_id"], lab["user"], lab["source"]))
    return out


def proc(pid: int, mem: int | None = None) -> dict:
    return {"pid": pid, "used_memory_bytes": mem} if mem is not None else {"pid": pid}


# -- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pid", sorted(FIXTURE_OWNERS))
def test_cgroup_layouts_of_slurm_v1_v2_and_kubernetes(pid):
    owner = parse_cgroup((PROC / str(pid) / "cgroup").read_text())
    expected = FIXTURE_OWNERS[pid]
    if expected is None or expected[1] == "environ":
        assert owner is None
    else:
        assert owner is not None
        assert (owner.job_id, owner.source) == expected[:2]


def test_cgroup_v1_carries_the_uid_and_v2_leaves_it_to_status():
    assert parse_cgroup((PROC / "1001" / "cgroup").read_text()) == Owner("4242", "cgroup", 61000)
    assert parse_cgroup((PROC / "2001" / "cgroup").read_text()) == Owner("4343", "cgroup", None)
    assert parse_status_uid((PROC / "2001" / "status").read_text()) == 61001


@pytest.mark.parametrize("text", [
    "",
    "garbage without colons\n",
    "0::/\n",
    "0::/system.slice/job_12.service\n",  # a systemd unit, not Slurm
    "0::/user.slice/job_7/x\n",
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnot_a_uid.slice/x\n",
    "0::/other/pod8dbc5577-d0e2-4706-8787-57d52c03ddf2/x\n",  # pod-like, not under kubepods
    "0::/system.slice/slurmstepd.scope/job_/step_0\n",
    "\x00\xff:::\n",
])
def test_cgroup_paths_that_name_no_job(text):
    assert parse_cgroup(text) is None


def test_kubernetes_static_pod_uid_is_a_config_hash():
    text = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0123456789abcdef0123456789abcdef.slice/x\n"
    assert parse_cgroup(text) == Owner("pod:0123456789abcdef0123456789abcdef", "kubernetes")


def test_environ_is_nul_separated_and_validated():
    assert parse_environ(b"A=1\0SLURM_JOB_ID=77\0B=2\0") == "77"
    assert parse_environ(b"SLURM_JOBID=78\0") == "78"
    assert parse_environ(b"SLURM_JOBID=78\0SLURM_JOB_ID=79\0") == "79"
    assert parse_environ(b"XSLURM_JOB_ID=1\0") is None
    assert parse_environ(b"SLURM_JOB_ID=12\"} x{\0") is None
    assert parse_environ(b"SLURM_JOB_ID=\xff\xfe\0") is None
    assert parse_environ(b"") is None
    # The read stopped mid-entry: a cut-off value is not trusted.
    assert parse_environ(b"A=1\0SLURM_JOB_ID=12", truncated=True) is None
    assert parse_environ(b"SLURM_JOB_ID=12\0PATH=/us", truncated=True) == "12"


def test_mapping_file_garbage_is_ignored_and_counted():
    data = (b"4242\n\n# comment\n  4243  \r\n4242\n12 13\n\"}evil\n\xff\xfe\n" + b"9" * 80 + b"\n"
            b"123_4\n123+1\n1234.server\n")
    jobs_, invalid = parse_mapping(data)
    assert jobs_ == ["4242", "4243", "123_4", "123+1", "1234.server"]
    assert invalid == 4
    assert parse_mapping(b"1\n2\n3", truncated=True) == (["1", "2"], 0)


# -- the collector on the fixture procfs ----------------------------------------------------
def test_every_fixture_process_is_attributed_on_its_gpu(make, sim_state):
    pids = sorted(FIXTURE_OWNERS)
    for i, pid in enumerate(pids):
        sim_state.gpu(i % 8, processes=sim_state.data["gpus"].get(str(i % 8), {}).get("processes", [])
                      + [proc(pid, 1000 + pid)])
    m = scrape_collector(make())
    expected = set()
    for i, pid in enumerate(pids):
        owner = FIXTURE_OWNERS[pid]
        if owner is not None:
            expected.add((str(i % 8), owner[0], owner[2], owner[1]))
    assert info(m) == expected
    unattributed = {lab["gpu"]: v for lab, v in m["gpu_unattributed_processes"]}
    assert unattributed == {str(g): float(sum(1 for i, p in enumerate(pids) if i % 8 == g
                                              and FIXTURE_OWNERS[p] is None)) for g in range(8)}


def test_memory_is_summed_per_job_and_gpu(make, sim_state):
    sim_state.gpu(0, processes=[proc(1001, 10_000), proc(1002, 5_000), proc(2001, 7), proc(5001, 3)])
    sim_state.gpu(1, processes=[proc(1001, 1)])
    m = scrape_collector(make())
    assert value(m, "gpu_process_memory_used_bytes", gpu="0", job_id="4242") == 15_000
    assert value(m, "gpu_process_memory_used_bytes", gpu="0", job_id="4343") == 7
    assert value(m, "gpu_process_memory_used_bytes", gpu="1", job_id="4242") == 1
    assert value(m, "gpu_unattributed_processes", gpu="0") == 1
    assert value(m, "gpu_unattributed_processes", gpu="1") == 0
    # one series per (gpu, job), however many processes
    assert info(m) == {("0", "4242", "61000", "cgroup"), ("0", "4343", "61001", "cgroup"),
                       ("1", "4242", "61000", "cgroup")}


def test_memory_unknown_to_nvml_leaves_the_series_out(make, sim_state):
    sim_state.gpu(0, processes=[1001])  # usedGpuMemory None (as under some MIG/WDDM setups)
    m = scrape_collector(make())
    assert info(m) == {("0", "4242", "61000", "cgroup")}
    assert "gpu_process_memory_used_bytes" not in m


def test_environ_fallback_can_be_disabled(make, sim_state):
    sim_state.gpu(0, processes=[proc(4001, 1)])
    assert info(scrape_collector(make())) == {("0", "4545", "61005", "environ")}
    m = scrape_collector(make(read_environ=False))
    assert "gpu_job_info" not in m
    assert value(m, "gpu_unattributed_processes", gpu="0") == 1


# -- mapping files -----------------------------------------------------------------------
def test_allocated_idle_gpu_is_attributed_through_its_mapping_file(make, sim_state, tmp_path):
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "0").write_text("4242\n")
    (mp / "5").write_text("4242\n")  # allocated to the same job, nothing running on it
    (mp / "6").write_text("777\n778\n")  # two jobs share GPU 6 (sharding)
    sim_state.gpu(0, processes=[proc(1001, 100)])
    m = scrape_collector(make(mapping_dir=mp))
    assert info(m) == {
        ("0", "4242", "61000", "cgroup"),  # the process is the more direct evidence
        ("5", "4242", "61000", "mapping"),  # user known from the job's process on GPU 0
        ("6", "777", "", "mapping"),
        ("6", "778", "", "mapping"),
    }
    assert value(m, "gpu_process_memory_used_bytes", gpu="5", job_id="4242") == 0
    assert value(m, "gpu_process_memory_used_bytes", gpu="0", job_id="4242") == 100


def test_mapping_job_memory_is_not_claimed_zero_beside_unattributed_processes(make, sim_state, tmp_path):
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "3").write_text("555\n")
    sim_state.gpu(3, processes=[proc(5001, 999)])
    m = scrape_collector(make(mapping_dir=mp))
    assert info(m) == {("3", "555", "", "mapping")}
    assert "gpu_process_memory_used_bytes" not in m
    assert value(m, "gpu_unattributed_processes", gpu="3") == 1


def test_mig_mapping_names_attribute_the_parent_gpu(make, tmp_path):
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "2.1").write_text("900\n")
    (mp / "2.3").write_text("901\n")
    (mp / "2").write_text("900\n")
    m = scrape_collector(make(mapping_dir=mp))
    assert info(m) == {("2", "900", "", "mapping"), ("2", "901", "", "mapping")}


def test_hostile_mapping_directory(make, tmp_path, caplog):
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "0").write_bytes(b"100\n\"} bad\n\xff\n")
    (mp / "1").write_bytes(b"101\n" + b"x" * (200 * 1024))  # huge: only the start is read
    (mp / "2").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text("666\n")
    os.mkfifo(mp / "3")  # must not block the collector
    (mp / "4").mkdir()
    (mp / ".4.123.tmp").write_text("667\n")  # the prolog's temp file
    (mp / "README").write_text("668\n")
    (mp / "99").write_text("669\n")  # no such GPU
    (mp / "5").write_text("")
    c = make(mapping_dir=mp)
    with caplog.at_level(logging.DEBUG, logger="gpufleet.collector.jobs"):
        for _ in range(3):
            t0 = time.monotonic()
            m = scrape_collector(c)
            assert time.monotonic() - t0 < 5
    assert info(m) == {("0", "100", "", "mapping"), ("1", "101", "", "mapping")}
    errors = {(lab["file"], lab["error"]): v for lab, v in m["gpufleet_exporter_jobs_read_errors_total"]}
    assert errors[("mapping", "invalid")] == 3
    assert errors[("mapping", "too_large")] == 3
    assert errors[("mapping", "ELOOP")] == 3  # the symlink, refused
    assert errors[("mapping", "EINVAL")] == 6  # the FIFO and the directory: not regular files
    # logged once per file and problem, not every collection
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("job mapping file has lines that are not job ids; ignored") == 1


def test_missing_mapping_directory_is_not_an_error(make, sim_state, tmp_path):
    sim_state.gpu(0, processes=[proc(1001, 1)])
    m = scrape_collector(make(mapping_dir=tmp_path / "absent"))
    assert info(m) == {("0", "4242", "61000", "cgroup")}
    assert "gpufleet_exporter_jobs_read_errors_total" not in m


# -- processes that go away, files that cannot be read, GPUs that are lost ---------------
def test_process_that_exited_before_the_proc_read_is_skipped(make, sim_state):
    sim_state.gpu(0, processes=[proc(999_999, 5), proc(1001, 1)])
    m = scrape_collector(make())
    assert info(m) == {("0", "4242", "61000", "cgroup")}
    assert value(m, "gpu_unattributed_processes", gpu="0") == 0
    assert value(m, "gpufleet_exporter_jobs_read_errors_total", file="cgroup", error="vanished") == 1


def test_process_that_exits_between_cgroup_and_environ_reads(make, sim_state, tmp_path, monkeypatch):
    procfs = tmp_path / "proc"
    shutil.copytree(PROC, procfs)
    sim_state.gpu(0, processes=[proc(4001, 1)])
    real = jobs.read_limited

    def racing(path, limit, **kw):
        if str(path).endswith("/4001/environ"):
            shutil.rmtree(procfs / "4001")
        return real(path, limit, **kw)

    monkeypatch.setattr(jobs, "read_limited", racing)
    m = scrape_collector(make(procfs=procfs))
    assert "gpu_job_info" not in m
    assert value(m, "gpu_unattributed_processes", gpu="0") == 0
    assert value(m, "gpufleet_exporter_jobs_read_errors_total", file="environ", error="vanished") == 1


def test_unreadable_environ_is_skipped_quietly_and_counted(make, sim_state, tmp_path, caplog):
    procfs = tmp_path / "proc"
    shutil.copytree(PROC, procfs)
    (procfs / "4001" / "environ").unlink()
    (procfs / "4001" / "environ").mkdir()  # reads fail with EISDIR, as EACCES would for a non-root agent
    sim_state.gpu(0, processes=[proc(4001, 1)])
    with caplog.at_level(logging.INFO, logger="gpufleet.collector.jobs"):
        m = scrape_collector(make(procfs=procfs))
    assert "gpu_job_info" not in m
    assert value(m, "gpu_unattributed_processes", gpu="0") == 1
    assert value(m, "gpufleet_exporter_jobs_read_errors_total", file="environ", error="EISDIR") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "mapping" not in r.getMessage()]


def test_environ_read_that_blocks_is_abandoned(make, sim_state, monkeypatch):
    release = threading.Event()
    real = jobs.read_limited
    calls = []

    def blocking(path, limit, **kw):
        if str(path).endswith("/4001/environ"):
            calls.append(path)
            release.wait(30)  # a process stuck in the driver holds its mm lock
        return real(path, limit, **kw)

    monkeypatch.setattr(jobs, "read_limited", blocking)
    sim_state.gpu(0, processes=[proc(4001, 1), proc(1001, 2)])
    c = make(environ_timeout=0.1)
    try:
        t0 = time.monotonic()
        m = scrape_collector(c)
        assert time.monotonic() - t0 < 2
        assert info(m) == {("0", "4242", "61000", "cgroup")}
        assert value(m, "gpufleet_exporter_jobs_read_errors_total", file="environ", error="timeout") == 1
        m = scrape_collector(c)  # not read again while the first read is stuck
        assert len(calls) == 1
        assert value(m, "gpufleet_exporter_jobs_read_errors_total", file="environ", error="timeout") == 2
    finally:
        release.set()
    time.sleep(0.2)
    m = scrape_collector(c)
    assert ("0", "4545", "61005", "environ") in info(m)


def test_lost_gpu_keeps_only_its_mapping_attribution(make, sim_state, tmp_path):
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "1").write_text("4242\n")
    sim_state.gpu(1, processes=[proc(1001, 10)])
    sim_state.gpu(2, processes=[proc(2001, 10)])
    c = make(mapping_dir=mp)
    assert ("1", "4242", "61000", "cgroup") in info(scrape_collector(c))
    sim_state.gpu(1, lost=True)
    m = scrape_collector(c)
    assert info(m) == {("1", "4242", "", "mapping"), ("2", "4343", "61001", "cgroup")}
    assert not [lab for lab, _ in m["gpu_unattributed_processes"] if lab["gpu"] == "1"]
    assert not [lab for lab, _ in m.get("gpu_process_memory_used_bytes", []) if lab["gpu"] == "1"]
    sim_state.gpu(1, lost=False)
    assert ("1", "4242", "61000", "cgroup") in info(scrape_collector(c))


def test_gpu_lost_before_it_was_ever_seen_is_skipped(make, sim_state, tmp_path):
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "4").write_text("1\n")
    sim_state.gpu(4, reset_required=True)
    sim_state.gpu(5, processes=[proc(1001, 1)], errors={"nvmlDeviceGetComputeRunningProcesses": "UNKNOWN"})
    m = scrape_collector(make(mapping_dir=mp))
    assert not [lab for lab, _ in m.get("gpu_job_info", []) if lab["gpu"] in ("4", "5")]
    # the process list failed on 5: no unattributed count claimed for it either
    assert sorted(lab["gpu"] for lab, _ in m["gpu_unattributed_processes"]) == ["0", "1", "2", "3", "6", "7"]


def test_driver_unload_fails_the_collector_until_it_is_back(make, sim_state):
    sim_state.gpu(0, processes=[proc(1001, 1)])
    c = make()
    assert info(scrape_collector(c))
    sim_state.set(driver_loaded=False)
    with pytest.raises(Exception, match="NVML is not available"):
        c.collect()
    with pytest.raises(Exception, match="driver not loaded"):
        c.collect()
    sim_state.set(driver_loaded=True)
    assert info(scrape_collector(c)) == {("0", "4242", "61000", "cgroup")}


# -- a real process through the real /proc --------------------------------------------------
def test_real_process_with_slurm_job_id_is_attributed_through_real_proc(make, sim_state):
    own = parse_cgroup(Path("/proc/self/cgroup").read_text())
    if own is not None:
        pytest.skip(f"the test itself runs inside {own.job_id}: its cgroup would win over environ")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_JOB_ID": "4242"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        sim_state.gpu(2, processes=[{"pid": child.pid, "used_memory_bytes": 123456}])
        c = make(procfs="/proc")
        m = scrape_collector(c)
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
        assert info(m) == {("2", "4242", user, "environ")}
        assert value(m, "gpu_process_memory_used_bytes", gpu="2", job_id="4242") == 123456
        child.kill()
        child.wait(10)
        m = scrape_collector(c)  # NVML has not noticed yet: the pid is gone from /proc
        assert "gpu_job_info" not in m
        assert value(m, "gpu_unattributed_processes", gpu="2") == 0
    finally:
        child.kill()
        child.wait(10)


# -- the agent's module protocol, promtool ------------------------------------------------
def test_module_protocol_builds_the_collector_from_flags(tmp_path, sim_state):
    sim_state.gpu(0, processes=[proc(1001, 1)])
    p = agent.build_parser()
    args = p.parse_args(["--gpu.backend=sim", f"--sim.state-file={sim_state.path}", f"--path.procfs={PROC}",
                         f"--collector.jobs.mapping-dir={tmp_path}", "--no-collector.jobs.read-environ"])
    c = jobs.create(args)
    try:
        assert (c.procfs, c.mapping_dir, c.read_environ) == (str(PROC), str(tmp_path), False)
        assert jobs.COLLECTOR_NAME == "jobs" and jobs.DEFAULT_ENABLED
        assert c.nvml is args._nvml  # the agent's one NVML backend, shared with the gpu collector
        assert info(scrape_collector(c)) == {("0", "4242", "61000", "cgroup")}
    finally:
        c.close()


def test_promtool_check_metrics_is_clean(make, sim_state, tmp_path):
    promtool = need_binary("promtool")
    mp = tmp_path / "map"
    mp.mkdir()
    (mp / "7").write_text("4242\nbad line\n")
    for i, pid in enumerate(sorted(FIXTURE_OWNERS)):
        sim_state.gpu(i % 7, processes=[proc(pid, 10)])
    sim_state.gpu(7, processes=[proc(999_999, 1)])
    text = render(make(mapping_dir=mp).collect())
    assert b"gpu_job_info" in text and b"gpufleet_exporter_jobs_read_errors_total" in text
    proc_ = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc_.returncode == 0 and not proc_.stdout.strip() and not proc_.stderr.strip(), proc_


# -- the Slurm prolog / epilog --------------------------------------------------------------
def run_script(script: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GPUFLEET_JOB_MAPPING_DIR": str(tmp_path / "map"),
            "GPUFLEET_PROGRESS_DIR": str(tmp_path / "progress")}
    return subprocess.run(["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=60)


def mapping(tmp_path: Path) -> dict[str, list[str]]:
    d = tmp_path / "map"
    return {f.name: f.read_text().splitlines() for f in sorted(d.iterdir()) if not f.name.startswith(".")} \
        if d.exists() else {}


def test_prolog_writes_one_line_per_gpu_of_the_job_and_epilog_removes_only_its_own(tmp_path):
    assert run_script(PROLOG, tmp_path, SLURM_JOB_ID="12", SLURM_JOB_GPUS="0,2-3").returncode == 0
    assert run_script(PROLOG, tmp_path, SLURM_JOB_ID="13", SLURM_JOB_GPUS="2").returncode == 0
    assert run_script(PROLOG, tmp_path, SLURM_JOB_ID="12", SLURM_JOB_GPUS="0,2-3").returncode == 0  # again
    assert mapping(tmp_path) == {"0": ["12"], "2": ["13", "12"], "3": ["12"]}
    assert [f.name for f in (tmp_path / "map").iterdir() if f.name.startswith(".") and f.name != ".lock"] == []
    assert oct((tmp_path / "map" / "0").stat().st_mode & 0o777) == "0o644"
    # The epilog searches every file: it needs no GPU list (slurmd restarts lose it).
    assert run_script(EPILOG, tmp_path, SLURM_JOB_ID="12").returncode == 0
    assert mapping(tmp_path) == {"2": ["13"]}
    assert run_script(EPILOG, tmp_path, SLURM_JOB_ID="13").returncode == 0
    assert mapping(tmp_path) == {}


def test_prolog_takes_the_gpu_list_slurm_gives_in_prolog_context(tmp_path):
    # SLURM_JOB_GPUS wins over CUDA_VISIBLE_DEVICES; UUIDs and MIG names are not file names.
    run_script(PROLOG, tmp_path, SLURM_JOB_ID="20", SLURM_JOB_GPUS="5", CUDA_VISIBLE_DEVICES="0")
    run_script(PROLOG, tmp_path, SLURM_JOB_ID="21", CUDA_VISIBLE_DEVICES="1,GPU-3f1c9a7e-51b2,MIG-abc, 6")
    run_script(PROLOG, tmp_path, SLURM_JOB_ID="22", SLURM_STEP_GPUS="7")
    run_script(PROLOG, tmp_path, SLURM_JOB_ID="23", GPU_DEVICE_ORDINAL="4")
    run_script(PROLOG, tmp_path, SLURM_JOB_ID="24")  # a CPU-only job
    assert mapping(tmp_path) == {"1": ["21"], "4": ["23"], "5": ["20"], "6": ["21"], "7": ["22"]}


@pytest.mark.parametrize("job", ["", "abc", "12;rm -rf /", "../x", "1\n2"])
def test_prolog_and_epilog_ignore_a_bad_job_id_and_never_fail(tmp_path, job):
    (tmp_path / "map").mkdir()
    (tmp_path / "map" / "0").write_text("12\n")
    assert run_script(PROLOG, tmp_path, SLURM_JOB_ID=job, SLURM_JOB_GPUS="0,1").returncode == 0
    assert run_script(EPILOG, tmp_path, SLURM_JOB_ID=job).returncode == 0
    assert mapping(tmp_path) == {"0": ["12"]}


def test_prolog_exits_zero_when_the_mapping_dir_cannot_be_made(tmp_path):
    (tmp_path / "map").write_text("a file where the directory should be")
    r = run_script(PROLOG, tmp_path, SLURM_JOB_ID="12", SLURM_JOB_GPUS="0")
    assert r.returncode == 0  # a failing Prolog would drain the node
    assert run_script(EPILOG, tmp_path, SLURM_JOB_ID="12").returncode == 0


def test_concurrent_prologs_sharing_a_gpu_lose_no_line(tmp_path):
    procs = [subprocess.Popen(["bash", str(PROLOG)], env={
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GPUFLEET_JOB_MAPPING_DIR": str(tmp_path / "map"),
        "GPUFLEET_PROGRESS_DIR": "", "SLURM_JOB_ID": str(100 + i), "SLURM_JOB_GPUS": "0,1"})
        for i in range(24)]
    assert all(p.wait(60) == 0 for p in procs)
    got = mapping(tmp_path)
    assert sorted(got["0"]) == sorted(got["1"]) == sorted(str(100 + i) for i in range(24))
    procs = [subprocess.Popen(["bash", str(EPILOG)], env={
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GPUFLEET_JOB_MAPPING_DIR": str(tmp_path / "map"),
        "GPUFLEET_PROGRESS_DIR": "", "SLURM_JOB_ID": str(100 + i)}) for i in range(0, 24, 2)]
    assert all(p.wait(60) == 0 for p in procs)
    got = mapping(tmp_path)
    assert sorted(got["0"]) == sorted(got["1"]) == sorted(str(100 + i) for i in range(1, 24, 2))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root, as slurmd's prolog has")
def test_prolog_gives_the_job_its_progress_dir_and_epilog_removes_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "progress").mkdir()
    (tmp_path / "progress" / "31").symlink_to(outside)  # planted before the job started
    r = run_script(PROLOG, tmp_path, SLURM_JOB_ID="31", SLURM_JOB_GPUS="0", SLURM_JOB_UID="61000",
                   SLURM_JOB_GID="61000")
    assert r.returncode == 0
    d = tmp_path / "progress" / "31"
    assert d.is_dir() and not d.is_symlink()
    assert (d.stat().st_uid, d.stat().st_gid) == (61000, 61000)
    assert outside.stat().st_uid == 0  # the symlink's target was never chowned
    (d / "0.json").write_text("{}")
    run_script(EPILOG, tmp_path, SLURM_JOB_ID="31")
    assert not d.exists() and outside.exists()
    assert run_script(PROLOG, tmp_path, SLURM_JOB_ID="32", SLURM_JOB_UID="61000",
                      GPUFLEET_PROGRESS_DIR="").returncode == 0
    assert not (tmp_path / "progress" / "32").exists()  # empty setting: no progress directory


def test_collector_reads_what_the_prolog_wrote(make, tmp_path):
    run_script(PROLOG, tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_GPUS="3,4")
    c = make(mapping_dir=tmp_path / "map")
    assert info(scrape_collector(c)) == {("3", "4242", "", "mapping"), ("4", "4242", "", "mapping")}
    run_script(EPILOG, tmp_path, SLURM_JOB_ID="4242")
    assert "gpu_job_info" not in scrape_collector(c)


def test_sharing_nvml_with_the_gpu_collector(sim_state, tmp_path):
    from exporters.gpu import GpuCollector

    sim_state.gpu(0, processes=[proc(1001, 1)])
    sim = SimulatedNVML(gpus=2, seed=0, state_file=str(sim_state.path), state_poll_interval=0)
    g = GpuCollector(sim, event_timeout_ms=20)
    j = JobsCollector(sim, procfs=str(PROC), mapping_dir=str(tmp_path))
    try:
        assert len(scrape_collector(g)["gpu_up"]) == 2
        assert info(scrape_collector(j)) == {("0", "4242", "61000", "cgroup")}
        j.close()  # NVML init is reference-counted: the gpu collector keeps working
        assert len(scrape_collector(g)["gpu_up"]) == 2
    finally:
        g.close()


def test_argparse_namespace_without_jobs_flags_uses_defaults(tmp_path, sim_state):
    args = argparse.Namespace(gpu_backend="sim", sim_gpus=2, sim_model="h100-sxm5-80gb", sim_seed=0,
                              sim_state=str(sim_state.path), procfs=str(PROC))
    c = jobs.create(args)
    try:
        assert c.mapping_dir == jobs.DEFAULT_MAPPING_DIR and c.read_environ
    finally:
        c.close()
