"""Training progress: the reporter training scripts import, and the collector that reads
its spool, against concurrent writers, hostile files, staleness and Slurm's view."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporters import agent, progress_collector
from exporters.collector import render
from exporters.progress import JOB_ID_RE, ProgressReporter
from exporters.progress_collector import ProgressCollector, SlurmJobCheck, parse_progress
from tests.conftest import REPO, need_binary, parse, scrape_collector, value, wait_for


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def reporter(spool: Path, job: str = "4242", rank: int = 0, **kw) -> ProgressReporter:
    return ProgressReporter(job_id=job, rank=rank, spool_dir=spool, **kw)


def ignored(m: dict) -> dict[str, float]:
    return {lab["reason"]: v for lab, v in m["gpufleet_exporter_progress_files_ignored"]}


def write(path: Path, data: bytes | str | dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


# -- the reporter ----------------------------------------------------------------------------
def test_report_writes_the_latest_values_atomically(tmp_path):
    clock = FakeClock()
    r = reporter(tmp_path, clock=clock)
    assert not (tmp_path / "4242").exists()  # created lazily, on the first write
    assert r.report(step=10, loss=2.5, samples_per_second=512.0, tokens_per_second=1.5e6)
    data = json.loads((tmp_path / "4242" / "0.json").read_text())
    assert data == {"version": 1, "job_id": "4242", "rank": 0, "time": clock.t, "pid": os.getpid(), "step": 10,
                    "loss": 2.5, "samples_per_second": 512.0, "tokens_per_second": 1.5e6}
    assert [p.name for p in (tmp_path / "4242").iterdir()] == ["0.json"]  # no temp file left
    assert r.errors == 0 and r.writes == 1


def test_writes_are_rate_limited_and_values_merged(tmp_path):
    mono = FakeClock(100.0)
    r = reporter(tmp_path, monotonic=mono)
    path = tmp_path / "4242" / "0.json"
    assert r.report(step=1, loss=9.0)
    for step in range(2, 500):
        assert not r.report(step=step)
    assert r.writes == 1
    assert json.loads(path.read_text())["step"] == 1
    mono.t += 1.0
    assert r.report(step=500)
    data = json.loads(path.read_text())
    assert (data["step"], data["loss"]) == (500, 9.0)  # the loss reported earlier is kept
    assert not r.report(step=501, loss=1.0)
    assert r.flush()  # pending values written now
    assert json.loads(path.read_text())["step"] == 501
    assert not r.flush()  # nothing pending
    assert r.writes == 3


def test_defaults_come_from_the_environment(tmp_path, monkeypatch):
    for var in ("GPUFLEET_JOB_ID", "RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("GPUFLEET_PROGRESS_DIR", str(tmp_path))
    r = ProgressReporter()
    assert (r.job_id, r.rank, r.path) == ("777", "5", str(tmp_path / "777" / "5.json"))
    monkeypatch.setenv("RANK", "12")  # torchrun's global rank first
    assert ProgressReporter().rank == "12"
    monkeypatch.setenv("GPUFLEET_JOB_ID", "pod:c0ffee00-1234-4abc-8def-0123456789ab")
    assert ProgressReporter().job_id == "pod:c0ffee00-1234-4abc-8def-0123456789ab"


@pytest.mark.parametrize("job,rank", [(None, 0), ("../../etc", 0), ('1"}', 0), ("", 0), ("12", -1), ("12", "a"),
                                      ("12", "01")])
def test_reporter_without_a_usable_job_id_or_rank_is_disabled(tmp_path, monkeypatch, job, rank):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("GPUFLEET_JOB_ID", raising=False)
    r = ProgressReporter(job_id=job, rank=rank, spool_dir=tmp_path)
    assert not r.enabled and r.last_error
    assert not r.report(step=1) and not r.flush()
    assert list(tmp_path.iterdir()) == []


def test_reporter_never_raises_when_the_spool_cannot_be_written(tmp_path):
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    mono = FakeClock()
    r = reporter(blocker, monotonic=mono)
    for i in range(3):
        assert r.report(step=i, loss=1.0) is False
        mono.t += 2
    assert r.errors == 3 and "NotADirectoryError" in r.last_error
    assert r.flush() is False and r.errors == 4  # the values stay pending: a flush tries again
    r.close()
    r.report(step=9)  # after close: ignored, still no exception


def test_bad_values_never_raise_and_drop_only_themselves(tmp_path):
    class Exploding:
        def item(self):
            raise RuntimeError("a tensor with more than one element")

    r = reporter(tmp_path)
    assert r.report(step="ten", loss=Exploding(), samples_per_second=True, tokens_per_second=3, unknown=1)
    data = json.loads((tmp_path / "4242" / "0.json").read_text())
    assert "step" not in data and "loss" not in data and "samples_per_second" not in data
    assert data["tokens_per_second"] == 3
    assert r.errors == 1


def test_tensor_like_values_are_converted_only_when_written(tmp_path):
    class Tensor:
        items = 0

        def __init__(self, v):
            self.v = v

        def item(self):
            Tensor.items += 1  # a device sync on a real CUDA tensor
            return self.v

    mono = FakeClock()
    r = reporter(tmp_path, monotonic=mono)
    for i in range(100):
        r.report(step=i, loss=Tensor(float(i)))
    assert Tensor.items == 1
    r.flush()
    assert Tensor.items == 2
    assert json.loads((tmp_path / "4242" / "0.json").read_text())["loss"] == 99.0


def test_nan_and_inf_loss_are_written_and_read_back_as_such(tmp_path):
    r = reporter(tmp_path, min_interval=0)
    r.report(step=3, loss=float("nan"))
    assert math.isnan(parse_progress((tmp_path / "4242" / "0.json").read_bytes())["loss"])
    r.report(step=4, loss=float("-inf"))
    assert parse_progress((tmp_path / "4242" / "0.json").read_bytes())["loss"] == -math.inf


def test_directory_removed_under_the_reporter_is_recreated(tmp_path):
    mono = FakeClock()
    r = reporter(tmp_path, monotonic=mono)
    r.report(step=1)
    for f in (tmp_path / "4242").iterdir():
        f.unlink()
    (tmp_path / "4242").rmdir()
    mono.t += 2
    assert r.report(step=2) is False and r.errors == 1  # this write fails ...
    mono.t += 2
    assert r.report(step=3) and json.loads((tmp_path / "4242" / "0.json").read_text())["step"] == 3  # ... next works


def test_pending_values_are_written_at_interpreter_exit(tmp_path):
    script = textwrap.dedent(f"""
        from exporters.progress import ProgressReporter
        r = ProgressReporter(job_id="5", rank=3, spool_dir={str(tmp_path)!r}, min_interval=3600)
        for step in range(1000):
            r.report(step=step, loss=1.0 / (step + 1))
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
    assert json.loads((tmp_path / "5" / "3.json").read_text())["step"] == 999


