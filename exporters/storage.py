"""The storage collector: filesystems, NFS and Lustre clients, block devices, NVMe.

What a GPU node's storage looks like to a training job: the local scratch and
root filesystems (``/``, ``/raid``, ``/scratch``), the shared filesystems the
checkpoints and datasets live on (NFS, Lustre, GPFS, BeeGFS, CephFS, Weka,
FUSE), the disks under them, and whether any of it hangs.

Sources (all below ``--path.procfs``, ``--path.sysfs``, ``--path.rootfs``):

- ``<procfs>/1/mountinfo`` (``<procfs>/self/mountinfo`` where PID 1 is hidden):
  the mounts. ``filesystem_*`` from statfs of ``<rootfs>/<mountpoint>``; the
  ``mountpoint`` label is the host path. Mounts are chosen by fstype and
  mountpoint regexes; a mountpoint mounted over (stacked) reports the top
  mount only, and bind mounts of one filesystem (same ``major:minor``) report
  once, under the mount of the filesystem's root with the shortest path.
  When ``--path.rootfs`` is not ``/`` and mountinfo lists mounts below it (the
  agent's own mount namespace in a container), only those are used, with the
  prefix stripped.
- statfs runs on a small fixed pool of threads with a per-mount timeout
  (exporters/storage_statfs.py). A mount that does not answer in time reports
  ``filesystem_stuck 1`` and no size series; it is not probed again until its
  blocked call returns, then it reports ``filesystem_stuck 0`` again.
- ``<procfs>/1/mountstats`` (or ``self``): NFS client statistics per mount.
  Labels ``export``, ``mountpoint``, ``nfs_version`` (the ``vers=`` mount
  option: ``3``, ``4.0``, ``4.1``, ``4.2``) and ``protocol`` (``tcp``, ``udp``,
  ``rdma``), so an NFSv3 and an NFSv4 mount on one mountpoint stay separate.
  Operations whose counters are all zero (never used) are not exported,
  which keeps the ~60 NFSv4 operations from multiplying every mount's series.
  ``storage_nfs_retransmissions_total`` is the sum over operations of
  transmissions minus requests (each operation's difference floored at 0).
  Bind mounts of one NFS filesystem are exported once, like ``filesystem_*``.
- Lustre ``llite/<fs>-<instance>/stats`` under ``<sysfs>/kernel/debug/lustre``
  (2.12 and later, root only) or ``<procfs>/fs/lustre``: the ``filesystem``
  label is the Lustre fsname; the instance suffix (the superblock address,
  new on every mount) is dropped and instances of one fsname are summed, so
  a remount does not mint new series.
- ``<procfs>/diskstats``: whole disks (``nvme0n1``, ``sda``, ``vda``, ``md0``,
  ``dm-0``), not partitions, loop, ram or zram devices, unless the disk regexes say
  otherwise. ``<sysfs>/class/nvme/*``: controller model, serial, firmware, state.

A file that is missing is simply not reported (no NFS, no Lustre); a file
that is unreadable or malformed drops only the series it feeds, is logged once
and counted in ``gpufleet_exporter_storage_parse_errors_total{source}``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exporters import storage_parse as sp
from exporters.cli import duration
from exporters.collector import Collector, MetricSpec, SampleBuilder
from exporters.storage_statfs import ERROR, OK, STUCK, WAITING, StatfsPool

log = logging.getLogger("gpufleet.collector.storage")

COLLECTOR_NAME = "storage"
COLLECTOR_HELP = "Filesystem space and hung mounts, NFS/Lustre client and block device statistics"
DEFAULT_ENABLED = True

FSTYPE_INCLUDE = (r"^(ext[234]|xfs|btrfs|zfs|f2fs|nfs4?|lustre|gpfs|beegfs|ceph|cifs|smb3|wekafs"
                  r"|fuse|fuseblk|fuse\..+)$")
FSTYPE_EXCLUDE = (r"^(proc|sysfs|tmpfs|devtmpfs|devpts|overlay|aufs|cgroup2?|debugfs|tracefs|securityfs|pstore"
                  r"|efivarfs|bpf|autofs|mqueue|hugetlbfs|configfs|fusectl|nsfs|squashfs|ramfs|binfmt_misc"
                  r"|rpc_pipefs|nfsd|selinuxfs|iso9660"
                  r"|fuse\.(lxcfs|portal|gvfsd-fuse|snapfuse|xdg-document-portal))$")
MOUNTPOINT_INCLUDE = r"^/"
MOUNTPOINT_EXCLUDE = (r"^/(dev|proc|sys|run|var/lib/docker/.+|var/lib/containers/storage/.+"
                      r"|var/lib/kubelet/.+|snap/.+)($|/)")
DISK_INCLUDE = r"^(nvme\d+n\d+|sd[a-z]+|vd[a-z]+|xvd[a-z]+|hd[a-z]+|md\d+|dm-\d+)$"
DISK_EXCLUDE = r"^(loop|ram|zram|sr|fd|nbd)\d+$"

PARSE_SOURCES = ("mountinfo", "mountstats", "lustre", "diskstats", "nvme")
SECTOR = 512

FS = ("device", "mountpoint", "fstype")
NFS = ("export", "mountpoint", "nfs_version", "protocol")
NFS_OP = NFS + ("operation",)
LUSTRE = ("filesystem",)
DISK = ("device",)

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("filesystem_size_bytes", "gauge", "Filesystem size (statfs f_blocks * f_frsize).", FS),
    MetricSpec("filesystem_free_bytes", "gauge", "Free space, including blocks reserved for root.", FS),
    MetricSpec("filesystem_avail_bytes", "gauge", "Space available to unprivileged users.", FS),
    MetricSpec("filesystem_files", "gauge", "Inodes in the filesystem (0 where it allocates them dynamically).",
               FS),
    MetricSpec("filesystem_files_free", "gauge", "Free inodes.", FS),
    MetricSpec("filesystem_readonly", "gauge", "1 if the mount or the filesystem is read-only.", FS),
    MetricSpec("filesystem_stuck", "gauge",
               "1 while statfs on the mount has not answered within --collector.storage.statfs-timeout "
               "(hung NFS/Lustre server, dead FUSE daemon); its size series are then omitted and it is not "
               "probed again until the blocked call returns.", FS),
    MetricSpec("filesystem_device_error", "gauge", "1 if statfs on the mount failed with an error (e.g. ESTALE).",
               FS),
    MetricSpec("storage_nfs_read_bytes_total", "counter",
               "Bytes applications read from the NFS mount, by mode: normal (page cache) or direct (O_DIRECT).",
               NFS + ("mode",)),
    MetricSpec("storage_nfs_write_bytes_total", "counter",
               "Bytes applications wrote to the NFS mount, by mode: normal (page cache) or direct (O_DIRECT).",
               NFS + ("mode",)),
    MetricSpec("storage_nfs_server_read_bytes_total", "counter",
               "Bytes the client read from the server with READ operations.", NFS),
    MetricSpec("storage_nfs_server_write_bytes_total", "counter",
               "Bytes the client wrote to the server with WRITE operations.", NFS),
    MetricSpec("storage_nfs_operations_total", "counter",
               "RPC requests completed, per NFS operation (operations never used are omitted).", NFS_OP),
    MetricSpec("storage_nfs_operation_transmissions_total", "counter",
               "RPC transmissions per operation (more than requests when requests are retransmitted).", NFS_OP),
    MetricSpec("storage_nfs_operation_major_timeouts_total", "counter",
               "Major timeouts per operation (\"server not responding\").", NFS_OP),
    MetricSpec("storage_nfs_operation_sent_bytes_total", "counter",
               "Bytes sent per operation, RPC headers and payload.", NFS_OP),
    MetricSpec("storage_nfs_operation_received_bytes_total", "counter",
               "Bytes received per operation, RPC headers and payload.", NFS_OP),
    MetricSpec("storage_nfs_operation_queue_seconds_total", "counter",
               "Time requests waited in the RPC queue before transmission, per operation.", NFS_OP),
    MetricSpec("storage_nfs_operation_rtt_seconds_total", "counter",
               "Round-trip time from transmission to reply, per operation.", NFS_OP),
    MetricSpec("storage_nfs_operation_execute_seconds_total", "counter",
               "Time from queueing to completion, per operation.", NFS_OP),
    MetricSpec("storage_nfs_operation_errors_total", "counter",
               "Requests that completed with an error status, per operation (kernels that print the 9th field).",
               NFS_OP, "kernels that print a 9th per-operation field"),
    MetricSpec("storage_nfs_retransmissions_total", "counter",
               "RPC retransmissions: per-operation transmissions minus requests, summed over operations.", NFS),
    MetricSpec("storage_nfs_transport_connects_total", "counter",
               "Times the RPC transport (re)connected to the server (tcp and rdma).", NFS),
    MetricSpec("storage_nfs_transport_sends_total", "counter", "RPC messages sent on the transport.", NFS),
    MetricSpec("storage_nfs_transport_receives_total", "counter", "RPC replies received on the transport.", NFS),
    MetricSpec("storage_nfs_transport_bad_xids_total", "counter",
               "Replies received whose transaction id matched no request.", NFS),
    MetricSpec("storage_lustre_read_bytes_total", "counter", "Bytes read through the Lustre client.", LUSTRE),
    MetricSpec("storage_lustre_write_bytes_total", "counter", "Bytes written through the Lustre client.", LUSTRE),
    MetricSpec("storage_lustre_reads_total", "counter", "Read calls on the Lustre client.", LUSTRE),
    MetricSpec("storage_lustre_writes_total", "counter", "Write calls on the Lustre client.", LUSTRE),
    MetricSpec("storage_lustre_operations_total", "counter",
               "Lustre client (llite) operations: open, close, getattr, setattr, statfs, ... (those used).",
               LUSTRE + ("operation",)),
    MetricSpec("storage_lustre_operation_seconds_total", "counter",
               "Time spent in Lustre client operations, where Lustre measures it in microseconds.",
               LUSTRE + ("operation",), "operations Lustre times in [usecs]"),
    MetricSpec("storage_disk_reads_completed_total", "counter", "Reads completed by the disk.", DISK),
    MetricSpec("storage_disk_writes_completed_total", "counter", "Writes completed by the disk.", DISK),
    MetricSpec("storage_disk_read_bytes_total", "counter", "Bytes read from the disk (sectors * 512).", DISK),
    MetricSpec("storage_disk_written_bytes_total", "counter", "Bytes written to the disk (sectors * 512).",
               DISK),
    MetricSpec("storage_disk_read_time_seconds_total", "counter", "Time spent on reads (sum over requests).",
               DISK),
    MetricSpec("storage_disk_write_time_seconds_total", "counter", "Time spent on writes (sum over requests).",
               DISK),
    MetricSpec("storage_disk_io_time_seconds_total", "counter", "Time the disk had I/O in flight (busy time).",
               DISK),
    MetricSpec("storage_disk_io_time_weighted_seconds_total", "counter",
               "Busy time weighted by the number of requests in flight (queue depth integral).", DISK),
    MetricSpec("storage_disk_io_in_flight", "gauge", "Requests issued to the disk and not yet completed.", DISK),
    MetricSpec("storage_nvme_info", "gauge", "NVMe controller facts as labels, value 1.",
               ("controller", "model", "serial", "firmware_revision", "state")),
    MetricSpec("gpufleet_exporter_storage_parse_errors_total", "counter",
               "Storage source files found unreadable or malformed (per collection, per problem), by source.",
               ("source",)),
    MetricSpec("gpufleet_exporter_storage_statfs_workers", "gauge",
               "statfs worker threads (--collector.storage.statfs-workers)."),
    MetricSpec("gpufleet_exporter_storage_statfs_blocked_workers", "gauge",
               "statfs workers held by probes of stuck mounts; when all are, other mounts wait unmeasured."),
)


@dataclass(frozen=True)
class FsMount:
    """A mount chosen for filesystem_* series."""

    device: str
    mountpoint: str  # host path, the label
    fstype: str
    path: str  # where to statfs it (under --path.rootfs)
    readonly: bool

    @property
    def labels(self) -> tuple[str, str, str]:
        return (sp.label_text(self.device), sp.label_text(self.mountpoint), self.fstype)


class Filters:
    def __init__(self, fstype_include: str = FSTYPE_INCLUDE, fstype_exclude: str = FSTYPE_EXCLUDE,
                 mountpoint_include: str = MOUNTPOINT_INCLUDE, mountpoint_exclude: str = MOUNTPOINT_EXCLUDE,
                 disk_include: str = DISK_INCLUDE, disk_exclude: str = DISK_EXCLUDE):
        self.fstype_include = re.compile(fstype_include)
        self.fstype_exclude = re.compile(fstype_exclude) if fstype_exclude else None
        self.mountpoint_include = re.compile(mountpoint_include)
        self.mountpoint_exclude = re.compile(mountpoint_exclude) if mountpoint_exclude else None
        self.disk_include = re.compile(disk_include)
        self.disk_exclude = re.compile(disk_exclude) if disk_exclude else None

    @staticmethod
    def _ok(text: str, inc: re.Pattern[str], exc: re.Pattern[str] | None) -> bool:
        return inc.search(text) is not None and (exc is None or exc.search(text) is None)

    def fstype(self, fstype: str) -> bool:
        return self._ok(fstype, self.fstype_include, self.fstype_exclude)

    def mountpoint(self, mountpoint: str) -> bool:
        return self._ok(mountpoint, self.mountpoint_include, self.mountpoint_exclude)

    def disk(self, name: str) -> bool:
        return self._ok(name, self.disk_include, self.disk_exclude)


class RootFS:
    """Maps mountinfo paths to host paths (labels) and to paths this process can statfs."""

    def __init__(self, rootfs: str, mountpoints: Iterable[str]):
        root = os.path.normpath(rootfs or "/")
        self.prefix = "" if root == "/" else root
        # Mounts below the prefix mean mountinfo shows our own namespace (a container with the host's
        # root bind-mounted at --path.rootfs): only those are the host's, the rest are the container's.
        self.own_namespace = bool(self.prefix) and any(self._under(mp) for mp in mountpoints)

    def _under(self, mp: str) -> bool:
        return mp == self.prefix or mp.startswith(self.prefix + "/")

    def host_path(self, mp: str) -> str | None:
        """The host path of a mountpoint, or None when it is not part of the host's tree."""
        if self.own_namespace:
            if not self._under(mp):
                return None
            return mp[len(self.prefix):] or "/"
        return mp

    def stat_path(self, host_mp: str) -> str:
        return self.prefix + host_mp if self.prefix and host_mp != "/" else (self.prefix or host_mp)


