"""Hung mounts never hang the collection, never pile up threads, and recover.

The first tests use a REAL blocked filesystem: a FUSE mount served by
tests/fusefs.py whose STATFS requests the test leaves unanswered, so the
collector's ``statfs(2)`` blocks in the kernel exactly as on a dead NFS server.
They are skipped only where FUSE cannot be mounted (no /dev/fuse, not root);
the injected variants below (a statvfs function that blocks on an Event) run
everywhere and pin the same behaviour.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from exporters.collector import CollectorRunner
from exporters.storage import Filters, StorageCollector
from exporters.storage_parse import parse_mountinfo
from exporters.storage_statfs import StatfsPool
from tests import fusefs
from tests.conftest import parse, scrape_collector, value, wait_for
from tests.fusefs import FuseFS, fuse_available
from tests.test_storage import FakeStatvfs, mountinfo_line, tree

TIMEOUT = 0.3  # statfs timeout used here; no assertion depends on how long anything takes


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("storage-statfs-") and t.is_alive()]


def stuck_of(m: dict, mountpoint: str) -> float:
    return value(m, "filesystem_stuck", mountpoint=mountpoint)


def sizes_of(m: dict) -> set[str]:
    return {lab["mountpoint"] for lab, _ in m.get("filesystem_size_bytes", [])}


@pytest.fixture
def fuse_mount(tmp_path):
    why = fuse_available()
    if why:
        pytest.skip(f"FUSE unavailable ({why}); the injected-statvfs tests cover this")
    mnt = tmp_path / "hung mnt"  # a space, so mountinfo's \040 escape is exercised on a real line
    mnt.mkdir()
    fs = FuseFS(mnt)
    try:
        fs.mount()
    except OSError as exc:
        fs.unmount()
        pytest.skip(f"FUSE mount not permitted here: {exc}")
    try:
        yield fs
    finally:
        fs.unmount()  # aborts the connection first: a blocked statfs returns at once
    assert fs.errors == []


def test_real_hung_fuse_mount_is_stuck_not_probed_twice_and_recovers(tmp_path, fuse_mount, caplog):
    fs = fuse_mount
    ok = tmp_path / "ok"
    ok.mkdir()
    # The FUSE mount's line exactly as the kernel prints it, plus a healthy directory.
    tree(tmp_path, {"proc/1/mountinfo": fs.mountinfo_line() + mountinfo_line(900, "8:99", ok, "ext4", "/dev/sdz")})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), "/", statfs_timeout=TIMEOUT,
                         statfs_workers=2, filters=Filters(mountpoint_include="^" + str(tmp_path)))
    hung = str(fs.mountpoint)
    lab = {"mountpoint": hung, "device": "gpufleettest", "fstype": "fuse.gpufleettest"}
    try:
        with caplog.at_level(logging.INFO, logger="gpufleet.collector.storage"):
            m = scrape_collector(c)
            assert value(m, "filesystem_stuck", **lab) == 0
            assert value(m, "filesystem_size_bytes", **lab) == 1000 * 4096
            assert value(m, "filesystem_avail_bytes", **lab) == 500 * 4096
            assert value(m, "filesystem_files_free", **lab) == 200
            assert len(pool_threads()) == 2

            fs.block_statfs()
            before = fs.statfs_requests
            m = scrape_collector(c)  # returns although statfs is blocked in the kernel
            assert value(m, "filesystem_stuck", **lab) == 1
            assert hung not in sizes_of(m)
            assert stuck_of(m, str(ok)) == 0 and str(ok) in sizes_of(m)
            assert value(m, "gpufleet_exporter_storage_statfs_blocked_workers") == 1
            assert fs.statfs_requests == before + 1 and fs.pending == 1

            for _ in range(4):
                m = scrape_collector(c)
                assert value(m, "filesystem_stuck", **lab) == 1
                assert str(ok) in sizes_of(m)  # the other worker keeps measuring
            assert fs.statfs_requests == before + 1  # never probed again while blocked
            assert len(pool_threads()) == 2  # no thread piled up

            fs.release_statfs()
            m = wait_for(lambda: (s := scrape_collector(c)) and value(s, "filesystem_stuck", **lab) == 0 and s,
                         timeout=20)
            assert value(m, "filesystem_size_bytes", **lab) == 1000 * 4096
            assert value(m, "gpufleet_exporter_storage_statfs_blocked_workers") == 0
            assert len(pool_threads()) == 2
        msgs = [r.getMessage() for r in caplog.records]
        assert msgs.count("filesystem stuck: statfs did not answer in time; not probed again until it does") == 1
        assert msgs.count("filesystem answers statfs again") == 1
    finally:
        c.close()


def test_real_hung_fuse_mount_keeps_the_runner_successful(tmp_path, fuse_mount):
    fs = fuse_mount
    tree(tmp_path, {"proc/1/mountinfo": fs.mountinfo_line()})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), "/", statfs_timeout=TIMEOUT,
                         statfs_workers=1, filters=Filters(mountpoint_include="^" + str(tmp_path)))
    runner = CollectorRunner(c, interval=60, timeout=10 * TIMEOUT + 5)
    try:
        fs.block_statfs()
        for _ in range(3):
            runner.run_once()
            st = runner.state()
            assert st.success, st.last_error
            assert value(parse(st.payload), "filesystem_stuck", mountpoint=str(fs.mountpoint)) == 1
        assert fs.statfs_requests == 1
    finally:
        fs.release_statfs()
        c.close()


def test_fuse_helper_cleans_up_a_blocked_mount(tmp_path):
    """A test that dies with statfs blocked must not leave a hung mount behind (df, CI)."""
    why = fuse_available()
    if why:
        pytest.skip(f"FUSE unavailable ({why})")
    mnt = tmp_path / "m"
    mnt.mkdir()
    fs = FuseFS(mnt).mount()
    fs.block_statfs()
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(_statvfs_or_error(str(mnt))), daemon=True)
    t.start()
    wait_for(lambda: fs.pending, timeout=20)
    fs.unmount()
    t.join(20)
    assert not t.is_alive() and isinstance(result[0], OSError)
    mounts, _ = parse_mountinfo(Path("/proc/self/mountinfo").read_bytes())
    assert str(mnt) not in {m.mountpoint for m in mounts}


def _statvfs_or_error(path: str) -> object:
    try:
        return os.statvfs(path)
    except OSError as exc:
        return exc


# -- the same behaviour with an injected blocking statvfs (runs everywhere) -----------------------


class Gate:
    """statvfs that blocks on the paths it is told to, until released."""

    def __init__(self, *hung: str):
        self.hung = set(hung)
        self.release = threading.Event()
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, path: str) -> os.statvfs_result:
        with self.lock:
            self.calls[path] = self.calls.get(path, 0) + 1
        if path in self.hung:
            self.release.wait(120)
        return FakeStatvfs.result(path)


@pytest.fixture
def gated(tmp_path):
    made: list[tuple[StorageCollector, Gate]] = []

    def make(mounts: list[str], hung: list[str], workers: int) -> tuple[StorageCollector, Gate]:
        mi = "".join(mountinfo_line(i + 1, f"0:{40 + i}", mp, "nfs4", f"srv:{mp}") for i, mp in enumerate(mounts))
        tree(tmp_path, {"proc/1/mountinfo": mi})
        gate = Gate(*hung)
        c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=gate, statfs_timeout=TIMEOUT,
                             statfs_workers=workers)
        made.append((c, gate))
        return c, gate

    yield make
    for c, gate in made:
        gate.release.set()
        c.close()


def test_injected_hung_statvfs_is_stuck_not_probed_twice_and_recovers(gated):
    c, gate = gated(["/a", "/hung", "/z"], ["/hung"], workers=2)
    m = scrape_collector(c)
    assert stuck_of(m, "/hung") == 1 and "/hung" not in sizes_of(m)
    assert stuck_of(m, "/a") == 0 and stuck_of(m, "/z") == 0 and sizes_of(m) == {"/a", "/z"}
    for _ in range(5):
        m = scrape_collector(c)
        assert stuck_of(m, "/hung") == 1
    assert gate.calls == {"/a": 6, "/hung": 1, "/z": 6}
    assert len(c.pool.threads()) == 2 and c.pool.blocked(TIMEOUT) == 1
    gate.release.set()
    m = wait_for(lambda: (s := scrape_collector(c)) and stuck_of(s, "/hung") == 0 and s, timeout=20)
    assert sizes_of(m) == {"/a", "/hung", "/z"}
    assert value(m, "filesystem_size_bytes", mountpoint="/hung") == FakeStatvfs.result("/hung").f_blocks * 4096
    assert len(c.pool.threads()) == 2


def test_every_worker_blocked_leaves_other_mounts_waiting_not_stuck(gated, caplog):
    c, gate = gated(["/a-hung", "/b-ok"], ["/a-hung"], workers=1)
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.storage"):
        m = scrape_collector(c)
        m = scrape_collector(c)
    assert stuck_of(m, "/a-hung") == 1
    assert stuck_of(m, "/b-ok") == 0 and sizes_of(m) == set()  # not measured, not accused
    assert value(m, "gpufleet_exporter_storage_statfs_blocked_workers") == 1
    assert value(m, "gpufleet_exporter_storage_statfs_workers") == 1
    assert gate.calls == {"/a-hung": 1}  # /b-ok's single probe waits in the queue, not duplicated
    assert [r.getMessage() for r in caplog.records].count(
        "filesystem not measured: every statfs worker is blocked by a stuck mount") == 1
    gate.release.set()
    m = wait_for(lambda: (s := scrape_collector(c)) and sizes_of(s) == {"/a-hung", "/b-ok"} and s, timeout=20)
    assert stuck_of(m, "/a-hung") == 0 and stuck_of(m, "/b-ok") == 0
    assert len(c.pool.threads()) == 1


def test_mount_that_disappears_while_blocked_keeps_its_worker_until_it_returns(tmp_path):
    gate = Gate("/gone")
    pool = StatfsPool(2, statvfs=gate)
    try:
        assert pool.probe(["/gone", "/x"], TIMEOUT)["/gone"].state == "stuck"
        out = pool.probe(["/x"], TIMEOUT)  # /gone was unmounted (lazily): no longer asked for
        assert out["/x"].state == "ok" and pool.blocked(TIMEOUT) == 1
        gate.release.set()
        wait_for(lambda: pool.blocked(TIMEOUT) == 0, timeout=20)
        pool.probe(["/x"], TIMEOUT)
        assert gate.calls == {"/gone": 1, "/x": 3}
    finally:
        gate.release.set()
        pool.close()


def test_submit_queues_the_probes_and_wait_gives_what_probe_gives():
    """The collector parses NFS/Lustre/disks between submit() and wait(): the probes run
    meanwhile, and a hung one is still stuck (not probed twice) when the answers are collected."""
    gate = Gate("/hung")
    pool = StatfsPool(2, statvfs=gate)
    try:
        pending = pool.submit(["/hung", "/ok"], TIMEOUT)
        wait_for(lambda: gate.calls.get("/ok") == 1 and gate.calls.get("/hung") == 1, timeout=20)
        out = pending.wait()
        assert out["/hung"].state == "stuck" and out["/ok"].state == "ok"
        again = pool.submit(["/hung", "/ok"], TIMEOUT).wait()
        assert again["/hung"].state == "stuck" and again["/ok"].state == "ok"
        assert gate.calls == {"/hung": 1, "/ok": 2}
    finally:
        gate.release.set()
        pool.close()


def test_close_stops_idle_workers_and_cancels_queued_probes():
    gate = Gate("/h")
    pool = StatfsPool(1, statvfs=gate)
    pool.probe(["/h", "/q"], TIMEOUT)  # /q waits behind /h
    pool.close()
    gate.release.set()
    wait_for(lambda: not pool.threads(), timeout=20)
    assert gate.calls == {"/h": 1}  # the queued probe was cancelled, not run after close
    with pytest.raises(RuntimeError):
        pool.probe(["/x"], TIMEOUT)


def test_runner_with_injected_hung_mount_stays_successful(gated):
    c, gate = gated(["/hung", "/ok"], ["/hung"], workers=2)
    runner = CollectorRunner(c, interval=60, timeout=10 * TIMEOUT + 5)
    for _ in range(3):
        runner.run_once()
        st = runner.state()
        assert st.success, st.last_error
        m = parse(st.payload)
        assert stuck_of(m, "/hung") == 1 and stuck_of(m, "/ok") == 0
    assert gate.calls["/hung"] == 1


_KILLED_CHILD = """
import os, sys, threading, time
sys.path.insert(0, {repo!r})
from tests.fusefs import FuseFS
fs = FuseFS({mnt!r}).mount()
fs.block_statfs()
threading.Thread(target=os.statvfs, args=({mnt!r},), daemon=True).start()
while not fs.pending:
    time.sleep(0.01)