def test_client_is_stdlib_only_and_importable_without_prometheus_client():
    script = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None  # any import of it now fails
        before = set(sys.modules)
        import exporters.progress
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        third_party = sorted(m for m in new if m not in sys.stdlib_module_names and m not in ("exporters",))
        assert not third_party, third_party
        import exporters
        assert exporters.__file__
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# -- concurrent writers never tear a file ---------------------------------------------------
def _hammer(spool: str, job: str, rank: int, n: int, seed: int) -> None:
    r = ProgressReporter(job_id=job, rank=rank, spool_dir=spool, min_interval=0)
    for i in range(n):
        r.report(step=i, loss=seed + i / n, samples_per_second=float(i), tokens_per_second=1e6 + i)
    assert r.errors == 0, r.last_error


def test_concurrent_thread_and_process_writers_never_produce_a_torn_file(tmp_path):
    spool = str(tmp_path)
    stop = threading.Event()
    reads: list[int] = []
    problems: list[str] = []
    c = ProgressCollector(spool, stale_after=1e9)

    def reader() -> None:
        while not stop.is_set():
            m = scrape_collector(c)
            bad = ignored(m)
            if bad["invalid"] or bad["unreadable"] or bad["too_large"]:
                problems.append(str(bad))
            reads.append(len(m.get("training_step", [])))
            for path in Path(spool).glob("*/*.json"):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                if parse_progress(data) is None:
                    problems.append(repr(data[:100]))

    t_reader = threading.Thread(target=reader)
    t_reader.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(spool, "77", rank % 2, 400, rank)) for rank in range(4)]
    shared = ProgressReporter(job_id="77", rank=1, spool_dir=spool, min_interval=0)
    threads = [threading.Thread(target=_hammer, args=(spool, "77", 0, 400, 10 + k)) for k in range(3)]
    threads += [threading.Thread(target=lambda: [shared.report(step=i, loss=0.5) for i in range(400)])
                for _ in range(3)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    t_reader.join(30)
    assert not problems, problems[:5]
    assert shared.errors == 0
    assert len(reads) > 5
    m = scrape_collector(c)
    assert len(m["training_step"]) == 2
    assert sorted(p.name for p in (tmp_path / "77").iterdir()) == ["0.json", "1.json"]  # temp files all renamed


# -- the collector -------------------------------------------------------------------------
def test_collector_exposes_each_rank(tmp_path):
    clock = FakeClock()
    for rank, loss in ((0, 2.0), (1, 2.1)):
        r = reporter(tmp_path, rank=rank, clock=clock)
        r.report(step=100, loss=loss, samples_per_second=256.0, tokens_per_second=524288.0)
    r = reporter(tmp_path, job="4243", rank=0, clock=clock)
    r.report(step=7)
    m = scrape_collector(ProgressCollector(str(tmp_path), clock=clock))
    assert value(m, "training_step", job_id="4242", rank="1") == 100
    assert value(m, "training_loss", job_id="4242", rank="1") == 2.1
    assert value(m, "training_throughput_samples_per_second", job_id="4242", rank="0") == 256
    assert value(m, "training_throughput_tokens_per_second", job_id="4242", rank="0") == 524288
    assert value(m, "training_last_step_timestamp_seconds", job_id="4242", rank="0") == clock.t
    assert value(m, "training_step", job_id="4243", rank="0") == 7
    assert not [lab for lab, _ in m["training_loss"] if lab["job_id"] == "4243"]  # never reported: absent
    assert set(ignored(m).values()) == {0}


def test_nan_and_infinite_loss_are_exposed_for_alerts(tmp_path):
    write(tmp_path / "1" / "0.json", '{"step": 5, "loss": NaN}')
    write(tmp_path / "1" / "1.json", '{"step": 5, "loss": Infinity}')
    write(tmp_path / "1" / "2.json", '{"step": 5, "loss": -Infinity}')
    text = render(ProgressCollector(str(tmp_path), stale_after=1e9).collect()).decode()
    assert 'training_loss{job_id="1",rank="0"} NaN' in text
    assert 'training_loss{job_id="1",rank="1"} +Inf' in text
    assert 'training_loss{job_id="1",rank="2"} -Inf' in text


def test_stale_jobs_are_dropped_and_optionally_deleted(tmp_path):
    clock = FakeClock(time.time())
    old = write(tmp_path / "10" / "0.json", {"step": 1, "time": clock.t - 7200})
    os.utime(old, (clock.t - 7200, clock.t - 7200))
    os.utime(tmp_path / "10", (clock.t - 7200, clock.t - 7200))
    write(tmp_path / "11" / "0.json", {"step": 2, "time": clock.t})
    (tmp_path / "12").mkdir()  # the prolog's fresh directory, nothing reported yet
    (tmp_path / "13").mkdir()  # an old empty one
    os.utime(tmp_path / "13", (clock.t - 7200, clock.t - 7200))
    c = ProgressCollector(str(tmp_path), stale_after=3600, clock=clock)
    m = scrape_collector(c)
    assert [lab["job_id"] for lab, _ in m["training_step"]] == ["11"]
    assert ignored(m)["stale"] == 1
    assert (tmp_path / "10" / "0.json").exists()  # not deleted without the flag
    c = ProgressCollector(str(tmp_path), stale_after=3600, delete_stale=True, clock=clock)
    m = scrape_collector(c)
    assert [lab["job_id"] for lab, _ in m["training_step"]] == ["11"]
    assert not (tmp_path / "10").exists()
    assert (tmp_path / "12").is_dir() and (tmp_path / "13").is_dir()  # empty dirs stay for the reporter
    clock.t += 3601
    scrape_collector(c)
    assert not (tmp_path / "11").exists()


def test_staleness_follows_the_file_not_the_time_it_claims(tmp_path):
    clock = FakeClock(time.time())
    p = write(tmp_path / "20" / "0.json", {"step": 1, "time": clock.t + 10 * 365 * 86400})  # far future
    os.utime(p, (clock.t - 7200, clock.t - 7200))
    os.utime(tmp_path / "20", (clock.t - 7200, clock.t - 7200))
    m = scrape_collector(ProgressCollector(str(tmp_path), stale_after=3600, clock=clock))
    assert "training_step" not in m


def test_hostile_spool(tmp_path, caplog):
    spool = tmp_path / "spool"
    secret = write(tmp_path / "secret.json", {"step": 666})
    os.makedirs(tmp_path / "elsewhere")
    write(tmp_path / "elsewhere" / "0.json", {"step": 667})
    good = spool / "30"
    write(good / "0.json", {"step": 1, "loss": 0.5})
    write(good / "1.json", b"{" + b" " * (200 * 1024) + b"}")  # huge
    (good / "2.json").symlink_to(secret)  # symlink to a file elsewhere
    os.link(secret, good / "3.json")  # hard link
    os.mkfifo(good / "4.json")  # must not block
    (good / "5.json").mkdir()
    write(good / "6.json", b"not json")
    write(good / "7.json", b"[1, 2, 3]")
    write(good / "8.json", {"step": "12", "loss": "NaN", "samples_per_second": [1], "tokens_per_second": True,
                            "time": "now"})
    write(good / "9.json", b"[" * 30_000 + b"]" * 30_000)  # deep nesting, under the size cap
    write(good / "10.json", b'{"step": -5, "samples_per_second": 1e999, "loss": 1e999, "time": -1}')
    write(good / "11.json", b'{"step": ' + b"9" * 5000 + b"}")  # a huge integer
    write(good / "12.json", b"\xff\xfe\x00garbage")
    write(good / "13.json", b"")  # empty
    write(good / "14.json", b'{"step": 3, "junk": {"nested": [1, {"a": null}]}}')  # extra keys ignored
    write(good / "01.json", {"step": 1})  # would duplicate rank 1
    write(good / "abc.json", {"step": 1})
    write(good / "0.json.bak", {"step": 1})
    write(good / ".0.json.123.456.tmp", {"step": 1})  # the reporter's temp file
    (spool / "31").symlink_to(tmp_path / "elsewhere")  # a job dir that is a symlink
    write(spool / '32"} evil{x="y' / "0.json", {"step": 1})  # label injection in the job id
    write(spool / "33\nx" / "0.json", {"step": 1})
    write(spool / "34", b"a file where a job directory belongs")
    write(spool / ".hidden" / "0.json", {"step": 1})
    c = ProgressCollector(str(spool), stale_after=1e9)
    with caplog.at_level(logging.DEBUG, logger="gpufleet.collector.progress"):
        t0 = time.monotonic()
        m = scrape_collector(c)
        assert time.monotonic() - t0 < 5
    assert {(lab["job_id"], lab["rank"]): v for lab, v in m["training_step"]} == {("30", "0"): 1, ("30", "14"): 3}
    assert {(lab["job_id"], lab["rank"]) for lab, _ in m["training_loss"]} == {("30", "0"), ("30", "10")}
    assert value(m, "training_loss", rank="10") == math.inf
    # rank 8 has no usable field (invalid); rank 10 only its loss (1e999 reads as inf), shown with the
    # file's mtime as its timestamp since its own is negative
    assert {lab["rank"] for lab, _ in m["training_last_step_timestamp_seconds"]} == {"0", "10", "14"}
    assert ignored(m) == {"invalid_name": 5, "unsafe": 6, "too_large": 1, "invalid": 7, "unreadable": 0,
                          "stale": 0, "ended": 0, "over_limit": 0}
    assert secret.read_text() == '{"step": 666}'


def test_too_many_files_are_capped_and_logged_once(tmp_path, caplog):
    for job in range(20):
        for rank in range(5):
            write(tmp_path / str(job) / f"{rank}.json", {"step": rank})
    c = ProgressCollector(str(tmp_path), stale_after=1e9, max_files=30)
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.progress"):
        for _ in range(3):
            m = scrape_collector(c)
    assert len(m["training_step"]) < 30
    assert ignored(m)["over_limit"] > 0
    assert len([r for r in caplog.records if "max-files" in r.getMessage()]) == 1


def test_missing_spool_is_not_an_error(tmp_path):
    m = scrape_collector(ProgressCollector(str(tmp_path / "absent")))
    assert "training_step" not in m and set(ignored(m).values()) == {0}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_parse_progress_never_raises_on_bytes(data):
    out = parse_progress(data)
    assert out is None or all(isinstance(v, float) for v in out.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["step", "loss", "time", "samples_per_second", "tokens_per_second", "x"]),
                       json_values))