def _dedupe_key(m: sp.Mount, host_mp: str) -> tuple[bool, int, int, str]:
    # Prefer the mount of the filesystem's root, then the shortest path: "/" over its bind mounts.
    return (m.root != "/", len(m.root), len(host_mp), host_mp)


def select_filesystems(mounts: list[sp.Mount], rootfs: str, filters: Filters) -> list[FsMount]:
    """Mounts worth a filesystem_* series: filtered, top of each stack, one per filesystem."""
    rf = RootFS(rootfs, (m.mountpoint for m in mounts))
    top: dict[str, tuple[sp.Mount, str]] = {}
    for m in mounts:  # mountinfo lists mounts in mount order: a later one on the same path hides the earlier
        host_mp = rf.host_path(m.mountpoint)
        if host_mp is not None:
            top.pop(host_mp, None)
            top[host_mp] = (m, host_mp)
    best: dict[str, tuple[sp.Mount, str]] = {}
    for m, host_mp in top.values():
        if not (filters.fstype(m.fstype) and filters.mountpoint(host_mp)):
            continue
        seen = best.get(m.dev)
        if seen is None or _dedupe_key(m, host_mp) < _dedupe_key(*seen):
            best[m.dev] = (m, host_mp)
    out = [FsMount(m.source, host_mp, m.fstype, rf.stat_path(host_mp), m.readonly) for m, host_mp in best.values()]
    return sorted(out, key=lambda f: f.mountpoint)


