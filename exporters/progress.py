"""Training progress for gpufleet: a tiny client for training scripts (stdlib only).

Usage::

    from exporters.progress import ProgressReporter

    progress = ProgressReporter()  # job id, rank and spool dir from the environment
    for step, batch in enumerate(loader):
        loss = train_step(batch)
        progress.report(step=step, loss=loss, samples_per_second=batch_size / step_time)

The reporter keeps the latest values and writes them, at most once per
``min_interval`` (1 s), as a small JSON file ``<spool>/<job_id>/<rank>.json``
that the node agent's ``progress`` collector turns into ``training_*`` series.
Values given in one call are merged with those of earlier calls, so a loss
reported every 100 steps stays next to a step reported every step.

It never raises into the training loop and never slows it: every error is
swallowed and counted (``reporter.errors``, ``reporter.last_error``), the
directory is created on the first write, a write is a temp file plus an atomic
``os.replace`` (a reader never sees half a file; no fsync: losing the last
second of progress in a power cut is fine), and values are converted to numbers
only when written, so passing a CUDA tensor costs a device sync at most once
per interval, not every step. Pending values are written by ``flush()``, by
``close()`` and at interpreter exit.

Defaults: the job id comes from ``GPUFLEET_JOB_ID``, else ``SLURM_JOB_ID``
(without one the reporter is disabled: ``reporter.enabled`` is False); the
rank from ``RANK``, else ``SLURM_PROCID``, else ``LOCAL_RANK``, else 0; the
spool directory from ``GPUFLEET_PROGRESS_DIR``, else ``/run/gpufleet/progress``
(the Slurm prolog in scripts/slurm creates ``<spool>/<job_id>`` owned by the
job's user and the epilog removes it).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

DEFAULT_SPOOL_DIR = "/run/gpufleet/progress"
FORMAT_VERSION = 1
FIELDS = ("step", "loss", "samples_per_second", "tokens_per_second")

# Shared with the collectors: what may become a job_id or rank label value.
# Slurm ids (123, 123_4, 123+1), "pod:<uid>", other schedulers' "1234.server";
# never quotes, braces, commas, spaces, newlines or a leading dot.
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:-]{0,63}")
RANK_RE = re.compile(r"0|[1-9][0-9]{0,6}")
RANK_FILE_RE = re.compile(r"(0|[1-9][0-9]{0,6})\.json")


def _env_first(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip():
            return v.strip()
    return None


def _number(value: Any) -> float | int | None:
    """A JSON-able number from an int, float, numpy scalar or 0-d tensor; None otherwise."""
    if value is None or isinstance(value, bool | str | bytes):
        return None
    if isinstance(value, int):
        return value if abs(value) < 2**63 else float(value)
    if isinstance(value, float):
        return value
    item = getattr(value, "item", None)  # numpy scalars, torch tensors (one device sync)
    if callable(item):
        value = item()
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
    return float(value)


class ProgressReporter:
    """Writes one rank's training progress for the node agent. See the module docstring."""

    def __init__(
        self,
        job_id: str | int | None = None,
        rank: int | str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        *,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.errors = 0
        self.writes = 0
        self.last_error: str | None = None
        self.enabled = False
        self.job_id = ""
        self.rank = ""
        self.path = ""
        self.directory = ""
        self.min_interval = min_interval
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()  # guards the values; held for microseconds
        self._write_lock = threading.Lock()  # one writer at a time; others never wait for it
        self._values: dict[str, Any] = {}
        self._time: float | None = None
        self._dirty = False
        self._last_write = -math.inf
        self._dir_ready = False
        try:
            job = str(job_id) if job_id is not None else _env_first("GPUFLEET_JOB_ID", "SLURM_JOB_ID")
            if rank is None:
                rank = _env_first("RANK", "SLURM_PROCID", "LOCAL_RANK") or "0"
            rank_text = str(rank).strip()
            spool = os.fspath(spool_dir) if spool_dir is not None else (
                os.environ.get("GPUFLEET_PROGRESS_DIR") or DEFAULT_SPOOL_DIR)
            if job is None:
                self.last_error = "no job id (set SLURM_JOB_ID or GPUFLEET_JOB_ID): progress not reported"
            elif not JOB_ID_RE.fullmatch(job):
                self.last_error = f"job id {job!r} is not usable as a label: progress not reported"
            elif not RANK_RE.fullmatch(rank_text):
                self.last_error = f"rank {rank_text!r} is not a non-negative integer: progress not reported"
            else:
                self.job_id, self.rank = job, rank_text
                self.directory = os.path.join(spool, job)
                self.path = os.path.join(self.directory, f"{rank_text}.json")
                self.enabled = True
                _register_exit_flush(self)
        except Exception as exc:  # noqa: BLE001 - never raise into the training script
            self._fail(exc)

    # -- public ----------------------------------------------------------------------
    def report(self, step: Any = None, loss: Any = None, samples_per_second: Any = None,
               tokens_per_second: Any = None, **extra: Any) -> bool:
        """Record the latest values; write them if the last write is ``min_interval`` old.

        Returns True if this call wrote the file. Never raises (unknown keywords are ignored).
        """
        if not self.enabled:
            return False
        try:
            now = self._clock()
            with self._lock:
                for name, v in (("step", step), ("loss", loss), ("samples_per_second", samples_per_second),
                                ("tokens_per_second", tokens_per_second)):
                    if v is not None:
                        self._values[name] = v
                self._time = now
                self._dirty = True
                due = self._monotonic() - self._last_write >= self.min_interval
            if due:
                return self._write()
            return False
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return False

    def flush(self) -> bool:
        """Write pending values now (ignoring the rate limit). Never raises."""
        if not self.enabled:
            return False
        try:
            return self._write()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return False

    def close(self) -> None:
        """Write what is pending; later reports are ignored."""
        self.flush()
        self.enabled = False

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _write(self) -> bool:
        if not self._write_lock.acquire(blocking=False):
            return False  # another thread is writing right now; the values stay pending
        try:
            with self._lock:
                if not self._dirty:
                    return False
                values, when = dict(self._values), self._time
                self._dirty = False
                self._last_write = self._monotonic()
            payload: dict[str, Any] = {"version": FORMAT_VERSION, "job_id": self.job_id, "rank": int(self.rank),
                                       "time": when, "pid": os.getpid()}
            for name in FIELDS:
                if name in values:
                    try:
                        num = _number(values[name])
                    except Exception as exc:  # noqa: BLE001 - a bad value drops only itself
                        self._fail(exc)
                        continue
                    if num is not None:
                        payload[name] = num
            data = json.dumps(payload, separators=(",", ":")).encode()
            if not self._dir_ready:
                try:
                    os.makedirs(self.directory, mode=0o755, exist_ok=True)
                except BaseException:
                    with self._lock:
                        self._dirty = True
                    raise
                self._dir_ready = True
            tmp = os.path.join(self.directory, f".{self.rank}.json.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                self._dir_ready = False  # the directory may be gone (epilog, cleanup): recreate next time
                with self._lock:
                    self._dirty = True  # still pending: the next report or flush tries again
                raise
            self.writes += 1
            return True
        finally:
            self._write_lock.release()


# -- flush at exit, without keeping reporters alive ---------------------------------------
_reporters: weakref.WeakSet[ProgressReporter] = weakref.WeakSet()
_exit_lock = threading.Lock()
_exit_registered = False


def _flush_all() -> None:
    for r in list(_reporters):
        r.flush()


def _register_exit_flush(r: ProgressReporter) -> None:
    global _exit_registered
    with _exit_lock:
        _reporters.add(r)
        if not _exit_registered:
            atexit.register(_flush_all)
            _exit_registered = True
