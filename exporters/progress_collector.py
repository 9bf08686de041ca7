"""The progress collector: training progress that jobs report through exporters/progress.py.

Reads ``<--collector.progress.dir>/<job_id>/<rank>.json`` (one small JSON file
per rank, replaced atomically by the reporter) and exposes, per job and rank,
``training_step``, ``training_loss``, ``training_throughput_samples_per_second``,
``training_throughput_tokens_per_second`` and
``training_last_step_timestamp_seconds``. A NaN or infinite loss is exposed as
such (``NaN``, ``+Inf``): alerts on diverging training need to see it.

When a job is dropped:

* ``--collector.progress.slurm-check``: jobs with a numeric (Slurm) id are
  looked up with ``squeue`` on a background thread (at most every minute, with a
  timeout; never from the scrape path). A job Slurm reports finished, or no
  longer knows, is dropped at once; a job Slurm reports running is kept however
  old its files are, because a running job that stopped stepping is exactly
  the hung-training case an alert must keep seeing.
* Otherwise (no check, squeue failing, non-Slurm ids) a job whose newest file
  is older than ``--collector.progress.stale-after`` (default 1h: long enough for
  a "no progress for 10 minutes" alert to fire and page before the series go)
  is dropped.
* The Slurm epilog in scripts/slurm removes a job's directory when it ends,
  which drops it at the next collection.

``--collector.progress.delete-stale`` also deletes the files of dropped jobs
(with the Slurm check on, a Slurm job's files only once Slurm says it ended).

The spool is written by users, so everything in it is treated as hostile: job
directory names must match a strict id pattern and rank files ``<n>.json``
(label values can carry nothing but ``[A-Za-z0-9_.+:-]``); job directories that
are symlinks are ignored and files are opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` relative to the directory descriptor, so a swapped-in symlink,
FIFO or device is never read; hard-linked files are refused (a user could link
a root-only file into the spool); at most 64 KiB of a file is read; values of
the wrong type are ignored field by field; the number of entries examined per
collection is capped. What was ignored, and why, is in
``gpufleet_exporter_progress_files_ignored{reason}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from exporters.cli import duration, non_negative_int
from exporters.collector import Collector, CollectorError, MetricSpec
from exporters.progress import DEFAULT_SPOOL_DIR, JOB_ID_RE, RANK_FILE_RE

log = logging.getLogger("gpufleet.collector.progress")

COLLECTOR_NAME = "progress"
COLLECTOR_HELP = "Training progress (step, loss, throughput) reported by jobs through exporters.progress"
DEFAULT_ENABLED = True
DEFAULT_STALE_AFTER = 3600.0
DEFAULT_MAX_FILES = 4096
FILE_LIMIT = 64 * 1024

JOB = ("job_id", "rank")
IGNORE_REASONS = ("invalid_name", "unsafe", "too_large", "invalid", "unreadable", "stale", "ended",
                  "over_limit")
# Slurm job states after which a job's progress files are of no further use.
FINISHED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "TIMEOUT",
})
_SLURM_ID = re.compile(r"[0-9]{1,20}")

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("training_step", "gauge", "Last training step the rank reported.", JOB),
    MetricSpec("training_loss", "gauge", "Training loss at the last reported step (NaN and Inf kept as reported).",
               JOB),
    MetricSpec("training_throughput_samples_per_second", "gauge", "Training throughput the rank reported, in samples.",
               JOB),
    MetricSpec("training_throughput_tokens_per_second", "gauge", "Training throughput the rank reported, in tokens.",
               JOB),
    MetricSpec("training_last_step_timestamp_seconds", "gauge",
               "Unix time of the rank's last reported step (the file's mtime if it carries none).", JOB),
    MetricSpec("gpufleet_exporter_progress_files_ignored", "gauge",
               "Progress spool entries the last collection ignored, by reason: invalid_name, unsafe (symlink, "
               "hard link, not a regular file), too_large, invalid (not a progress JSON object), unreadable, "
               "stale, ended (Slurm says the job finished), over_limit (--collector.progress.max-files).",
               ("reason",)),
    MetricSpec("gpufleet_exporter_progress_slurm_check_success", "gauge",
               "1 if the last squeue lookup of the spool's jobs succeeded (--collector.progress.slurm-check).", (),
               "--collector.progress.slurm-check"),
)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def parse_progress(data: bytes) -> dict[str, float] | None:
    """The usable fields of one progress file; None if it is not a progress JSON object.

    Field by field: ``step`` and the throughputs must be finite and non-negative,
    ``time`` finite and positive, ``loss`` any number (NaN and infinities kept).
    """
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    out: dict[str, float] = {}
    for key in ("step", "samples_per_second", "tokens_per_second"):
        v = _num(obj.get(key))
        if v is not None and math.isfinite(v) and v >= 0:
            out[key] = v
    loss = _num(obj.get("loss"))
    if loss is not None:
        out["loss"] = loss
    t = _num(obj.get("time"))
    if t is not None and math.isfinite(t) and t > 0:
        out["time"] = t
    return out or None


class SlurmJobCheck:
    """Asks squeue, off the scrape path, which of the spool's jobs Slurm still runs."""

    def __init__(self, squeue: str = "squeue", interval: float = 60.0, min_gap: float = 10.0,
                 timeout: float = 10.0, max_ids: int = 256, logger: logging.Logger | None = None):
        self.squeue = squeue
        self.interval = interval
        self.min_gap = min_gap
        self.timeout = timeout
        self.max_ids = max_ids
        self.log = logger or log
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}  # job id -> "running" | "ended"
        self._last = -math.inf
        self._thread: threading.Thread | None = None
        self.success: bool | None = None
        self.last_error: str | None = None

    def states(self, ids: Iterable[str]) -> dict[str, str]:
        """The last known state of each id ("running"/"ended"); starts a lookup when one is due."""
        wanted = sorted({i for i in ids if _SLURM_ID.fullmatch(i)})
        with self._lock:
            known = dict(self._known)
            busy = self._thread is not None and self._thread.is_alive()
            elapsed = time.monotonic() - self._last
            new = any(i not in known for i in wanted)
            due = bool(wanted) and not busy and (elapsed >= self.interval or (new and elapsed >= self.min_gap))
            if due:
                self._last = time.monotonic()
                self._thread = threading.Thread(target=self._refresh, args=(wanted,), name="progress-squeue",
                                                daemon=True)
                self._thread.start()
        return {i: known[i] for i in wanted if i in known}

    def _refresh(self, ids: list[str]) -> None:
        result = self.check(ids)
        with self._lock:
            # On failure forget what we knew: staleness decides until squeue answers again.
            self._known = result if result is not None else {}

    def _run(self, ids: list[str]) -> tuple[int, str, str]:
        proc = subprocess.run(
            [self.squeue, "-h", "--states=all", "-o", "%A %T", "-j", ",".join(ids)],
            capture_output=True, text=True, timeout=self.timeout, check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr

    def check(self, ids: list[str]) -> dict[str, str] | None:
        """Synchronous lookup; None when squeue cannot answer (ids then stay unknown)."""
        ids = ids[: self.max_ids]
        if not ids:
            return {}
        try:
            rc, out, err = self._run(ids)
            if rc != 0 and "invalid job id" in err.lower():
                # squeue -j with one id asks for that job only and fails when it is gone;
                # with several it filters the job list. Ask one by one to tell which.
                if len(ids) == 1:
                    return self._ok({ids[0]: "ended"})
                if len(ids) > 32:
                    raise CollectorError("squeue rejected the job list and it is too long to ask one by one")
                merged: dict[str, str] = {}
                for i in ids:
                    one = self.check([i])
                    if one is None:
                        return None
                    merged.update(one)
                return self._ok(merged)
            if rc != 0:
                raise CollectorError(f"squeue exited {rc}: {err.strip()[:200]}")
        except (OSError, subprocess.SubprocessError, CollectorError) as exc:
            msg = str(exc) if isinstance(exc, CollectorError) else f"{type(exc).__name__}: {exc}"
            if msg != self.last_error:
                self.log.warning("squeue lookup failed; staleness decides", extra={"collector": "progress",
                                                                                  "reason": msg})
            self.success, self.last_error = False, msg
            return None
        states: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ids:
                states[parts[0]] = "ended" if parts[1].upper() in FINISHED_STATES else "running"
        for i in ids:
            states.setdefault(i, "ended")  # slurmctld no longer knows it (past MinJobAge)
        return self._ok(states)

    def _ok(self, states: dict[str, str]) -> dict[str, str]:
        if self.last_error is not None:
            self.log.info("squeue lookup works again", extra={"collector": "progress"})
        self.success, self.last_error = True, None
        return states

    def wait(self, timeout: float = 10.0) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)