def select_nfs(nfs: list[sp.NfsMount], mounts: list[sp.Mount] | None, rootfs: str,
               filters: Filters) -> list[tuple[tuple[str, str, str, str], sp.NfsMount]]:
    """NFS mounts to export with their labels: mountpoint-filtered, one per superblock, unique labels."""
    rf = RootFS(rootfs, [n.mountpoint for n in nfs] + [m.mountpoint for m in mounts or ()])
    devs: dict[tuple[str, str, str], sp.Mount] = {}
    for m in mounts or ():
        devs[(m.mountpoint, m.source, m.fstype)] = m
    chosen: dict[object, tuple[tuple[bool, int, int, str], str, sp.NfsMount]] = {}
    for i, n in enumerate(nfs):
        host_mp = rf.host_path(n.mountpoint)
        if host_mp is None or not filters.mountpoint(host_mp):
            continue
        m = devs.get((n.mountpoint, n.export, n.fstype))
        key: object = m.dev if m is not None else i
        rank = _dedupe_key(m, host_mp) if m is not None else (False, 0, 0, host_mp)
        seen = chosen.get(key)
        if seen is None or rank < seen[0]:
            chosen[key] = (rank, host_mp, n)
    out: dict[tuple[str, str, str, str], sp.NfsMount] = {}
    for _, host_mp, n in chosen.values():
        labels = (sp.label_text(n.export), sp.label_text(host_mp), n.version, n.protocol)
        out[labels] = n  # identical labels (a stacked duplicate): the later mount wins
    return sorted(out.items())


# Seconds an NVMe controller's model, serial and firmware revision are kept before they are read again.
NVME_IDENTITY_TTL = 60.0

# storage_nfs_operation* family -> (field of the per-op line, its unit as a power of ten of the metric's:
# mountstats times are integer milliseconds, written exactly as seconds by SampleBuilder.scaled_rows)
NFS_OP_FIELDS = (
    ("storage_nfs_operations_total", 0, 0),
    ("storage_nfs_operation_transmissions_total", 1, 0),
    ("storage_nfs_operation_major_timeouts_total", 2, 0),
    ("storage_nfs_operation_sent_bytes_total", 3, 0),
    ("storage_nfs_operation_received_bytes_total", 4, 0),
    ("storage_nfs_operation_queue_seconds_total", 5, -3),
    ("storage_nfs_operation_rtt_seconds_total", 6, -3),
    ("storage_nfs_operation_execute_seconds_total", 7, -3),
    ("storage_nfs_operation_errors_total", 8, 0),  # 9-field lines of newer kernels only
)


class StorageCollector(Collector):
    name = "storage"
    specs = SPECS

    def __init__(self, procfs: str = "/proc", sysfs: str = "/sys", rootfs: str = "/", *,
                 filters: Filters | None = None, statfs_timeout: float = 1.0, statfs_workers: int = 4,
                 statvfs: Any = os.statvfs, logger: logging.Logger | None = None):
        self.procfs = procfs
        self.sysfs = sysfs
        self.rootfs = rootfs
        self.filters = filters or Filters()
        self.statfs_timeout = statfs_timeout
        self.log = logger or log
        self.pool = StatfsPool(statfs_workers, statvfs=statvfs)
        self.parse_errors = dict.fromkeys(PARSE_SOURCES, 0)
        self._fs_state: dict[str, str] = {}
        self._label_sets: dict[tuple[str, ...], tuple[str, ...]] = {}
        # The last mount table read: (its bytes, mounts, filesystems chosen, problems).
        self._mount_table: tuple[bytes, list[sp.Mount], list[FsMount], list[str]] | None = None
        self._nvme_identity: dict[str, tuple[float, tuple[str, ...]]] = {}  # controller -> (read at, identity)
        self._logged: set[tuple] = set()
        self._problems_now: set[tuple] = set()
        self._summary = "not collected yet"

    # -- helpers --------------------------------------------------------------------------
    def _once(self, key: tuple, level: int, msg: str, **fields: Any) -> None:
        self._problems_now.add(key)
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.log(level, msg, extra={"collector": self.name, **fields})

    def _problem(self, source: str, path: str, what: str, count: int = 1) -> None:
        self.parse_errors[source] += count
        self._once(("parse", source, path), logging.WARNING, "storage source unreadable or malformed; "
                   "affected series omitted", source=source, path=path, reason=what)

    def _read(self, source: str, path: str) -> bytes | None:
        """File content; None if it is missing (not an error) or unreadable (counted, logged once)."""
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENODEV, errno.ENXIO):
                return None
            self._problem(source, path, f"{type(exc).__name__}: {exc.strerror or exc}")
            return None

    def _read_pid_file(self, source: str, name: str) -> tuple[bytes | None, str]:
        """<procfs>/1/<name>, or <procfs>/self/<name> where PID 1's is hidden (hidepid) or missing."""
        first = os.path.join(self.procfs, "1", name)
        try:
            with open(first, "rb") as f:
                return f.read(), first
        except OSError:
            path = os.path.join(self.procfs, "self", name)
            return self._read(source, path), path

    # -- collection -----------------------------------------------------------------------
    def collect(self) -> list:
        self._problems_now = set()
        b = self.builder()
        mounts, chosen = self._mounts()
        # statfs runs on the pool's workers while this thread reads the NFS, Lustre and disk
        # statistics; the deadlines count from here, as if it had waited.
        pending = self.pool.submit((f.path for f in chosen), self.statfs_timeout) if chosen else None
        nfs = self._nfs(b, mounts)
        lustre = self._lustre(b)
        disks = self._disks(b)
        self._nvme(b)
        stuck = self._filesystems(b, chosen, pending.wait() if pending else {})
        for source in PARSE_SOURCES:
            b.add("gpufleet_exporter_storage_parse_errors_total", (source,), self.parse_errors[source])
        b.add("gpufleet_exporter_storage_statfs_workers", (), self.pool.workers)
        b.add("gpufleet_exporter_storage_statfs_blocked_workers", (), self.pool.blocked(self.statfs_timeout))
        # A problem that went away may be logged again if it comes back.
        self._logged &= self._problems_now | {k for k in self._logged if k[0] != "parse"}
        self._summary = (f"{len(self._fs_state)} filesystems ({stuck} stuck), {nfs} NFS mounts, "
                         f"{lustre} Lustre filesystems, {disks} disks")
        return b.families()

    def _same_labels(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The label values of a mount as the same string objects every collection.

        Parsing makes new strings each time; the render's cache of series heads then compares
        every label of every series by content. Given back the first collection's objects, it
        compares them by identity (NFS mounts have thousands of per-operation series).
        """
        same = self._label_sets.get(labels)
        if same is None:
            if len(self._label_sets) >= 10_000:  # mounts come and go: bounded
                self._label_sets.clear()
            same = self._label_sets[labels] = labels
        return same

    def _mounts(self) -> tuple[list[sp.Mount] | None, list[FsMount] | None]:
        """The mount table and the filesystems chosen from it; (None, None) when it is unreadable.

        The table is read every collection but seldom changes: while its bytes are the
        same as last time, so are the mounts and the choice (both pure functions of it and
        of the flags), which are then reused; its problems are counted again each time.
        """
        data, path = self._read_pid_file("mountinfo", "mountinfo")
        if data is None:
            self._mount_table = None
            return None, None
        if self._mount_table is not None and self._mount_table[0] == data:
            _, mounts, chosen, problems = self._mount_table
        else:
            mounts, problems = sp.parse_mountinfo(data)
            chosen = select_filesystems(mounts, self.rootfs, self.filters)
            self._mount_table = (data, mounts, chosen, problems)
        if problems:
            self._problem("mountinfo", path, problems[0], len(problems))
        return mounts, chosen

    def _filesystems(self, b: SampleBuilder, chosen: list[FsMount] | None, outcomes: dict[str, Any]) -> int:
        if chosen is None:  # mountinfo unreadable
            self._fs_state.clear()
            return 0
        stuck = 0
        states: dict[str, str] = {}
        readonly, stuck_rows, error_rows, size, free, avail, files, files_free = (b.rows(n) for n in (
            "filesystem_readonly", "filesystem_stuck", "filesystem_device_error", "filesystem_size_bytes",
            "filesystem_free_bytes", "filesystem_avail_bytes", "filesystem_files", "filesystem_files_free"))
        for f in chosen:
            o = outcomes[f.path]
            lab = self._same_labels(f.labels)
            state = o.state
            readonly.append((lab, 1 if f.readonly else 0))
            stuck_rows.append((lab, 1 if state == STUCK else 0))
            error_rows.append((lab, 1 if state == ERROR else 0))
            if state == OK:
                st = o.result
                size.append((lab, st.f_blocks * st.f_frsize))
                free.append((lab, st.f_bfree * st.f_frsize))
                avail.append((lab, st.f_bavail * st.f_frsize))
                files.append((lab, st.f_files))
                files_free.append((lab, st.f_ffree))
            elif state == STUCK:
                stuck += 1
            elif state == ERROR:
                err = o.error
                state = f"error:{errno.errorcode.get(getattr(err, 'errno', 0) or 0, type(err).__name__)}"
            states[f.path] = state
            self._log_fs_state(f, self._fs_state.get(f.path), state, o)
        self._fs_state = states
        return stuck

    def _log_fs_state(self, f: FsMount, before: str | None, now: str, o: Any) -> None:
        if before == now:
            return
        fields = {"collector": self.name, "mountpoint": f.mountpoint, "device": f.device, "fstype": f.fstype}
        if now == STUCK:
            self.log.warning("filesystem stuck: statfs did not answer in time; not probed again until it does",
                             extra={**fields, "timeout": self.statfs_timeout, "blocked_seconds": round(o.blocked_for, 3)})
        elif now == WAITING:
            self.log.warning("filesystem not measured: every statfs worker is blocked by a stuck mount",
                             extra=fields)
        elif now.startswith("error:"):
            self.log.warning("statfs failed, filesystem size omitted", extra={**fields, "error": str(o.error)})
        elif before is not None:
            self.log.info("filesystem answers statfs again", extra={**fields, "was": before})

    def _nfs(self, b: SampleBuilder, mounts: list[sp.Mount] | None) -> int:
        data, path = self._read_pid_file("mountstats", "mountstats")
        if data is None:
            return 0
        nfs, problems = sp.parse_mountstats(data)
        if problems:
            self._problem("mountstats", path, problems[0], len(problems))
        chosen = select_nfs(nfs, mounts, self.rootfs, self.filters)
        op_rows9 = [(b.scaled_rows(name, exp) if exp else b.rows(name), i) for name, i, exp in NFS_OP_FIELDS]
        op_rows8 = op_rows9[:8]
        for lab, n in chosen:
            lab = self._same_labels(tuple(map(str, lab)))
            if n.bytes is not None:
                by = n.bytes
                b.add("storage_nfs_read_bytes_total", lab + ("normal",), by[0])
                b.add("storage_nfs_read_bytes_total", lab + ("direct",), by[2])
                b.add("storage_nfs_write_bytes_total", lab + ("normal",), by[1])
                b.add("storage_nfs_write_bytes_total", lab + ("direct",), by[3])
                b.add("storage_nfs_server_read_bytes_total", lab, by[4])
                b.add("storage_nfs_server_write_bytes_total", lab, by[5])
            retrans = 0
            for op, v in n.ops.items():
                if v is sp.IDLE8 or v is sp.IDLE9 or not any(v):  # never-used operations: most of them
                    continue
                if v[1] > v[0]:
                    retrans += v[1] - v[0]
                ol = (*lab, op)
                # One row per field of the per-op line (times: integer ms, written as seconds).
                for rows, i in op_rows9 if len(v) == 9 else op_rows8:
                    rows.append((ol, v[i]))
            if n.ops:
                b.add("storage_nfs_retransmissions_total", lab, retrans)
            if n.xprt is not None:
                if "connects" in n.xprt:
                    b.add("storage_nfs_transport_connects_total", lab, n.xprt["connects"])
                b.add("storage_nfs_transport_sends_total", lab, n.xprt["sends"])
                b.add("storage_nfs_transport_receives_total", lab, n.xprt["receives"])
                b.add("storage_nfs_transport_bad_xids_total", lab, n.xprt["bad_xids"])
        return len(chosen)

    def _lustre_root(self) -> str | None:
        for root in (os.path.join(self.sysfs, "kernel/debug/lustre/llite"),
                     os.path.join(self.procfs, "fs/lustre/llite")):
            if os.path.isdir(root):
                return root
        return None

    def _lustre(self, b: SampleBuilder) -> int:
        root = self._lustre_root()
        if root is None:
            return 0
        try:
            instances = sorted(os.listdir(root))
        except OSError as exc:
            self._problem("lustre", root, str(exc))
            return 0
        totals: dict[str, dict[tuple[str, str], float]] = {}
        for inst in instances:
            path = os.path.join(root, inst, "stats")
            data = self._read("lustre", path)
            if data is None:
                continue
            stats, problems = sp.parse_lustre_stats(data)
            if problems:
                self._problem("lustre", path, problems[0], len(problems))
            acc = totals.setdefault(sp.lustre_filesystem(inst), {})
            for s in stats:
                if s.name in ("read_bytes", "write_bytes"):
                    kind = s.name.removesuffix("_bytes")
                    self._add(acc, f"storage_lustre_{kind}s_total", "", s.count)
                    if s.sum is not None or s.count == 0:
                        self._add(acc, f"storage_lustre_{kind}_bytes_total", "", s.sum or 0)
                    continue
                self._add(acc, "storage_lustre_operations_total", s.name, s.count)
                if s.unit == "usecs" and s.sum is not None:
                    self._add(acc, "storage_lustre_operation_seconds_total", s.name, s.sum / 1e6)
        for fs, acc in sorted(totals.items()):
            for (name, op), v in sorted(acc.items()):
                b.add(name, (fs, op) if op else (fs,), v)
        return len(totals)

    @staticmethod
    def _add(acc: dict[tuple[str, str], float], name: str, op: str, v: float) -> None:
        acc[(name, op)] = acc.get((name, op), 0) + v

    def _disks(self, b: SampleBuilder) -> int:
        path = os.path.join(self.procfs, "diskstats")
        data = self._read("diskstats", path)
        if data is None:
            return 0
        disks, problems = sp.parse_diskstats(data)
        if problems:
            self._problem("diskstats", path, problems[0], len(problems))
        n = 0
        seen: set[str] = set()
        for d in disks:
            if not self.filters.disk(d.device) or d.device in seen:
                continue
            seen.add(d.device)
            n += 1
            lab = (d.device,)
            b.add("storage_disk_reads_completed_total", lab, d.reads)
            b.add("storage_disk_writes_completed_total", lab, d.writes)
            b.add("storage_disk_read_bytes_total", lab, d.sectors_read * SECTOR)
            b.add("storage_disk_written_bytes_total", lab, d.sectors_written * SECTOR)
            b.add("storage_disk_read_time_seconds_total", lab, d.read_ms / 1000)
            b.add("storage_disk_write_time_seconds_total", lab, d.write_ms / 1000)
            b.add("storage_disk_io_time_seconds_total", lab, d.io_ms / 1000)
            b.add("storage_disk_io_time_weighted_seconds_total", lab, d.weighted_io_ms / 1000)
            b.add("storage_disk_io_in_flight", lab, d.in_flight)
        return n

    def _nvme(self, b: SampleBuilder) -> None:
        """storage_nvme_info: ``state`` read every collection; model, serial and firmware revision
        (which change only with the drive or a firmware activation) every ``NVME_IDENTITY_TTL``
        seconds, at once for a new controller, and next time again after a failed read."""
        root = os.path.join(self.sysfs, "class/nvme")
        try:
            controllers = sorted(os.listdir(root))
        except FileNotFoundError:
            return
        except OSError as exc:
            self._problem("nvme", root, str(exc))
            return
        now = time.monotonic()
        known, self._nvme_identity = self._nvme_identity, {}
        for ctrl in controllers:
            cdir = os.path.join(root, ctrl)
            cached = known.get(ctrl)
            if cached is not None and now - cached[0] < NVME_IDENTITY_TTL:
                identity = cached[1]
                self._nvme_identity[ctrl] = cached
            else:
                errors = self.parse_errors["nvme"]
                identity = tuple(self._sysfs_attr(os.path.join(cdir, a)) for a in ("model", "serial", "firmware_rev"))
                if self.parse_errors["nvme"] == errors:
                    self._nvme_identity[ctrl] = (now, identity)
            attrs = (*identity, self._sysfs_attr(os.path.join(cdir, "state")))
            if any(attrs):
                b.add("storage_nvme_info", (ctrl, *attrs), 1)

    def _sysfs_attr(self, path: str) -> str:
        """A sysfs attribute of an NVMe controller, stripped; "" when missing or unreadable (counted).
        One read() returns a whole attribute (at most a page): no buffered file object needed."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENODEV, errno.ENXIO):
                return ""
            self._problem("nvme", path, f"{type(exc).__name__}: {exc.strerror or exc}")
            return ""
        return data.decode("utf-8", "replace").strip()

    # -- lifecycle ------------------------------------------------------------------------
    def status(self) -> str:
        return self._summary

    def close(self) -> None:
        self.pool.close()


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from None
    return text


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage collector (--collector.storage)")
    g.add_argument("--collector.storage.mountpoint-include", dest="storage_mountpoint_include",
                   type=_regex, default=MOUNTPOINT_INCLUDE, metavar="REGEX",
                   help="Mountpoints (host paths) reported by filesystem_* and storage_nfs_*.")
    g.add_argument("--collector.storage.mountpoint-exclude", dest="storage_mountpoint_exclude",
                   type=_regex, default=MOUNTPOINT_EXCLUDE, metavar="REGEX",
                   help="Mountpoints left out (wins over include; empty: none).")
    g.add_argument("--collector.storage.fstype-include", dest="storage_fstype_include",
                   type=_regex, default=FSTYPE_INCLUDE, metavar="REGEX",
                   help="Filesystem types reported by filesystem_*: local disk filesystems and shared ones.")
    g.add_argument("--collector.storage.fstype-exclude", dest="storage_fstype_exclude",
                   type=_regex, default=FSTYPE_EXCLUDE, metavar="REGEX",
                   help="Filesystem types left out (wins over include; empty: none).")
    g.add_argument("--collector.storage.disk-include", dest="storage_disk_include",
                   type=_regex, default=DISK_INCLUDE, metavar="REGEX",
                   help="Block devices in <procfs>/diskstats reported by storage_disk_* (whole disks).")
    g.add_argument("--collector.storage.disk-exclude", dest="storage_disk_exclude",
                   type=_regex, default=DISK_EXCLUDE, metavar="REGEX",
                   help="Block devices left out (wins over include; empty: none).")
    g.add_argument("--collector.storage.statfs-timeout", dest="storage_statfs_timeout", type=duration,
                   default=duration("1s"), metavar="DURATION",
                   help="A mount whose statfs takes longer is reported as filesystem_stuck 1. Keep it well "
                        "below --collector.timeout: one collection waits up to twice this long.")
    g.add_argument("--collector.storage.statfs-workers", dest="storage_statfs_workers", type=_workers,
                   default=4, metavar="N",
                   help="Threads that run statfs; each stuck mount holds one until its call returns.")


def create(args: argparse.Namespace) -> StorageCollector:
    timeout = args.storage_statfs_timeout
    collector_timeout = getattr(args, "timeout", None) or max(getattr(args, "interval", 5.0), 2.0)
    if 2 * timeout >= collector_timeout:
        clamped = collector_timeout / 4
        log.warning("--collector.storage.statfs-timeout too close to the collector timeout; lowered",
                    extra={"collector": COLLECTOR_NAME, "requested": timeout, "used": clamped})
        timeout = clamped
    filters = Filters(
        fstype_include=args.storage_fstype_include, fstype_exclude=args.storage_fstype_exclude,
        mountpoint_include=args.storage_mountpoint_include, mountpoint_exclude=args.storage_mountpoint_exclude,
        disk_include=args.storage_disk_include, disk_exclude=args.storage_disk_exclude,
    )
    return StorageCollector(args.procfs, args.sysfs, args.rootfs, filters=filters, statfs_timeout=timeout,
                            statfs_workers=args.storage_statfs_workers)