print("blocked", flush=True)
time.sleep(600)
"""


def test_killed_test_process_leaves_no_hung_mount(tmp_path):
    """SIGKILL skips finally and atexit, and a process with a thread stuck on its own FUSE server could
    never exit; the server is a child that dies with it, closing /dev/fuse, which aborts the connection."""
    import signal
    import subprocess
    import sys

    why = fuse_available()
    if why:
        pytest.skip(f"FUSE unavailable ({why})")
    mnt = tmp_path / "killed"
    mnt.mkdir()
    repo = str(Path(__file__).resolve().parent.parent)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD.format(repo=repo, mnt=str(mnt))],
                             stdout=subprocess.PIPE, text=True)
    t: threading.Thread | None = None
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "blocked"
        child.send_signal(signal.SIGKILL)
        child.wait(30)  # it can exit: its blocked thread was released
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(_statvfs_or_error(str(mnt))), daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "statfs on the dead mount hung"
        assert isinstance(result[0], OSError)  # ENOTCONN: an error at once, not a hang
    finally:
        if child.poll() is None:
            child.kill()
        _force_cleanup(mnt)
        child.wait(30)
        if t is not None:
            t.join(30)
    mounts, _ = parse_mountinfo(Path("/proc/self/mountinfo").read_bytes())
    assert str(mnt) not in {m.mountpoint for m in mounts}


def _force_cleanup(mnt: Path) -> None:
    """Last resort, should the test above fail: abort the connection through fusectl and detach."""
    mounts, _ = parse_mountinfo(Path("/proc/self/mountinfo").read_bytes())
    for m in mounts:
        if m.mountpoint == str(mnt):
            fusefs.abort_connection(m.dev.split(":")[1])
            fusefs.detach(mnt)


def test_a_batch_shared_by_the_workers_probes_every_mount_once_around_hung_ones():
    """The workers drain one collection's probes from a shared batch: mounts hung in the middle
    of it hold one worker each, the free workers take every other mount, each probed once, and
    a statvfs error is that mount's outcome only."""
    hung = {f"/m{i:02d}" for i in (3, 17)}
    paths = [f"/m{i:02d}" for i in range(30)]

    class Failing(Gate):
        def __call__(self, path):
            if path == "/m09":
                with self.lock:
                    self.calls[path] = self.calls.get(path, 0) + 1
                raise OSError(5, "Input/output error")
            return super().__call__(path)

    gate = Failing(*hung)
    pool = StatfsPool(3, statvfs=gate)
    try:
        out = pool.probe(paths, TIMEOUT)
        assert {p for p, o in out.items() if o.state == "stuck"} == hung
        assert out["/m09"].state == "error" and out["/m09"].error.errno == 5
        assert {p for p, o in out.items() if o.state == "ok"} == set(paths) - hung - {"/m09"}
        assert gate.calls == dict.fromkeys(paths, 1)
        assert pool.blocked(TIMEOUT) == 2
        again = pool.probe(paths, TIMEOUT)  # one free worker left: still every mount, hung ones not again
        assert {p for p, o in again.items() if o.state == "ok"} == set(paths) - hung - {"/m09"}
        assert all(gate.calls[p] == (1 if p in hung else 2) for p in paths)
    finally:
        gate.release.set()
        pool.close()