def test_parse_progress_keeps_only_well_typed_fields(obj):
    out = parse_progress(json.dumps(obj).encode())
    for key, v in (out or {}).items():
        raw = obj[key]
        assert isinstance(raw, int | float) and not isinstance(raw, bool)
        if key != "loss":
            assert math.isfinite(v) and v >= 0


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_job_id_pattern_admits_only_label_safe_text(name):
    if JOB_ID_RE.fullmatch(name):
        assert not set(name) & set('"\\\n{},= /\t')
        assert not name.startswith(".")


# -- Slurm's view: ended jobs go at once, running ones stay however stale -----------------
@pytest.fixture
def fake_squeue(tmp_path):
    """A squeue that answers from a file: lines '<id> <STATE>', or 'FAIL' to fail."""
    answers = tmp_path / "squeue.answers"
    calls = tmp_path / "squeue.calls"
    script = tmp_path / "squeue"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$@" >> {calls}
        ids=""
        while [ $# -gt 0 ]; do case "$1" in -j) ids="$2"; shift;; esac; shift; done
        if grep -qx FAIL {answers}; then echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1; fi
        n=0
        IFS=, read -r -a want <<< "$ids"
        for id in "${{want[@]}}"; do
            line=$(grep "^$id " {answers})
            if [ -n "$line" ]; then echo "$line"; n=$((n+1)); fi
        done
        if [ ${{#want[@]}} -eq 1 ] && [ $n -eq 0 ]; then
            echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
        fi
        exit 0
    """))
    script.chmod(0o755)
    answers.write_text("")
    return script, answers, calls


def test_slurm_check_drops_ended_jobs_and_keeps_running_ones_however_stale(tmp_path, fake_squeue):
    squeue, answers, calls = fake_squeue
    spool = tmp_path / "spool"
    clock = FakeClock(time.time())
    for job in ("100", "101", "102", "103", "pod:c0ffee00-1234-4abc-8def-0123456789ab"):
        p = write(spool / job / "0.json", {"step": 1})
        os.utime(p, (clock.t - 7200, clock.t - 7200))
        os.utime(spool / job, (clock.t - 7200, clock.t - 7200))
    write(spool / "104" / "0.json", {"step": 1})  # fresh
    answers.write_text("100 RUNNING\n101 COMPLETED\n104 CANCELLED\n102 COMPLETING\n")
    check = SlurmJobCheck(squeue=str(squeue), min_gap=0)
    c = ProgressCollector(str(spool), stale_after=3600, slurm_check=check, delete_stale=True, clock=clock)
    m = scrape_collector(c)  # starts the lookup in the background; until it answers, staleness rules
    assert [lab["job_id"] for lab, _ in m["training_step"]] == ["104"]
    assert ignored(m)["stale"] == 5
    assert len(list(spool.iterdir())) == 5  # Slurm jobs are not deleted before Slurm says they ended
    check.wait()
    m = scrape_collector(c)
    # 100 and 102 run (hung: kept); 101 and 104 ended; 103 unknown to Slurm (past MinJobAge);
    # the pod is no Slurm job: staleness decided, and it was deleted at the first collection.
    assert sorted(lab["job_id"] for lab, _ in m["training_step"]) == ["100", "102"]
    assert ignored(m)["ended"] == 3 and ignored(m)["stale"] == 0
    assert value(m, "gpufleet_exporter_progress_slurm_check_success") == 1
    assert sorted(p.name for p in spool.iterdir()) == ["100", "102"]
    assert "-j 100,101,102,103,104" in calls.read_text()


def test_single_job_unknown_to_slurm_counts_as_ended(tmp_path, fake_squeue):
    squeue, answers, _ = fake_squeue
    check = SlurmJobCheck(squeue=str(squeue))
    assert check.check(["55"]) == {"55": "ended"}
    answers.write_text("55 PENDING\n")
    assert check.check(["55"]) == {"55": "running"}


def test_failing_squeue_leaves_the_decision_to_staleness(tmp_path, fake_squeue, caplog):
    squeue, answers, _ = fake_squeue
    spool = tmp_path / "spool"
    write(spool / "100" / "0.json", {"step": 1})
    answers.write_text("FAIL\n")
    check = SlurmJobCheck(squeue=str(squeue), min_gap=0, interval=0)
    c = ProgressCollector(str(spool), slurm_check=check)
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.progress"):
        for _ in range(3):
            scrape_collector(c)
            check.wait()
    m = scrape_collector(c)
    assert value(m, "training_step", job_id="100") == 1
    assert value(m, "gpufleet_exporter_progress_slurm_check_success") == 0
    assert len([r for r in caplog.records if "squeue" in r.getMessage()]) == 1
    assert "Unable to contact" in c.status()
    missing = SlurmJobCheck(squeue=str(tmp_path / "no-such-squeue"))
    assert missing.check(["1"]) is None and missing.success is False


def test_squeue_lookups_are_rate_limited_off_the_scrape_path(tmp_path, fake_squeue):
    squeue, answers, calls = fake_squeue
    answers.write_text("100 RUNNING\n")
    write(tmp_path / "spool" / "100" / "0.json", {"step": 1})
    check = SlurmJobCheck(squeue=str(squeue), interval=3600, min_gap=3600)
    c = ProgressCollector(str(tmp_path / "spool"), slurm_check=check)
    for _ in range(20):
        scrape_collector(c)
    check.wait()
    wait_for(lambda: check.success)
    assert len(calls.read_text().splitlines()) == 1


# -- the agent's module protocol, promtool ------------------------------------------------
def test_module_protocol_builds_the_collector_from_flags(tmp_path):
    p = agent.build_parser()
    args = p.parse_args([f"--collector.progress.dir={tmp_path}", "--collector.progress.stale-after=15m",
                         "--collector.progress.delete-stale", "--collector.progress.slurm-check",
                         "--collector.progress.squeue=/opt/slurm/bin/squeue", "--collector.progress.max-files=10"])
    c = progress_collector.create(args)
    assert (c.spool_dir, c.stale_after, c.delete_stale, c.max_files) == (str(tmp_path), 900.0, True, 10)
    assert c.slurm is not None and c.slurm.squeue == "/opt/slurm/bin/squeue"
    c = progress_collector.create(p.parse_args([]))
    assert (c.stale_after, c.delete_stale, c.slurm) == (3600.0, False, None)
    assert progress_collector.COLLECTOR_NAME == "progress" and progress_collector.DEFAULT_ENABLED


def test_promtool_check_metrics_is_clean(tmp_path, fake_squeue):
    promtool = need_binary("promtool")
    squeue, answers, _ = fake_squeue
    answers.write_text("1 RUNNING\n")
    r = reporter(tmp_path / "spool", job="1", rank=0)
    r.report(step=10, loss=float("nan"), samples_per_second=1.0, tokens_per_second=2.0)
    write(tmp_path / "spool" / "1" / "1.json", b"garbage")
    check = SlurmJobCheck(squeue=str(squeue), min_gap=0)
    c = ProgressCollector(str(tmp_path / "spool"), slurm_check=check)
    c.collect()
    check.wait()
    text = render(c.collect())
    assert b"training_loss" in text and b"gpufleet_exporter_progress_slurm_check_success" in text
    assert parse(text)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc
