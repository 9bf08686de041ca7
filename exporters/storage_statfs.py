"""statfs(2) with a deadline, on a fixed pool of threads that hung mounts cannot multiply.

A statfs on a mount whose server is gone (NFS ``hard``, Lustre, a dead FUSE
daemon) blocks in the kernel, often uninterruptibly, until the server answers.
Python cannot cancel it. So each probe runs on one of a fixed number of daemon
worker threads and the caller waits only until its deadline:

- a probe that runs past the timeout makes its mount *stuck*; the blocked
  thread stays with that one probe (it occupies one worker, never more);
- a mount whose earlier probe has not returned is not probed again, so a hung
  mount never queues a second probe and threads never pile up;
- when the blocked call finally returns, its worker takes the next probe and
  the mount's next collection measures it afresh (recovery).

If hung mounts hold every worker, the other mounts' probes wait in the queue
(one per mount at most) and are reported as *waiting*: not measured, but not
accused of hanging either (``blocked_workers`` tells the two situations apart).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

OK = "ok"
ERROR = "error"
STUCK = "stuck"
WAITING = "waiting"


class _Batch:
    """The probes one collection queued: the workers take them from ``todo`` in turn (one queue
    item per worker woken, not one per mount: thirty mounts, at most ``workers`` wake-ups), and
    the caller sleeps once for all of them instead of waking for each."""

    __slots__ = ("todo", "left", "_lock", "_latch")

    def __init__(self) -> None:
        self.todo: deque[_Probe] = deque()
        self.left = 0
        self._lock = threading.Lock()
        self._latch = threading.Lock()  # held until the last probe finishes
        self._latch.acquire()

    def finish(self) -> None:
        with self._lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self._latch.release()

    def wait(self, timeout: float) -> None:
        if self._latch.acquire(timeout=max(0.0, timeout)):
            self._latch.release()


class _Probe:
    """One statvfs of one path; ``finished`` is set (and the latch released) when it returned."""

    __slots__ = ("path", "finished", "_latch", "started", "result", "error", "cancelled", "batch")

    def __init__(self, path: str, batch: _Batch | None = None):
        self.path = path
        self.finished = False
        # A lock held until the probe finishes: a one-shot event without threading.Event's
        # Condition (built in Python, for every probe of every collection).
        self._latch = threading.Lock()
        self._latch.acquire()
        self.started: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.batch = batch

    def finish(self) -> None:
        self.finished = True
        self._latch.release()
        if self.batch is not None:
            self.batch.finish()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the probe to finish; whether it has."""
        if not self.finished and self._latch.acquire(timeout=max(0.0, timeout)):
            self._latch.release()
        return self.finished


@dataclass(frozen=True)
class Outcome:
    state: str  # ok | error | stuck | waiting
    result: Any = None  # os.statvfs_result when ok
    error: BaseException | None = None  # when error
    blocked_for: float = 0.0  # seconds the probe has been running, when stuck


class StatfsPool:
    """A fixed set of daemon threads running statvfs with per-mount deadlines."""

    def __init__(self, workers: int = 4, statvfs: Callable[[str], Any] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic, name: str = "storage-statfs"):
        if workers < 1:
            raise ValueError("statfs workers must be at least 1")
        self.workers = workers
        self._statvfs = statvfs
        self._clock = clock
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._inflight: dict[str, _Probe] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.submitted = 0  # probes handed to the workers
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            todo = batch.todo
            while todo:
                try:
                    probe = todo.popleft()
                except IndexError:  # another worker took the last one
                    break
                if probe.cancelled:
                    probe.finish()
                    continue
                probe.started = self._clock()
                try:
                    probe.result = self._statvfs(probe.path)
                except BaseException as exc:  # noqa: BLE001 - reported to the caller, never kills the worker
                    probe.error = exc
                finally:
                    probe.finish()

    def threads(self) -> list[threading.Thread]:
        """The worker threads still alive (a closed pool's blocked workers stay until their call returns)."""
        return [t for t in self._threads if t.is_alive()]

    def blocked(self, timeout: float) -> int:
        """Probes running for longer than ``timeout`` (each holds one worker)."""
        now = self._clock()
        with self._lock:
            return sum(1 for p in self._inflight.values()
                       if not p.finished and p.started is not None and now - p.started >= timeout)

    def probe(self, paths: Iterable[str], timeout: float) -> dict[str, Outcome]:
        """statvfs every path, waiting at most ``timeout`` per probe once it runs.

        The call returns after about ``timeout`` when some probe hangs, and at
        most about twice that when a worker freed up late in the wait.
        """
        return self.submit(paths, timeout).wait()

    def submit(self, paths: Iterable[str], timeout: float) -> Pending:
        """Queue the probes now and return at once; ``wait()`` on the result gives what ``probe``
        gives, with the deadline counted from this call. The caller does other work meanwhile
        (the storage collector parses NFS and Lustre statistics while the workers run statfs)."""
        if self._closed:
            raise RuntimeError("statfs pool is closed")
        paths = list(dict.fromkeys(paths))
        start = self._clock()
        probes: dict[str, _Probe] = {}
        batch = _Batch()
        with self._lock:
            for path in paths:
                earlier = self._inflight.get(path)
                if earlier is not None and not earlier.finished:
                    probes[path] = earlier  # still blocked or queued: never probe a mount twice at once
                    continue
                batch.left += 1
                p = _Probe(path, batch)
                self._inflight[path] = p
                probes[path] = p
                batch.todo.append(p)
                self.submitted += 1
            # Forget finished probes of mounts that went away (blocked ones stay: they hold a worker).
            for path in [k for k, p in self._inflight.items() if k not in probes and p.finished]:
                del self._inflight[path]
        for _ in range(min(self.workers, len(batch.todo))):
            self._queue.put(batch)
        return Pending(self, probes, batch, start + timeout, timeout)

    def _outcome(self, p: _Probe) -> Outcome:
        if p.finished:
            if p.error is not None:
                return Outcome(ERROR, error=p.error)
            return Outcome(OK, result=p.result)
        if p.started is None:
            return Outcome(WAITING)
        return Outcome(STUCK, blocked_for=self._clock() - p.started)

    def close(self, join_timeout: float = 1.0) -> None:
        """Stop the workers. Blocked ones cannot be stopped; they are daemons and end with their call."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for p in self._inflight.values():
                if p.started is None:
                    p.cancelled = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + join_timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


class Pending:
    """Probes queued by ``StatfsPool.submit``; ``wait()`` collects their outcomes."""

    def __init__(self, pool: StatfsPool, probes: dict[str, _Probe], batch: _Batch, deadline: float, timeout: float):
        self._pool = pool
        self._probes = probes
        self._batch = batch
        self._deadline = deadline
        self._timeout = timeout

    def wait(self) -> dict[str, Outcome]:
        clock, timeout, deadline = self._pool._clock, self._timeout, self._deadline
        if self._batch.left:
            self._batch.wait(deadline - clock())  # the common case: every probe answers at once
        out: dict[str, Outcome] = {}
        for path, p in self._probes.items():
            now = clock()
            if p.started is not None and now - p.started >= timeout:
                wait = 0.0  # blocked since an earlier collection: no need to wait again
            elif p.started is not None:
                wait = p.started + timeout - now
            else:
                wait = deadline - now
            if wait > 0:
                p.wait(wait)
            if not p.finished and p.started is not None and p.started > deadline - timeout:
                # It got a worker late in the wait: give it its full timeout (at most 2x in all).
                p.wait(p.started + timeout - clock())
            out[path] = self._pool._outcome(p)
        return out
