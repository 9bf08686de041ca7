"""Parsers for the kernel files the storage collector reads.

Pure functions from file content to records, so they are tested on captured
and hand-written files without touching the machine. Each returns the records
it could read and a list of problems; a malformed line costs only the series
it would have fed, never the rest of the file (the collector counts and logs
the problems).

Formats (Linux ``Documentation/filesystems/proc.rst``, ``iostats.rst``;
``fs/nfs/super.c`` and ``net/sunrpc/stats.c`` for mountstats; Lustre's
``lprocfs_stats_seq_show`` for llite stats).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")


def unescape(raw: bytes) -> bytes:
    """Undo the kernel's octal escapes in mount paths (``\\040`` space, ``\\011`` tab, ...)."""
    if b"\\" not in raw:
        return raw
    return _OCTAL.sub(lambda m: bytes((int(m.group(1), 8),)), raw)


def label_text(path: str) -> str:
    """A label value for a path decoded with surrogateescape: invalid UTF-8 becomes U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- mountinfo -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/<pid>/mountinfo."""

    mount_id: int
    parent_id: int
    dev: str  # major:minor of the superblock (one per filesystem instance)
    root: str  # the directory of the filesystem mounted here ("/" unless a bind of a subdirectory)
    mountpoint: str  # as the kernel prints it (decoded, surrogateescape)
    options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


def parse_mountinfo(data: bytes) -> tuple[list[Mount], list[str]]:
    """``36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue``."""
    mounts: list[Mount] = []
    problems: list[str] = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        f = line.split()
        try:
            sep = f.index(b"-", 6)
            if len(f) < sep + 3 or b":" not in f[2]:
                raise ValueError("too few fields")
            mounts.append(Mount(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                dev=f[2].decode("ascii"),
                root=os.fsdecode(unescape(f[3])),
                mountpoint=os.fsdecode(unescape(f[4])),
                options=frozenset(f[5].decode("utf-8", "replace").split(",")),
                fstype=f[sep + 1].decode("utf-8", "replace"),
                source=os.fsdecode(unescape(f[sep + 2])),
                super_options=frozenset(f[sep + 3].decode("utf-8", "replace").split(",")) if len(f) > sep + 3
                else frozenset(),
            ))
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"line {n}: {exc}: {line[:120]!r}")
    return mounts, problems


# -- mountstats (NFS client) -------------------------------------------------------------

_DEVICE = re.compile(rb"^device (\S+) mounted on (\S+) with fstype (\S+)(?: statvers=(\S+))?\s*$")
NFS_FSTYPES = ("nfs", "nfs4")
# xprt: fields after the transport name (net/sunrpc/xprtsock.c, xprtrdma/transport.c).
# tcp and rdma: port bind_count connect_count connect_time idle_time sends recvs bad_xids req_u bklog_u ...
# udp:          port bind_count sends recvs bad_xids req_u bklog_u ...
XPRT_FIELDS = {
    "tcp": {"connects": 2, "sends": 5, "receives": 6, "bad_xids": 7},
    "rdma": {"connects": 2, "sends": 5, "receives": 6, "bad_xids": 7},
    "udp": {"sends": 2, "receives": 3, "bad_xids": 4},
}


@dataclass
class NfsMount:
    """One NFS mount's section of /proc/<pid>/mountstats."""

    export: str
    mountpoint: str
    fstype: str
    statvers: str
    version: str = ""
    protocol: str = ""
    bytes: tuple[int, ...] | None = None  # normal read/write, direct read/write, server read/write, pages r/w
    xprt: dict[str, int] | None = None
    ops: dict[str, tuple[int, ...]] = field(default_factory=dict)  # 8 fields, 9 with errors


# The values of a never-used operation, shared by every such line (8 fields, 9 on newer kernels).
IDLE8, IDLE9 = (0,) * 8, (0,) * 9
_IDLE_OPS = {b" " + b" ".join([b"0"] * len(t)): t for t in (IDLE8, IDLE9)}
# "        READ" -> "READ": the operation names (a few dozen per NFS version), decoded once.
_OP_NAMES: dict[bytes, str] = {}


def _op_name(raw_key: bytes) -> str:
    """The name of a per-op line's key, "" when it is not one (empty, spaces inside, not ASCII)."""
    key = raw_key.strip()
    name = key.decode("ascii") if key and b" " not in key and key.isascii() else ""
    if name and len(_OP_NAMES) < 1024:  # bounded: a garbage file cannot grow it without end
        _OP_NAMES[raw_key] = name
    return name


def parse_mountstats(data: bytes) -> tuple[list[NfsMount], list[str]]:
    mounts: list[NfsMount] = []
    problems: list[str] = []
    cur: NfsMount | None = None
    rpc_version = ""
    opts_proto = ""
    in_ops = False

    def finish() -> None:
        if cur is None:
            return
        if not cur.version:
            cur.version = rpc_version or ("4" if cur.fstype == "nfs4" else "")
        if not cur.protocol:
            cur.protocol = opts_proto.rstrip("6") or "unknown"
        mounts.append(cur)

    for n, raw in enumerate(data.splitlines(), 1):
        if in_ops:
            # Per-op lines are most of the file: take the well-formed ones here, anything else
            # (a device line, a malformed line) goes the general way below.
            key, sep, rest = raw.partition(b":")
            if sep:
                values = _IDLE_OPS.get(rest)
                if values is None:
                    try:
                        values = tuple(map(int, rest.split()))
                    except ValueError:
                        values = ()
                name = _OP_NAMES.get(key)
                if name is None:
                    name = _op_name(key)
                if name and len(values) in (8, 9):
                    cur.ops[name] = values  # type: ignore[union-attr] - in_ops implies cur
                    continue
        if raw.startswith(b"device "):
            finish()
            cur, rpc_version, opts_proto, in_ops = None, "", "", False
            m = _DEVICE.match(raw)
            if m is None:
                problems.append(f"line {n}: unrecognised device line: {raw[:120]!r}")
                continue
            fstype = m.group(3).decode("utf-8", "replace")
            if fstype not in NFS_FSTYPES:
                continue
            if m.group(4) is None:
                continue  # an NFS mount without statistics (still being set up)
            cur = NfsMount(export=os.fsdecode(unescape(m.group(1))), mountpoint=os.fsdecode(unescape(m.group(2))),
                           fstype=fstype, statvers=m.group(4).decode("ascii", "replace"))
            continue
        if cur is None:
            continue
        line = raw.strip()
        if not line:
            continue
        key, _, rest = line.partition(b":")
        try:
            if in_ops:
                # Most operations of a mount are never used: their lines are all zeros.
                values = _IDLE_OPS.get(rest) or tuple(map(int, rest.split()))
                if len(values) not in (8, 9) or not key or b" " in key:
                    raise ValueError(f"expected 8 or 9 values, got {len(values)}")
                cur.ops[key.decode("ascii")] = values
            elif key == b"opts":
                for opt in rest.strip().decode("utf-8", "replace").split(","):
                    name, _, val = opt.partition("=")
                    if name == "vers":
                        cur.version = val
                    elif name == "proto":
                        opts_proto = val
            elif key == b"bytes":
                values = tuple(map(int, rest.split()))
                if len(values) < 6:
                    raise ValueError(f"expected at least 6 values, got {len(values)}")
                cur.bytes = values
            elif key == b"xprt":
                parts = rest.split()
                proto = parts[0].decode("ascii") if parts else ""
                layout = XPRT_FIELDS.get(proto)
                if layout is None:
                    raise ValueError(f"unknown transport {proto!r}")
                values = [int(v) for v in parts[1:]]
                if len(values) <= max(layout.values()):
                    raise ValueError(f"{proto}: too few values ({len(values)})")
                cur.xprt = {name: values[i] for name, i in layout.items()}
                cur.protocol = proto
            elif line.startswith(b"RPC iostats version:"):
                m = re.search(rb"p/v: \d+/(\d+)", line)
                if m:
                    rpc_version = m.group(1).decode()
            elif line == b"per-op statistics":
                in_ops = True
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"line {n}: {exc}: {raw[:120]!r}")
    finish()
    return mounts, problems


# -- Lustre llite stats ----------------------------------------------------------------

LUSTRE_SKIP = ("snapshot_time", "start_time", "elapsed_time")


@dataclass(frozen=True)
class LustreStat:
    name: str
    count: int
    unit: str
    sum: int | None  # None when the line has no min/max/sum


def parse_lustre_stats(data: bytes) -> tuple[list[LustreStat], list[str]]:
    """``read_bytes 17 samples [bytes] 0 4096 69632`` / ``open 2 samples [usecs] 5 30 61 1325``."""
    stats: list[LustreStat] = []
    problems: list[str] = []
    for n, raw in enumerate(data.splitlines(), 1):
        f = raw.decode("utf-8", "replace").split()
        if not f or f[0] in LUSTRE_SKIP:
            continue
        try:
            if len(f) < 4 or f[2] != "samples" or not (f[3].startswith("[") and f[3].endswith("]")):
                raise ValueError("expected NAME COUNT samples [UNIT] ...")
            total = int(f[6]) if len(f) >= 7 else None
            stats.append(LustreStat(f[0], int(f[1]), f[3][1:-1], total))
        except ValueError as exc:
            problems.append(f"line {n}: {exc}: {raw[:120]!r}")
    return stats, problems


LUSTRE_INSTANCE = re.compile(r"^(?P<fs>.+)-(?P<instance>[0-9a-f]{8,16})$")


def lustre_filesystem(dirname: str) -> str:
    """``scratch-ffff8f2a3c5e1000`` -> ``scratch`` (the suffix is the superblock address)."""
    m = LUSTRE_INSTANCE.match(dirname)
    return m.group("fs") if m else dirname


# -- diskstats -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskStat:
    device: str
    reads: int
    reads_merged: int
    sectors_read: int
    read_ms: int
    writes: int
    writes_merged: int
    sectors_written: int
    write_ms: int
    in_flight: int
    io_ms: int
    weighted_io_ms: int


def parse_diskstats(data: bytes) -> tuple[list[DiskStat], list[str]]:
    """``259 0 nvme0n1 r rm sr rt w wm sw wt inflight io_ms weighted_ms [discard... flush...]``."""
    disks: list[DiskStat] = []
    problems: list[str] = []
    for n, raw in enumerate(data.splitlines(), 1):
        f = raw.split()
        if not f:
            continue
        try:
            if len(f) < 14:
                raise ValueError(f"expected at least 14 fields, got {len(f)}")
            v = [int(x) for x in f[3:14]]
            int(f[0]), int(f[1])
            disks.append(DiskStat(f[2].decode("utf-8", "replace"), *v))
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"line {n}: {exc}: {raw[:120]!r}")
    return disks, problems
