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

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter

_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # what os.fsdecode() uses


# A note on speed: ``sub in some_bytes`` first tries ``sub`` as an integer (``65 in b"A"``),
# which for a bytes ``sub`` raises and clears a TypeError: ~2,000 instructions where
# ``some_bytes.find(sub)`` takes a few hundred. The parsers here use find().


def unescape(raw: bytes) -> bytes:
    """Undo the kernel's octal escapes in mount paths (``\\040`` space, ``\\011`` tab, ...)."""
    if raw.find(b"\\") < 0:  # find(), not `in`: see the note above
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
            if len(f) < sep + 3 or f[2].find(b":") < 0:
                raise ValueError("too few fields")
            mounts.append(Mount(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                dev=f[2].decode("ascii"),
                root=unescape(f[3]).decode(_FS_ENCODING, _FS_ERRORS),  # os.fsdecode(), without its Python layer
                mountpoint=unescape(f[4]).decode(_FS_ENCODING, _FS_ERRORS),
                options=frozenset(f[5].decode("utf-8", "replace").split(",")),
                fstype=f[sep + 1].decode("utf-8", "replace"),
                source=unescape(f[sep + 2]).decode(_FS_ENCODING, _FS_ERRORS),
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
    """The NFS mounts of /proc/<pid>/mountstats and the problems of its malformed lines.

    Why two paths: the file is ~60 lines per NFS mount, most of them per-operation lines
    and most of those all zeros (an operation never used), and parsing it line by line in
    Python cost ~11 M instructions on the bench node (20 mounts). Each mount's section (from
    its ``device`` line to the next) is independent, so a well-formed section is taken whole
    (``_fast_section``: the zero lines by splitting the block at their common ending, the
    numbers of the used ones by one JSON parse); a section it does not take is parsed by
    ``_parse_lines``, line by line, so results and problems are the same either way.
    """
    if data.find(b"\r") >= 0:  # splitlines() also ends a line at \r or \r\n: the sections below split at \n only
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    mounts: list[NfsMount] = []
    problems: list[str] = []
    chunks = data.split(b"\ndevice ")
    if chunks[0].startswith(b"device "):
        chunks[0] = chunks[0][7:]
        start = 0
    else:  # lines before the first device line belong to no mount
        start = len(chunks.pop(0)) + 1
    for chunk in chunks:
        line_at, start = start, start + len(chunk) + 8  # offsets of this device line and of the next
        nl = chunk.find(b"\n")
        head = chunk if nl < 0 else chunk[:nl]
        m = _DEVICE_TAIL.match(head)
        if m is None:
            raw = b"device " + head
            if _is_op_line(raw):  # the line-by-line path would take it as an operation of the mount before
                mounts.clear()
                problems.clear()
                _parse_lines(data.splitlines(), 1, mounts, problems)
                break
            problems.append(f"line {data.count(_NL, 0, line_at) + 1}: unrecognised device line: {raw[:120]!r}")
            continue
        fstype = m.group(3).decode("utf-8", "replace")
        if fstype not in NFS_FSTYPES or m.group(4) is None:
            continue  # not NFS, or an NFS mount without statistics (still being set up)
        cur = NfsMount(export=unescape(m.group(1)).decode(_FS_ENCODING, _FS_ERRORS),
                       mountpoint=unescape(m.group(2)).decode(_FS_ENCODING, _FS_ERRORS),
                       fstype=fstype, statvers=m.group(4).decode("ascii", "replace"))
        if nl >= 0 and _fast_section(cur, chunk, nl + 1):
            mounts.append(cur)
        else:
            _parse_lines((b"device " + chunk).split(b"\n"), data.count(b"\n", 0, line_at) + 1, mounts, problems)
    return mounts, problems


# What ends the line of a never-used operation, by the number of fields.
_IDLE_END = {IDLE9: b": 0 0 0 0 0 0 0 0 0\n", IDLE8: b": 0 0 0 0 0 0 0 0\n"}
_DEVICE_TAIL = re.compile(_DEVICE.pattern.removeprefix(b"^device "))
_PER_OP = b"\tper-op statistics\n"
# What a header line the line-by-line path acts on starts with (after strip()).
_HEADER_KEYS = (b"opts:", b"bytes:", b"xprt:", b"RPC iostats version:", b"per-op statistics")
_RPC_PROGRAM = re.compile(rb"p/v: \d+/(\d+)")
_NL = b"\n"
# xprt: the names of the fields used, a getter of them from the line's words, the words needed
_XPRT = {proto: (tuple(layout), itemgetter(*(i + 1 for i in layout.values())), max(layout.values()) + 2)
         for proto, layout in XPRT_FIELDS.items()}
_JSON = json.JSONDecoder()


def _fast_section(cur: NfsMount, chunk: bytes, pos: int) -> bool:
    """Fill ``cur`` from its section (header lines from ``pos``), or False where anything is unusual.

    Unusual: whatever ``_parse_lines`` would report as a problem, a per-op statistics line
    not in the kernel's form, a per-op line ``_fast_ops`` does not take. Of the header only
    the lines ``_parse_lines`` acts on are looked at closely.
    """
    i = chunk.find(_PER_OP, pos)
    if i < 0 or chunk[i - 1] != 10:  # 10: "\n", the marker starts a line (chunk[pos - 1] ends the device line)
        return False
    rpc_version = opts_proto = ""
    for raw in chunk[pos:i].split(b"\n"):
        line = raw.strip()
        if not line.startswith(_HEADER_KEYS):
            continue
        if line.startswith(b"opts:"):
            opts = "," + line[5:].strip().decode("utf-8", "replace") + ","
            vers = _last_option(opts, "vers")
            if vers is not None:
                cur.version = vers
            proto = _last_option(opts, "proto")
            if proto is not None:
                opts_proto = proto
        elif line.startswith(b"bytes:"):
            try:
                values = tuple(map(int, line[6:].split()))
            except ValueError:
                return False
            if len(values) < 6:
                return False
            cur.bytes = values
        elif line.startswith(b"xprt:"):
            parts = line[5:].split()
            proto = parts[0].decode("ascii", "replace") if parts else ""
            names, getter, needed = _XPRT.get(proto) or ((), None, 0)
            # Only the fields used are converted: plain digits (shorter than any int() limit) all would be.
            if getter is None or len(parts) < needed or len(line) > 600 or not b"".join(parts[1:]).isdigit():
                return False
            cur.xprt = dict(zip(names, map(int, getter(parts)), strict=True))
            cur.protocol = proto
        elif line.startswith(b"RPC"):
            m = _RPC_PROGRAM.search(line)
            if m:
                rpc_version = m.group(1).decode()
        else:  # a per-op statistics line before the one found above
            return False
    ops = _fast_ops(chunk[i + len(_PER_OP):])
    if ops is None:
        return False
    cur.ops = ops
    if not cur.version:
        cur.version = rpc_version or ("4" if cur.fstype == "nfs4" else "")
    if not cur.protocol:
        cur.protocol = opts_proto.rstrip("6") or "unknown"
    return True


def _last_option(opts: str, name: str) -> str | None:
    """The value of the last option ``name`` (``name=value``, or bare: "") in ``,opt,opt=v,...,``."""
    eq = opts.rfind(f",{name}=")
    bare = opts.rfind(f",{name},")
    if bare > eq:
        return ""
    if eq < 0:
        return None
    start = eq + len(name) + 2
    return opts[start:opts.index(",", start)]


def _fast_ops(block: bytes) -> dict[str, tuple[int, ...]] | None:
    """The operations of a per-op block whose lines are all ``KEY: N N ...`` (8 or 9 plain decimals).

    KEY must be in ``_OP_NAMES`` (filled by the line-by-line path), which also means it has
    no ":", so the line splits where the line-by-line path splits it. The all-zero lines
    split the block: each piece but the last ends with such a line's KEY, after the lines
    of any used operations; their numbers are converted together by ``_decimal_rows``.
    None where any line is otherwise (blank, malformed, a repeated name, an unknown KEY).
    """
    if not block.endswith(b"\n"):
        block += b"\n"
    idle = IDLE9 if block.find(_IDLE_END[IDLE9]) >= 0 else IDLE8
    pieces = block.split(_IDLE_END[idle])
    tail = pieces.pop().rstrip(b"\n")  # lines after the last never-used operation's; blank lines
    get = _OP_NAMES.get
    names = list(map(get, pieces))
    if not tail and None not in names:
        return dict(zip(names, repeat(idle)))
    ops: dict[str, tuple[int, ...] | None] = {}
    busy: list[str] = []
    rows: list[bytes] = []
    for name, piece in zip(names, pieces, strict=True):
        if name is None:  # lines of used operations, then the KEY of this never-used one
            *lines, key = piece.split(b"\n")
            name = get(key)
            if name is None or not _take_rows(lines, ops, busy, rows):
                return None
        ops[name] = idle
    if tail and not _take_rows(tail.split(b"\n"), ops, busy, rows):
        return None
    values = _decimal_rows(rows) if rows else []
    if values is None or len(ops) != len(names) + len(busy):
        return None  # a repeated name: the line-by-line path keeps the last line's values
    ops.update(zip(busy, values, strict=True))
    return ops  # type: ignore[return-value] - every None was replaced


def _take_rows(lines: list[bytes], ops: dict[str, object], busy: list[str], rows: list[bytes]) -> bool:
    """Note each used operation's line (``KEY: N N ...``) in order: its place in ``ops``, name and numbers."""
    get = _OP_NAMES.get
    for line in lines:
        key, _, row = line.partition(b": ")
        op = get(key)
        if op is None:
            return False
        ops[op] = None  # its place; its values come later
        busy.append(op)
        rows.append(row)
    return True


def _decimal_rows(rows: Sequence[bytes]) -> list[tuple[int, ...]] | None:
    """The numbers of each row (``b"12 0 345"``), or None unless each is 8 or 9 single-spaced decimals.

    As one JSON document the C scanner converts them for ~40% fewer instructions than
    ``int()`` per field. Only digits and single spaces get that far, so it yields ints or
    fails (a leading zero, which int() would take, fails here and goes the slow way). A row
    equal to an all-zero one goes the slow way too: there it is the shared IDLE8/IDLE9.
    """
    if b" ".join(rows).translate(None, b"0123456789 "):
        return None
    doc = (b"[[" + b"],[".join(rows) + b"]]").replace(b" ", b",").decode("ascii")
    try:
        lists, end = _JSON.raw_decode(doc)
    except ValueError:
        return None
    values = list(map(tuple, lists))
    if end != len(doc) or not {8, 9}.issuperset(map(len, values)) or IDLE8 in values or IDLE9 in values:
        return None
    return values


def _is_op_line(raw: bytes) -> bool:
    """Whether the line-by-line path takes ``raw`` as a per-op line (while in a per-op block)."""
    key, sep, rest = raw.partition(b":")
    if not sep:
        return False
    values = _IDLE_OPS.get(rest)
    if values is None:
        try:
            values = tuple(map(int, rest.split()))
        except ValueError:
            return False
    return len(values) in (8, 9) and bool(_OP_NAMES.get(key) or _op_name(key))


def _parse_lines(lines: Iterable[bytes], first: int, mounts: list[NfsMount], problems: list[str]) -> None:
    """Mountstats line by line (``first`` is the number of the first line): the reference behaviour.

    ``parse_mountstats`` runs it on each section that ``_fast_section`` does not take.
    """
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

    for n, raw in enumerate(lines, first):
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
            v = list(map(int, f[3:14]))
            int(f[0]), int(f[1])
            disks.append(DiskStat(f[2].decode("utf-8", "replace"), *v))
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"line {n}: {exc}: {raw[:120]!r}")
    return disks, problems
