"""The jobs collector: which job (Slurm job or Kubernetes pod) holds each GPU.

Two sources, combined per GPU:

* **Processes.** NVML lists the compute processes running on a GPU (pid and the
  framebuffer memory each uses). Each pid is traced to its owner through
  ``<procfs>/<pid>/cgroup``: Slurm's cgroup v1 layout
  (``/slurm/uid_<uid>/job_<id>/step_<s>/...``), its v2 layout
  (``/system.slice/slurmstepd.scope/job_<id>/step_<s>/...``; ``/slurm/uid_N/job_N``
  is accepted there too) and Kubernetes pods (``/kubepods/<qos>/pod<uid>/...``
  with the cgroupfs driver, ``kubepods-<qos>-pod<uid_with_underscores>.slice``
  with the systemd driver). A process whose cgroup names no job (Slurm with
  ``proctrack/linuxproc``, no cgroup plugin) is traced through ``SLURM_JOB_ID``
  in ``<procfs>/<pid>/environ``. The user comes from the cgroup's ``uid_N`` or
  the real uid in ``<procfs>/<pid>/status``, as a name when the node resolves it.
* **Mapping files**, in the format dcgm-exporter reads from
  ``DCGM_HPC_JOB_MAPPING_DIR``: one file per GPU named after its index (or
  ``<gpu>.<gpu instance>`` for MIG), one job id per line, written by the Slurm
  prolog and removed by the epilog in ``scripts/slurm/``. They attribute GPUs
  that a job was allocated but runs nothing on, which is exactly the waste
  dashboards want to see.
* **The kubelet's pod-resources API** (``--collector.jobs.pod-resources-socket``,
  exporters/podresources.py): which pod (namespace, name) each GPU was allocated to by
  the NVIDIA device plugin. It names the pods behind ``pod:<uid>`` jobs and attributes
  GPUs a pod holds but runs nothing on, the Kubernetes twin of the mapping files.

Label decisions (docs/metrics.md repeats them):

* ``gpu_job_info{gpu,uuid,job_id,user,source,namespace,pod}`` has one series per
  (GPU, job). ``source`` says how the job was found, the most direct evidence winning
  when several agree: ``cgroup`` (Slurm cgroup), ``kubernetes`` (pod cgroup),
  ``environ`` (``SLURM_JOB_ID`` of the process), ``pod-resources`` (the kubelet
  allocated the GPU to the pod, none of its processes runs on it), ``mapping``
  (prolog file only: allocated, nothing running).
* ``namespace`` and ``pod`` name a pod's job (empty for Slurm jobs, and for a pod whose
  name is not known: no pod-resources socket, or an ambiguous match). The kubelet's API
  gives names, the cgroup gives the UID; a UID is linked to the pod that was allocated
  every GPU its processes run on (after removing pods already linked to other UIDs),
  and the link is kept while that pod holds a GPU. A pod known only from the kubelet
  (it runs nothing on any GPU, and never did while the agent watched) has the job id
  ``pod:<namespace>/<name>``, since the kubelet does not tell its UID.
* A Slurm job's ``job_id`` is its numeric id as ``squeue`` prints it in ``%A``
  (the same value ``slurm_job_info{job_id}`` carries). A pod's ``job_id`` is
  ``pod:<pod uid>`` so that it can never collide with a Slurm id in
  ``gpu_process_memory_used_bytes``, which has no ``source`` label; join it to
  kube-state-metrics with ``label_replace(..., "uid", "$1", "job_id", "pod:(.*)")``.
* ``user`` is empty where nothing tells it (a mapping-only job no process of
  which runs on this node, or an unreadable ``status``).

Failure rules: a process that exits between the NVML call and the ``/proc``
reads is skipped; unreadable files are skipped quietly and counted in
``gpufleet_exporter_jobs_read_errors_total{file,error}``; reads are bounded in
size, and ``environ`` (which blocks while its process holds its mm lock, e.g. a
process stuck in the driver) is read on a helper thread with a deadline; a GPU
that is lost keeps only its mapping-file attribution (with the UUID it had
before), so an alert on ``gpu_up == 0`` can still name the job it hit; only
NVML itself being unavailable fails the collector.

A process NVML lists but ``<procfs>`` does not have is treated as one that
just exited: skipped, and counted as ``{file="cgroup",error="vanished"}``. A
counter that keeps rising means the agent does not see the host's pids: run it
with ``hostPID`` and ``--path.procfs`` pointing at the host's ``/proc``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pwd
import re
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

import pynvml

from exporters.collector import Collector, CollectorError, MetricSpec
from exporters.podresources import PodRef, PodResourcesError, gpu_pods
from exporters.progress import JOB_ID_RE  # one definition of a label-safe job id

log = logging.getLogger("gpufleet.collector.jobs")

COLLECTOR_NAME = "jobs"
COLLECTOR_HELP = "GPU to job attribution (Slurm jobs, Kubernetes pods) from NVML processes and mapping files"
DEFAULT_ENABLED = True
DEFAULT_MAPPING_DIR = "/run/gpufleet/jobs"

GPU = ("gpu", "uuid")

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpu_job_info", "gauge",
        "The job that holds the GPU, value 1, one series per (GPU, job). job_id: the Slurm job id, or "
        "pod:<uid> for a Kubernetes pod (pod:<namespace>/<name> when only the kubelet's allocation names it). "
        "source: cgroup|kubernetes|environ (a process of the job runs on the GPU), pod-resources (allocated to "
        "the pod by the kubelet, nothing of it running) or mapping (allocated by the prolog's mapping file, nothing "
        "running). namespace, pod: the pod's, from the kubelet's pod-resources API (empty otherwise). Join on "
        "uuid.",
        GPU + ("job_id", "user", "source", "namespace", "pod"),
    ),
    MetricSpec(
        "gpu_process_memory_used_bytes", "gauge",
        "Framebuffer memory used by the job's processes on the GPU (0 for a job allocated the GPU that runs "
        "nothing on it).",
        GPU + ("job_id",),
    ),
    MetricSpec(
        "gpu_unattributed_processes", "gauge",
        "Compute processes on the GPU that belong to no job found (started outside the scheduler, left over "
        "from a finished job, or invisible to the agent's procfs).",
        GPU,
    ),
    MetricSpec(
        "gpufleet_exporter_jobs_read_errors_total", "counter",
        "Files the jobs collector could not use, by file (cgroup, environ, status, mapping, pod-resources) and "
        "error (errno name, vanished, too_large, invalid, timeout; for pod-resources the gRPC status, e.g. "
        "UNAVAILABLE).",
        ("file", "error"),
    ),
)

# Priority of the evidence: lower wins when a job is found several ways on one GPU.
SOURCES = ("cgroup", "kubernetes", "environ", "pod-resources", "mapping")
_RANK = {s: i for i, s in enumerate(SOURCES)}

_SLURM_CGROUP = re.compile(r"(?:^|/)slurm[^/]*/(?:uid_(\d{1,10})/)?job_(\d{1,20})(?:/|$)")
_POD_CGROUPFS = re.compile(r"pod([0-9a-fA-F][0-9a-fA-F-]{7,63})")
_POD_SYSTEMD = re.compile(r"kubepods(?:-[a-z]+)?-pod([0-9a-fA-F][0-9a-fA-F_]{7,63})\.slice")
_POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_MAPPING_NAME = re.compile(r"(\d{1,4})(?:\.(\d{1,4}))?")

CGROUP_LIMIT = 64 * 1024
STATUS_LIMIT = 64 * 1024
ENVIRON_LIMIT = 1024 * 1024  # HPC module environments can be large
MAPPING_LIMIT = 64 * 1024
MAX_MAPPING_FILES = 1024
MAX_JOBS_PER_GPU = 64
MAX_STUCK_READERS = 4
MAX_POD_LINKS = 4096
USER_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Owner:
    """Who a process belongs to."""

    job_id: str
    source: str  # cgroup | kubernetes | environ
    uid: int | None = None


class _Vanished(Exception):
    """The process exited between the NVML call and the /proc read."""


class _GpuGone(Exception):
    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


class _Reinit(Exception):
    """NVML itself went away (driver unloaded/reloaded): initialise again."""


def error_name(exc: BaseException) -> str:
    if isinstance(exc, pynvml.NVMLError):
        return type(exc).__name__.removeprefix("NVMLError_") or "Unknown"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


# -- parsing (pure functions, tested on fixtures) ------------------------------------------
def parse_cgroup(text: str) -> Owner | None:
    """The job a ``/proc/<pid>/cgroup`` places the process in, or None.

    A Slurm job wins over a pod when both appear (slurmd running inside a pod).
    """
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append(parts[2])
    for path in paths:
        m = _SLURM_CGROUP.search(path)
        if m:
            return Owner(m.group(2), "cgroup", int(m.group(1)) if m.group(1) else None)
    for path in paths:
        if "kubepods" not in path:
            continue
        for comp in path.split("/"):
            m = _POD_CGROUPFS.fullmatch(comp) or _POD_SYSTEMD.fullmatch(comp)
            if m:
                uid = m.group(1).replace("_", "-").lower()
                if _POD_UID.fullmatch(uid):
                    return Owner(f"pod:{uid}", "kubernetes")
    return None


def parse_environ(data: bytes, truncated: bool = False) -> str | None:
    """``SLURM_JOB_ID`` (or the older ``SLURM_JOBID``) from a NUL-separated environment."""
    entries = data.split(b"\0")
    if truncated and entries:
        entries.pop()  # cut off mid-entry
    found: dict[bytes, bytes] = {}
    for e in entries:
        if e.startswith((b"SLURM_JOB_ID=", b"SLURM_JOBID=")):
            k, _, v = e.partition(b"=")
            found.setdefault(k, v)
    for key in (b"SLURM_JOB_ID", b"SLURM_JOBID"):
        v = found.get(key)
        if v is None:
            continue
        try:
            text = v.decode("ascii").strip()
        except UnicodeDecodeError:
            continue
        if JOB_ID_RE.fullmatch(text):
            return text
    return None


def parse_status_uid(text: str) -> int | None:
    """The real uid from ``/proc/<pid>/status`` (``Uid: real effective saved fs``)."""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line[4:].split()
            if fields and fields[0].isdigit():
                return int(fields[0])
            return None
    return None


def parse_mapping(data: bytes, truncated: bool = False) -> tuple[list[str], int]:
    """Job ids of one mapping file (deduplicated, in order) and the number of lines ignored.

    Blank lines and ``#`` comments are skipped silently; anything that is not a
    plausible job id (spaces, quotes, binary, over 64 characters) is ignored and counted.
    """
    lines = data.split(b"\n")
    if truncated and lines:
        lines.pop()
    jobs: list[str] = []
    invalid = 0
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            invalid += 1
            continue
        if not JOB_ID_RE.fullmatch(text):
            invalid += 1
            continue
        if text not in jobs:
            jobs.append(text)
    return jobs, invalid


def read_limited(path: str | bytes, limit: int, dir_fd: int | None = None,
                 regular_only: bool = False) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a file and whether there was more. Never follows a symlink
    in the last component and never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if regular_only and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        return data[:limit], True
    return data, False


# -- the collector --------------------------------------------------------------------------
@dataclass
class _JobOnGpu:
    source: str
    user: str
    memory: float = 0.0
    memory_known: bool = False
    namespace: str = ""
    pod: str = ""


@dataclass
class _GpuView:
    index: int
    uuid: str
    lost: bool = False
    processes: list[tuple[int, int | None]] | None = None  # None: could not be read
    jobs: dict[str, _JobOnGpu] = field(default_factory=dict)
    unattributed: int = 0


class JobsCollector(Collector):
    name = "jobs"
    specs = SPECS

    def __init__(
        self,
        nvml: Any = pynvml,
        *,
        procfs: str = "/proc",
        mapping_dir: str = DEFAULT_MAPPING_DIR,
        read_environ: bool = True,
        environ_timeout: float = 1.0,
        pod_resources: Any = None,
        logger: logging.Logger | None = None,
    ):
        self.nvml = nvml
        self.procfs = procfs
        self.mapping_dir = mapping_dir
        self.read_environ = read_environ
        self.environ_timeout = environ_timeout
        self.log = logger or log
        self._initialized = False
        self._uuids: dict[int, str] = {}
        self._logged: set[tuple] = set()
        self._errors: dict[tuple[str, str], int] = {}
        self._users: dict[int, str] = {}
        self._stuck: dict[int, threading.Thread] = {}  # pid -> reader blocked on its environ
        # The kubelet's pod-resources client (exporters.podresources.PodResourcesClient or
        # anything with list()/close()), and pod:<uid> job ids linked to the pod they are.
        self.pod_resources = pod_resources
        self._pod_links: dict[str, PodRef] = {}
        self._pod_summary = ""
        self._last_summary = "not collected yet"

    # -- helpers ---------------------------------------------------------------------
    def _once(self, key: tuple, level: int, msg: str, **fields: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.log(level, msg, extra={"collector": self.name, **fields})

    def _count(self, file: str, error: str) -> None:
        self._errors[(file, error)] = self._errors.get((file, error), 0) + 1

    def _user(self, uid: int | None) -> str:
        if uid is None:
            return ""
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except (KeyError, OverflowError):
                name = str(uid)
            if len(self._users) >= USER_CACHE_SIZE:
                self._users.clear()
            self._users[uid] = name
        return name

    # -- NVML --------------------------------------------------------------------------
    def _ensure_init(self) -> None:
        if self._initialized:
            return
        try:
            self.nvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise CollectorError("NVML library libnvidia-ml.so.1 not found: cannot list GPU processes") from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise CollectorError("NVIDIA driver not loaded: cannot list GPU processes") from None
        except pynvml.NVMLError as exc:
            raise CollectorError(f"nvmlInit failed: {exc} ({error_name(exc)})") from None
        self._initialized = True
        self._uuids.clear()

    def _reinit_later(self) -> None:
        self._initialized = False
        try:
            self.nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass

    def _call(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, fn)(*args)
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired) as exc:
            raise _GpuGone(error_name(exc)) from None
        except (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded,
                pynvml.NVMLError_LibRmVersionMismatch) as exc:
            raise _Reinit(f"{fn}: {error_name(exc)}") from None

    def _processes(self, idx: int, h: Any) -> list[tuple[int, int | None]] | None:
        try:
            procs = self._call("nvmlDeviceGetComputeRunningProcesses", h)
        except pynvml.NVMLError_FunctionNotFound:
            # Drivers older than the v3 entry point: pynvml keeps the v2 one.
            try:
                procs = self._call("nvmlDeviceGetComputeRunningProcesses_v2", h)
            except pynvml.NVMLError as exc:
                self._once((idx, "processes", error_name(exc)), logging.WARNING,
                           "cannot list the GPU's processes", gpu=idx, error=error_name(exc))
                return None
        except pynvml.NVMLError as exc:
            self._once((idx, "processes", error_name(exc)), logging.WARNING,
                       "cannot list the GPU's processes", gpu=idx, error=error_name(exc))
            return None
        out: list[tuple[int, int | None]] = []
        for p in procs or []:
            try:
                pid = int(p.pid)
            except (AttributeError, TypeError, ValueError):
                continue
            used = getattr(p, "usedGpuMemory", None)
            out.append((pid, int(used) if isinstance(used, int) and used >= 0 else None))
        return out

    def _read_gpu(self, idx: int) -> _GpuView | None:
        g = _GpuView(idx, self._uuids.get(idx, ""))
        try:
            h = self._call("nvmlDeviceGetHandleByIndex", idx)
            if not g.uuid:
                uuid = self._call("nvmlDeviceGetUUID", h)
                g.uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                self._uuids[idx] = g.uuid
            g.processes = self._processes(idx, h)
        except _GpuGone as exc:
            self._once((idx, "gone", exc.error), logging.WARNING,
                       "GPU unusable: only its mapping-file attribution is reported", gpu=idx, error=exc.error)
            if not g.uuid:
                return None
            g.lost, g.processes = True, None
            return g
        except pynvml.NVMLError as exc:
            self._once((idx, "handle", error_name(exc)), logging.WARNING, "cannot read the GPU, skipped",
                       gpu=idx, error=error_name(exc))
            return None
        self._logged.discard((idx, "gone", "GpuIsLost"))
        self._logged.discard((idx, "gone", "ResetRequired"))
        return g

    # -- procfs ------------------------------------------------------------------------
    def _proc_read(self, pid: int, name: str, limit: int) -> tuple[bytes, bool] | None:
        """A /proc/<pid> file; raises _Vanished when the process is gone, None when unreadable."""
        try:
            return read_limited(os.path.join(self.procfs, str(pid), name), limit)
        except OSError as exc:
            return self._proc_error(pid, name, exc)

    def _proc_error(self, pid: int, name: str, exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError | ProcessLookupError):
            self._count(name, "vanished")
            raise _Vanished from None
        self._count(name, error_name(exc))
        self._once((name, error_name(exc)), logging.DEBUG, "cannot read a process file", file=name,
                   pid=pid, error=error_name(exc))
        return None

    def _environ(self, pid: int) -> tuple[bytes, bool] | None:
        """Read environ with a deadline: the read takes the process's mm lock and hangs
        with a process stuck in the driver. A stuck reader is left behind (daemon thread)
        and its pid skipped until the read returns. Raises _Vanished."""
        for p, t in list(self._stuck.items()):
            if not t.is_alive():
                del self._stuck[p]
        if pid in self._stuck or len(self._stuck) >= MAX_STUCK_READERS:
            self._count("environ", "timeout")
            return None
        path = os.path.join(self.procfs, str(pid), "environ")
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = read_limited(path, ENVIRON_LIMIT)
            except OSError as exc:
                box["error"] = exc

        t = threading.Thread(target=run, name=f"jobs-environ-{pid}", daemon=True)
        t.start()
        t.join(self.environ_timeout)
        if t.is_alive():
            self._stuck[pid] = t
            self._count("environ", "timeout")
            self._once(("environ-timeout", pid), logging.WARNING,
                       "reading a process environment blocked; skipping that process", pid=pid)
            return None
        exc = box.get("error")
        if exc is not None:
            return self._proc_error(pid, "environ", exc)
        return box.get("result")

    def _uid_from_status(self, pid: int) -> int | None:
        got = self._proc_read(pid, "status", STATUS_LIMIT)
        if got is None:
            return None
        return parse_status_uid(got[0].decode("utf-8", "replace"))

    def owner(self, pid: int) -> Owner | None:
        """The job a process belongs to (None: none found). Raises _Vanished."""
        got = self._proc_read(pid, "cgroup", CGROUP_LIMIT)
        found = parse_cgroup(got[0].decode("utf-8", "replace")) if got is not None else None
        if found is None and self.read_environ:
            env = self._environ(pid)
            if env is not None:
                job = parse_environ(*env)
                if job is not None:
                    found = Owner(job, "environ")
        if found is None:
            return None
        if found.uid is None:
            try:
                found = Owner(found.job_id, found.source, self._uid_from_status(pid))
            except _Vanished:
                pass  # it ran a moment ago: keep the job, without a user
        return found

    # -- mapping files -----------------------------------------------------------------
    def read_mapping(self) -> dict[int, list[str]]:
        """GPU index -> job ids from the mapping directory."""
        try:
            dfd = os.open(self.mapping_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._once(("mapping-dir", "ENOENT"), logging.INFO,
                       "no job mapping directory (no prolog installed?): attribution from processes only",
                       path=self.mapping_dir)
            return {}
        except OSError as exc:
            self._count("mapping", error_name(exc))
            self._once(("mapping-dir", error_name(exc)), logging.WARNING, "cannot open the job mapping directory",
                       path=self.mapping_dir, error=error_name(exc))
            return {}
        self._logged.discard(("mapping-dir", "ENOENT"))
        out: dict[int, list[str]] = {}
        try:
            with os.scandir(dfd) as it:
                for n, entry in enumerate(it):
                    if n >= MAX_MAPPING_FILES:
                        self._once(("mapping-cap",), logging.WARNING, "too many files in the job mapping "
                                   "directory; the rest ignored", path=self.mapping_dir, limit=MAX_MAPPING_FILES)
                        break
                    m = _MAPPING_NAME.fullmatch(entry.name)
                    if not m:
                        continue  # temp files of the prolog, lock files, other tools' files
                    try:
                        data, truncated = read_limited(entry.name, MAPPING_LIMIT, dir_fd=dfd, regular_only=True)
                    except FileNotFoundError:
                        continue  # removed by an epilog since the listing
                    except OSError as exc:
                        self._count("mapping", error_name(exc))
                        self._once(("mapping", entry.name, error_name(exc)), logging.WARNING,
                                   "cannot read a job mapping file", file=entry.name, error=error_name(exc))
                        continue
                    if truncated:
                        self._count("mapping", "too_large")
                        self._once(("mapping", entry.name, "too_large"), logging.WARNING,
                                   "job mapping file too large; only its start is read", file=entry.name,
                                   limit=MAPPING_LIMIT)
                    jobs, invalid = parse_mapping(data, truncated)
                    if invalid:
                        self._count("mapping", "invalid")
                        self._once(("mapping", entry.name, "invalid"), logging.WARNING,
                                   "job mapping file has lines that are not job ids; ignored", file=entry.name,
                                   lines=invalid)
                    merged = out.setdefault(int(m.group(1)), [])
                    for j in jobs:
                        if j not in merged and len(merged) < MAX_JOBS_PER_GPU:
                            merged.append(j)
        except OSError as exc:
            self._count("mapping", error_name(exc))
        finally:
            os.close(dfd)
        return out

    # -- collection --------------------------------------------------------------------
    def collect(self) -> list:
        self._ensure_init()
        try:
            count = self._call("nvmlDeviceGetCount")
            views = [self._read_gpu(i) for i in range(count)]
        except _Reinit as exc:
            self._reinit_later()
            raise CollectorError(f"NVML is not available ({exc}); initialising again next time") from None
        except (pynvml.NVMLError, _GpuGone) as exc:
            raise CollectorError(f"nvmlDeviceGetCount failed: {error_name(exc)}") from None
        mapping = self.read_mapping()
        owners: dict[int, Owner | None] = {}
        job_users: dict[str, str] = {}
        gpus = [g for g in views if g is not None]
        for g in gpus:
            for pid, used in g.processes or []:
                if pid not in owners:
                    try:
                        owners[pid] = self.owner(pid)
                    except _Vanished:
                        owners[pid] = None
                        continue
                own = owners[pid]
                if own is None:
                    g.unattributed += 1
                    continue
                user = self._user(own.uid)
                if user:
                    job_users.setdefault(own.job_id, user)
                j = g.jobs.get(own.job_id)
                if j is None:
                    j = g.jobs[own.job_id] = _JobOnGpu(own.source, user)
                elif _RANK[own.source] < _RANK[j.source] or (own.source == j.source and not j.user):
                    j.source, j.user = own.source, user or j.user
                if used is not None:
                    j.memory += used
                    j.memory_known = True
        if self.pod_resources is not None:
            self._attribute_pods(gpus)
        for g in gpus:
            for job_id in mapping.get(g.index, []):
                if job_id not in g.jobs:
                    # 0 bytes is a fact only when every process on the GPU is accounted for.
                    idle = g.processes is not None and g.unattributed == 0
                    g.jobs[job_id] = _JobOnGpu("mapping", "", 0.0, idle)
            for job_id, j in g.jobs.items():
                if not j.user:
                    j.user = job_users.get(job_id, "")
        b = self.builder()
        for g in sorted(gpus, key=lambda g: g.index):
            gl = (str(g.index), g.uuid)
            for job_id in sorted(g.jobs):
                j = g.jobs[job_id]
                b.add("gpu_job_info", gl + (job_id, j.user, j.source, j.namespace, j.pod), 1)
                if j.memory_known:
                    b.add("gpu_process_memory_used_bytes", gl + (job_id,), j.memory)
            if g.processes is not None:
                b.add("gpu_unattributed_processes", gl, g.unattributed)
        for (file, err), n in sorted(self._errors.items()):
            b.add("gpufleet_exporter_jobs_read_errors_total", (file, err), n)
        n_jobs = len({j for g in gpus for j in g.jobs})
        self._last_summary = f"{len(gpus)} GPUs, {n_jobs} jobs, {len(owners)} processes"
        return b.families()

    def status(self) -> str:
        return f"{self._last_summary}; mapping dir {self.mapping_dir}{self._pod_summary}"

    def close(self) -> None:
        if self._initialized:
            self._reinit_later()
        if self.pod_resources is not None:
            self.pod_resources.close()

    # -- Kubernetes pods ----------------------------------------------------------------
    def _list_pod_gpus(self) -> dict[str, set[PodRef]] | None:
        """GPU key -> pods from the kubelet, or None when it cannot be asked (counted, logged once
        per error; attribution then rests on the cgroups and the links already made)."""
        try:
            resp = self.pod_resources.list()
        except PodResourcesError as exc:
            self._count("pod-resources", exc.code)
            self._once(("pod-resources", exc.code), logging.WARNING,
                       "cannot list the kubelet's pod resources; pods named from earlier links only",
                       error=str(exc))
            self._pod_summary = f"; pod-resources: {exc.code}"
            return None
        self._logged = {k for k in self._logged if k[0] != "pod-resources"}
        found = gpu_pods(resp)
        self._pod_summary = f"; pod-resources: {len(resp.pod_resources)} pods, {len(found)} GPUs allocated"
        return found

    def _attribute_pods(self, gpus: list[_GpuView]) -> None:
        """Name the pods behind pod:<uid> jobs and add the GPUs pods hold but run nothing on."""
        found = self._list_pod_gpus()
        if found is not None:
            alloc: dict[int, set[PodRef]] = {}
            for g in gpus:
                pods = found.get(f"uuid:{g.uuid.lower()}", set()) | found.get(f"index:{g.index}", set())
                if pods:
                    alloc[g.index] = pods
            self._link_pods(gpus, alloc, set().union(*found.values()) if found else set())
        else:
            alloc = {}
        by_pod = {ref: job_id for job_id, ref in self._pod_links.items()}
        for g in gpus:
            for job_id, j in g.jobs.items():
                ref = self._pod_links.get(job_id) if j.source == "kubernetes" else None
                if ref is not None:
                    j.namespace, j.pod = ref.namespace, ref.name
            for ref in sorted(alloc.get(g.index, ()), key=lambda r: (r.namespace, r.name)):
                job_id = by_pod.get(ref) or f"pod:{ref.namespace}/{ref.name}"
                if job_id not in g.jobs and len(g.jobs) < MAX_JOBS_PER_GPU:
                    # 0 bytes is a fact only when every process on the GPU is accounted for.
                    idle = g.processes is not None and g.unattributed == 0
                    g.jobs[job_id] = _JobOnGpu("pod-resources", "", 0.0, idle, ref.namespace, ref.name)

    def _link_pods(self, gpus: list[_GpuView], alloc: dict[int, set[PodRef]], live: set[PodRef]) -> None:
        """pod:<uid> -> the one pod allocated every GPU the UID's processes run on."""
        candidates: dict[str, set[PodRef]] = {}
        for g in gpus:
            for job_id, j in g.jobs.items():
                if j.source == "kubernetes":
                    here = alloc.get(g.index, set())
                    candidates[job_id] = candidates[job_id] & here if job_id in candidates else set(here)
        links = {k: v for k, v in self._pod_links.items() if v in live}  # a pod that left forgets its UID
        for _ in range(len(candidates) + 1):  # each round links at least one more UID, or stops
            claims: dict[PodRef, list[str]] = {}
            for job_id, cands in sorted(candidates.items()):
                # Pods linked to other UIDs running now are out; a link of a UID that runs
                # nothing now is not evidence against a new UID (the pod may be recreated).
                taken = {ref for other, ref in links.items() if other != job_id and other in candidates}
                rest = cands - taken
                if len(rest) == 1:
                    claims.setdefault(next(iter(rest)), []).append(job_id)
            changed = False
            for ref, ids in claims.items():
                if len(ids) == 1 and links.get(ids[0]) != ref:  # two UIDs claiming one pod: neither
                    # A name belongs to one pod at a time: a recreated pod (same name, new
                    # UID) takes the name from the UID that held it.
                    links = {k: v for k, v in links.items() if v != ref}
                    links[ids[0]] = ref
                    changed = True
            if not changed:
                break
        if len(links) > MAX_POD_LINKS:
            links = dict(list(links.items())[-MAX_POD_LINKS:])
        self._pod_links = links


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("jobs collector (--collector.jobs)")
    g.add_argument("--collector.jobs.mapping-dir", dest="jobs_mapping_dir", default=DEFAULT_MAPPING_DIR,
                   metavar="DIR",
                   help="Per-GPU job mapping files (dcgm-exporter's DCGM_HPC_JOB_MAPPING_DIR format: a file "
                        "per GPU index, one job id per line), written by scripts/slurm/prolog.sh.")
    g.add_argument("--collector.jobs.read-environ", dest="jobs_read_environ",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="Read SLURM_JOB_ID from <procfs>/<pid>/environ of GPU processes whose cgroup names no "
                        "job (Slurm without cgroup plugins). Only that variable is used, never logged.")
    g.add_argument("--collector.jobs.pod-resources-socket", dest="jobs_pod_resources_socket", default="",
                   metavar="PATH",
                   help="The kubelet's pod-resources gRPC socket (usually /var/lib/kubelet/pod-resources/"
                        "kubelet.sock, mounted into the agent's pod): names the pod (namespace, pod labels of "
                        "gpu_job_info) that holds each GPU, also when it runs nothing on it. Needs the kubelet "
                        "extra (grpcio). Default: off.")


def create(args: argparse.Namespace) -> JobsCollector:
    from exporters.gpu import nvml_for

    pod_resources = None
    socket = getattr(args, "jobs_pod_resources_socket", "")
    if socket:
        from exporters.podresources import PodResourcesClient

        try:
            pod_resources = PodResourcesClient(socket)
        except PodResourcesError as exc:
            raise ValueError(f"--collector.jobs.pod-resources-socket: {exc}") from None
    return JobsCollector(
        nvml_for(args),
        procfs=args.procfs,
        mapping_dir=getattr(args, "jobs_mapping_dir", DEFAULT_MAPPING_DIR),
        read_environ=getattr(args, "jobs_read_environ", True),
        pod_resources=pod_resources,
    )