@dataclass
class _Rank:
    rank: str
    values: dict[str, float]
    mtime: float


@dataclass
class _Job:
    job_id: str
    ranks: list[_Rank]
    files: int  # rank files and anything else in the directory (for counting drops)
    newest: float


def _open_file(name: str, dir_fd: int) -> tuple[bytes, os.stat_result, bool]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise _Unsafe
        if st.st_size > FILE_LIMIT:
            return b"", st, True
        data = os.read(fd, FILE_LIMIT + 1)
        return data[:FILE_LIMIT], st, len(data) > FILE_LIMIT
    finally:
        os.close(fd)


class _Unsafe(Exception):
    pass


class ProgressCollector(Collector):
    name = "progress"

    def __init__(
        self,
        spool_dir: str = DEFAULT_SPOOL_DIR,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        delete_stale: bool = False,
        slurm_check: SlurmJobCheck | None = None,
        max_files: int = DEFAULT_MAX_FILES,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
    ):
        self.spool_dir = spool_dir
        self.stale_after = stale_after
        self.delete_stale = delete_stale
        self.slurm = slurm_check
        self.max_files = max_files
        self._clock = clock
        self.log = logger or log
        self.specs = SPECS if slurm_check is not None else SPECS[:-1]
        self._logged: set[tuple] = set()
        self._summary = "not collected yet"

    def _once(self, key: tuple, level: int, msg: str, **fields: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.log(level, msg, extra={"collector": self.name, **fields})

    # -- reading ---------------------------------------------------------------------
    def _scan(self, ignored: dict[str, int]) -> list[_Job]:
        try:
            dfd = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._once(("spool", "ENOENT"), logging.INFO, "no progress spool directory yet", path=self.spool_dir)
            return []
        except OSError as exc:
            raise CollectorError(f"cannot open {self.spool_dir}: {errno.errorcode.get(exc.errno or 0, exc)}") from None
        self._logged.discard(("spool", "ENOENT"))
        jobs: list[_Job] = []
        budget = [self.max_files]
        try:
            with os.scandir(dfd) as it:
                for entry in it:
                    if budget[0] <= 0:
                        ignored["over_limit"] += 1
                        continue
                    budget[0] -= 1
                    if entry.name.startswith("."):
                        continue
                    if not JOB_ID_RE.fullmatch(entry.name):
                        ignored["invalid_name"] += 1
                        continue
                    job = self._scan_job(dfd, entry.name, ignored, budget)
                    if job is not None:
                        jobs.append(job)
        finally:
            os.close(dfd)
        if ignored["over_limit"]:
            self._once(("over_limit",), logging.WARNING, "progress spool has more entries than "
                       "--collector.progress.max-files; the rest ignored", path=self.spool_dir, limit=self.max_files)
        return jobs

    def _scan_job(self, dfd: int, job_id: str, ignored: dict[str, int], budget: list[int]) -> _Job | None:
        try:
            jfd = os.open(job_id, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                ignored["unsafe"] += 1  # a symlink (or a file) where a job directory belongs
            elif exc.errno != errno.ENOENT:
                ignored["unreadable"] += 1
            return None
        job = _Job(job_id, [], 0, 0.0)
        try:
            # Every rename into the directory bumps its mtime: it tells the last write even
            # when no file can be used, and the prolog's fresh, empty directory is not stale.
            job.newest = os.fstat(jfd).st_mtime
            with os.scandir(jfd) as it:
                for entry in it:
                    if budget[0] <= 0:
                        ignored["over_limit"] += 1
                        continue
                    budget[0] -= 1
                    job.files += 1
                    m = RANK_FILE_RE.fullmatch(entry.name)
                    if m is None:
                        if not entry.name.startswith("."):  # dotfiles: the reporter's temp files
                            ignored["invalid_name"] += 1
                        continue
                    try:
                        data, st, too_large = _open_file(entry.name, jfd)
                    except _Unsafe:
                        ignored["unsafe"] += 1
                        continue
                    except OSError as exc:
                        if exc.errno == errno.ELOOP:
                            ignored["unsafe"] += 1
                        elif exc.errno != errno.ENOENT:  # replaced between listing and open: not an error
                            ignored["unreadable"] += 1
                        continue
                    job.newest = max(job.newest, st.st_mtime)
                    if too_large:
                        ignored["too_large"] += 1
                        continue
                    values = parse_progress(data)
                    if values is None:
                        ignored["invalid"] += 1
                        continue
                    job.ranks.append(_Rank(m.group(1), values, st.st_mtime))
        except OSError:
            ignored["unreadable"] += 1
        finally:
            os.close(jfd)
        return job

    def _delete(self, job_id: str) -> None:
        """Remove a dropped job's files: unlinkat relative to the directory opened without
        following symlinks, so nothing outside the spool can be touched."""
        try:
            dfd = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            jfd = os.open(job_id, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                for name in os.listdir(jfd):
                    try:
                        if not stat.S_ISDIR(os.stat(name, dir_fd=jfd, follow_symlinks=False).st_mode):
                            os.unlink(name, dir_fd=jfd)
                    except OSError:
                        pass
            finally:
                os.close(jfd)
            os.rmdir(job_id, dir_fd=dfd)
        except OSError as exc:
            self._once(("delete", job_id, exc.errno), logging.DEBUG, "cannot delete a dropped job's progress files",
                       job_id=job_id, error=errno.errorcode.get(exc.errno or 0, str(exc)))
        finally:
            os.close(dfd)

    # -- collection ------------------------------------------------------------------
    def collect(self) -> list:
        ignored = dict.fromkeys(IGNORE_REASONS, 0)
        jobs = self._scan(ignored)
        now = self._clock()
        states = self.slurm.states(j.job_id for j in jobs) if self.slurm is not None else {}
        b = self.builder()
        kept = 0
        for job in sorted(jobs, key=lambda j: j.job_id):
            state = states.get(job.job_id)
            drop = None
            if state == "ended":
                drop = "ended"
            elif state != "running" and now - job.newest > self.stale_after:
                drop = "stale"
            if drop is not None:
                ignored[drop] += len(job.ranks)
                if self.delete_stale and self._may_delete(job, drop):
                    self._delete(job.job_id)
                continue
            kept += 1
            for r in sorted(job.ranks, key=lambda r: int(r.rank)):
                labels = (job.job_id, r.rank)
                v = r.values
                if "step" in v:
                    b.add("training_step", labels, v["step"])
                if "loss" in v:
                    b.add("training_loss", labels, v["loss"])
                if "samples_per_second" in v:
                    b.add("training_throughput_samples_per_second", labels, v["samples_per_second"])
                if "tokens_per_second" in v:
                    b.add("training_throughput_tokens_per_second", labels, v["tokens_per_second"])
                b.add("training_last_step_timestamp_seconds", labels, v.get("time", r.mtime))
        for reason in IGNORE_REASONS:
            b.add("gpufleet_exporter_progress_files_ignored", (reason,), ignored[reason])
        if self.slurm is not None and self.slurm.success is not None:
            b.add("gpufleet_exporter_progress_slurm_check_success", (), int(self.slurm.success))
        self._summary = f"{kept} jobs reporting progress in {self.spool_dir}"
        return b.families()

    def _may_delete(self, job: _Job, drop: str) -> bool:
        if drop == "ended":
            return True
        if not job.files:
            # An empty stale directory stays: the prolog made it for a job that may still
            # start reporting, and the reporter cannot recreate it in a root-owned spool.
            return False
        # With the Slurm check on, a Slurm job is deleted only once Slurm says it ended: its
        # state may just not be known yet (first lookup pending, squeue failing).
        return self.slurm is None or not _SLURM_ID.fullmatch(job.job_id)

    def status(self) -> str:
        if self.slurm is not None and self.slurm.last_error:
            return f"{self._summary}; squeue: {self.slurm.last_error}"
        return self._summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("progress collector (--collector.progress)")
    g.add_argument("--collector.progress.dir", dest="progress_dir", default=DEFAULT_SPOOL_DIR, metavar="DIR",
                   help="Spool directory the training-side reporter (exporters.progress) writes "
                        "<job_id>/<rank>.json into (its GPUFLEET_PROGRESS_DIR).")
    g.add_argument("--collector.progress.stale-after", dest="progress_stale_after", type=duration,
                   default=DEFAULT_STALE_AFTER, metavar="DURATION",
                   help="Drop a job whose newest progress file is older than this, unless --collector.progress."
                        "slurm-check says it still runs (then it is kept: a hung job must stay visible).")
    g.add_argument("--collector.progress.delete-stale", dest="progress_delete_stale",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="Also delete the files of jobs that are dropped as stale or ended.")
    g.add_argument("--collector.progress.slurm-check", dest="progress_slurm_check",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="Ask squeue (in the background, at most once a minute) whether the spool's jobs still "
                        "run: finished jobs are dropped at once, running ones kept however stale.")
    g.add_argument("--collector.progress.squeue", dest="progress_squeue", default="squeue", metavar="PATH",
                   help="squeue binary for --collector.progress.slurm-check.")
    g.add_argument("--collector.progress.max-files", dest="progress_max_files", type=non_negative_int,
                   default=DEFAULT_MAX_FILES, metavar="N",
                   help="Most spool entries (job directories and files) examined per collection.")


def create(args: argparse.Namespace) -> ProgressCollector:
    check = None
    if getattr(args, "progress_slurm_check", False):
        check = SlurmJobCheck(squeue=getattr(args, "progress_squeue", "squeue"))
    return ProgressCollector(
        getattr(args, "progress_dir", DEFAULT_SPOOL_DIR),
        stale_after=getattr(args, "progress_stale_after", DEFAULT_STALE_AFTER),
        delete_stale=getattr(args, "progress_delete_stale", False),
        slurm_check=check,
        max_files=getattr(args, "progress_max_files", DEFAULT_MAX_FILES),
    )
