"""The mountstats parser's fast path gives exactly what the plain line-by-line parser gives.

``parse_mountstats`` takes each well-formed mount section whole (exporters/storage_parse.py
says why); anything unusual goes line by line. These tests compare it with
``reference_mountstats`` below, a frozen copy of the straightforward parser it replaced, on
the real capture, a bench-style file (20 mounts, full per-op tables, mostly all-zero lines),
the hand-written fixture and malformed variants of each: same mounts, same values, same
problems (messages and line numbers), same order of operations, and never-used operations
are the shared ``IDLE8``/``IDLE9`` objects wherever the reference makes them so. Some tests
also check which path ran, so that the comparisons cover the fast path and not only the
fallback.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

from exporters import storage_parse as sp
from tests.conftest import SHARED_FIXTURES

REAL = SHARED_FIXTURES / "procfs" / "proc" / "26231" / "mountstats"
HAND = Path(__file__).resolve().parent / "fixtures" / "storage" / "proc" / "1" / "mountstats"


def reference_mountstats(data: bytes) -> tuple[list[sp.NfsMount], list[str]]:
    """The parser as it was before the fast path: one line at a time, no caches."""
    idle = {b" " + b" ".join([b"0"] * len(t)): t for t in (sp.IDLE8, sp.IDLE9)}
    mounts: list[sp.NfsMount] = []
    problems: list[str] = []
    cur: sp.NfsMount | None = None
    rpc_version = opts_proto = ""
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
            key, sep, rest = raw.partition(b":")
            if sep:
                values = idle.get(rest)
                if values is None:
                    try:
                        values = tuple(map(int, rest.split()))
                    except ValueError:
                        values = ()
                name = key.strip()
                if name and b" " not in name and name.isascii() and len(values) in (8, 9):
                    cur.ops[name.decode("ascii")] = values  # type: ignore[union-attr]
                    continue
        if raw.startswith(b"device "):
            finish()
            cur, rpc_version, opts_proto, in_ops = None, "", "", False
            m = sp._DEVICE.match(raw)
            if m is None:
                problems.append(f"line {n}: unrecognised device line: {raw[:120]!r}")
                continue
            fstype = m.group(3).decode("utf-8", "replace")
            if fstype not in sp.NFS_FSTYPES or m.group(4) is None:
                continue
            cur = sp.NfsMount(export=os.fsdecode(sp.unescape(m.group(1))),
                              mountpoint=os.fsdecode(sp.unescape(m.group(2))),
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
                values = idle.get(rest) or tuple(map(int, rest.split()))
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
                layout = sp.XPRT_FIELDS.get(proto)
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


NFS4_OPS = ["NULL", "READ", "WRITE", "COMMIT", "OPEN", "OPEN_CONFIRM", "OPEN_NOATTR", "OPEN_DOWNGRADE", "CLOSE", "SETATTR", "FSINFO", "RENEW", "SETCLIENTID", "SETCLIENTID_CONFIRM", "LOCK", "LOCKT", "LOCKU", "ACCESS", "GETATTR", "LOOKUP", "LOOKUP_ROOT", "REMOVE", "RENAME", "LINK", "SYMLINK", "CREATE", "PATHCONF", "STATFS", "READLINK", "READDIR", "SERVER_CAPS", "DELEGRETURN", "GETACL", "SETACL", "FS_LOCATIONS", "RELEASE_LOCKOWNER", "SECINFO", "FSID_PRESENT", "EXCHANGE_ID", "CREATE_SESSION", "DESTROY_SESSION", "SEQUENCE", "GET_LEASE_TIME", "RECLAIM_COMPLETE", "LAYOUTGET", "GETDEVICEINFO", "LAYOUTCOMMIT", "LAYOUTRETURN", "SECINFO_NO_NAME", "TEST_STATEID", "FREE_STATEID", "GETDEVICELIST", "BIND_CONN_TO_SESSION", "DESTROY_CLIENTID", "SEEK", "ALLOCATE", "DEALLOCATE", "LAYOUTSTATS", "CLONE", "COPY", "OFFLOAD_CANCEL", "LOOKUPP", "LAYOUTERROR"]
NFS3_OPS = ["NULL", "GETATTR", "SETATTR", "LOOKUP", "ACCESS", "READLINK", "READ", "WRITE", "CREATE", "MKDIR", "SYMLINK", "MKNOD", "REMOVE", "RMDIR", "RENAME", "LINK", "READDIR", "READDIRPLUS", "FSSTAT", "FSINFO", "PATHCONF", "COMMIT"]
BUSY = {"NULL", "READ", "WRITE", "COMMIT", "OPEN", "CLOSE", "SETATTR", "ACCESS", "GETATTR", "LOOKUP",
        "READDIR", "READDIRPLUS", "FSSTAT", "SEQUENCE"}


def bench_style(seed: int = 42, fields: int = 9) -> bytes:
    """A mountstats like bench/collectors.py writes: 7 local mounts, 20 NFS (v4.2/rdma, v4.1/tcp, v3/tcp)."""
    rng = random.Random(seed)
    r = rng.randrange
    out = [f"device /dev/sd{c} mounted on /local/{c} with fstype ext4\n" for c in "abcdefg"]
    for i in range(20):
        fstype, vers, proto = (("nfs4", "4.2", "rdma"), ("nfs4", "4.1", "tcp"), ("nfs", "3", "tcp"))[i % 3]
        v4 = fstype == "nfs4"
        lines = [f"device nas{i % 4}:/export/p{i:02d} mounted on /nfs/p{i:02d} with fstype {fstype} statvers=1.1",
                 f"\topts:\trw,vers={vers},rsize=1048576,hard,proto={proto},timeo=600,sec=sys",
                 f"\tage:\t{r(10**6)}", "\tcaps:\tcaps=0x3ffbffff,wtmult=512,dtsize=1048576,bsize=0,namlen=255",
                 *(["\tnfsv4:\tbm0=0xfdffbfff,bm1=0x40f9be3e,acl=0x3,sessions,pnfs=not configured"] if v4 else []),
                 "\tsec:\tflavor=1,pseudoflavor=1", "\tevents:\t" + " ".join(str(r(10**6)) for _ in range(27)),
                 "\tbytes:\t" + " ".join(str(r(10**12)) for _ in range(8)),
                 f"\tRPC iostats version: 1.1  p/v: 100003/{4 if v4 else 3} (nfs)",
                 f"\txprt:\t{proto} " + " ".join(str(r(1, 10**6)) for _ in range(25 if proto == "rdma" else 13)),
                 "\tper-op statistics"]
        for op in NFS4_OPS if v4 else NFS3_OPS:
            n = r(1, 10**6) if op in BUSY else 0
            vals = [n, n + r(3), 0, n * 200, n * 300, r(10**5), r(10**6), r(10**6), r(10)][:fields] if n \
                else [0] * fields
            lines.append(f"\t{op:>12}: " + " ".join(map(str, vals)))
        out.append("\n".join(lines) + "\n\n")
    return "".join(out).encode()


def assert_same(data: bytes) -> tuple[list[sp.NfsMount], list[str]]:
    """parse_mountstats(data) equals the reference, with the cache of names cold and then warm."""
    want_mounts, want_problems = reference_mountstats(data)
    for cache in ("cold", "warm"):
        if cache == "cold":
            sp._OP_NAMES.clear()
        got_mounts, got_problems = sp.parse_mountstats(data)
        assert got_problems == want_problems, cache
        assert got_mounts == want_mounts, cache
        for got, want in zip(got_mounts, want_mounts, strict=True):
            assert list(got.ops) == list(want.ops), cache  # same order of operations
            for op, v in want.ops.items():  # the consumer skips never-used operations by identity
                assert (got.ops[op] is sp.IDLE8) == (v is sp.IDLE8), (cache, op)
                assert (got.ops[op] is sp.IDLE9) == (v is sp.IDLE9), (cache, op)
    return got_mounts, got_problems


@pytest.fixture
def slow_sections(monkeypatch):
    """The first line numbers of the sections that went line by line."""
    calls: list[int] = []
    real = sp._parse_lines

    def spy(lines, first, mounts, problems):
        calls.append(first)
        real(lines, first, mounts, problems)

    monkeypatch.setattr(sp, "_parse_lines", spy)
    return calls


def test_bench_style_file_is_parsed_whole_and_equals_the_reference(slow_sections):
    data = bench_style()
    mounts, problems = assert_same(data)
    assert len(mounts) == 20 and problems == []
    slow_sections.clear()
    sp.parse_mountstats(data)
    assert slow_sections == []  # warm: every section took the fast path
    idle = sum(v is sp.IDLE9 for m in mounts for v in m.ops.values())
    busy = [v for m in mounts for v in m.ops.values() if v is not sp.IDLE9]
    assert idle > 600 and len(busy) > 200 and all(len(v) == 9 and any(v) for v in busy)


def test_eight_field_lines_equal_the_reference():
    mounts, _ = assert_same(bench_style(seed=7, fields=8))
    assert {v for m in mounts for v in m.ops.values() if not any(v)} == {sp.IDLE8}
    assert all(v is sp.IDLE8 for m in mounts for v in m.ops.values() if not any(v))


@pytest.mark.skipif(not REAL.exists(), reason="shared fixture procfs/proc/26231/mountstats absent")
def test_real_capture_equals_the_reference(slow_sections):
    data = REAL.read_bytes()
    mounts, _ = assert_same(data)
    assert mounts[0].ops["ACCESS"][5] == 18446743919241604546  # beyond 64 bits signed, as read
    slow_sections.clear()
    sp.parse_mountstats(data)
    assert slow_sections == []


def test_hand_written_fixture_equals_the_reference():
    """NFSv3 and v4 on one mountpoint, 9-field lines, udp/tcp/rdma transports."""
    mounts, _ = assert_same(HAND.read_bytes())
    assert [(m.mountpoint, m.version) for m in mounts if m.mountpoint == "/mnt/shared"] == [
        ("/mnt/shared", "3"), ("/mnt/shared", "4.2")]


def _replace(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.find(old) >= 0, old
    return data.replace(old, new, 1)


BASE = bench_style(seed=3)
MALFORMED = {
    "truncated per-op line": lambda d: re.sub(rb"(\n\t +READ: \d+ \d+)[^\n]*", rb"\1", d, count=1),
    "non-numeric value": lambda d: re.sub(rb"(\n\t +WRITE: \d+) \d+", rb"\1 x12", d, count=1),
    "device line inside a per-op block": lambda d: _replace(
        d, b"\t      COMMIT:", b"device srv:/new mounted on /new with fstype nfs4 statvers=1.1\n\t      COMMIT:"),
    "unrecognised device line inside a per-op block": lambda d: _replace(d, b"\t      COMMIT:", b"device oops\n\t  COMMIT:"),
    "a device line the old parser took as an operation": lambda d: _replace(
        d, b"\t      COMMIT:", b"device : 1 2 3 4 5 6 7 8 9\n\t      COMMIT:"),
    "mount without per-op statistics": lambda d: _replace(d, b"\tper-op statistics\n", b""),
    "NFS mount without statvers": lambda d: _replace(d, b" statvers=1.1\n", b"\n"),
    "per-op marker with a trailing space": lambda d: _replace(d, b"\tper-op statistics\n", b"\tper-op statistics \n"),
    "per-op marker twice": lambda d: _replace(d, b"\t      COMMIT:", b"\tper-op statistics\n\t      COMMIT:"),
    "blank line inside a per-op block": lambda d: _replace(d, b"\t      COMMIT:", b"\n\t      COMMIT:"),
    "whitespace-only line inside a per-op block": lambda d: _replace(d, b"\t      COMMIT:", b" \t\n\t      COMMIT:"),
    "an operation twice": lambda d: _replace(d, b"\t      COMMIT:", b"\t        READ: 0 0 0 0 0 0 0 0 0\n\t      COMMIT:"),
    "an operation twice, used the second time": lambda d: _replace(
        d, b"\t       RENEW: 0", b"\t        NULL: 1 2 3 4 5 6 7 8 9\n\t       RENEW: 0"),
    "eight zeros in a nine-field block": lambda d: _replace(d, b"\t      COMMIT:", b"\t       EXTRA: 0 0 0 0 0 0 0 0\n\t      COMMIT:"),
    "leading zeros": lambda d: re.sub(rb"(\n\t +READ: )(\d+)", rb"\g<1>007", d, count=1),
    "two spaces between values": lambda d: re.sub(rb"(\n\t +READ: \d+) ", rb"\1  ", d, count=1),
    "tab between values": lambda d: re.sub(rb"(\n\t +READ: \d+) ", rb"\1\t", d, count=1),
    "trailing space on a zero line": lambda d: re.sub(rb"(\n\t +RENEW: 0 0 0 0 0 0 0 0 0)", rb"\1 ", d, count=1),
    "no space after the colon": lambda d: re.sub(rb"(\n\t +RENEW):", rb"\1:\t", d, count=1),
    "a colon in the name": lambda d: _replace(d, b"\t      COMMIT:", b"\t   A:B: 0 0 0 0 0 0 0 0 0\n\t      COMMIT:"),
    "a space in the name": lambda d: _replace(d, b"\t      COMMIT:", b"\t   A B: 0 0 0 0 0 0 0 0 0\n\t      COMMIT:"),
    "an empty name": lambda d: _replace(d, b"\t      COMMIT:", b"\t: 1 2 3 4 5 6 7 8 9\n\t      COMMIT:"),
    "a name that is not ASCII": lambda d: _replace(d, b"\t      COMMIT:", "\t  ÉCRIT: 1 2 3 4 5 6 7 8 9\n\t      COMMIT:".encode()),
    "a name with a tab inside": lambda d: _replace(d, b"\t      COMMIT:", b"\t  A\tB: 1 2 3 4 5 6 7 8 9\n\t      COMMIT:"),
    "ten values": lambda d: re.sub(rb"(\n\t +READ: [^\n]*)", rb"\1 5", d, count=1),
    "a negative value": lambda d: re.sub(rb"(\n\t +READ: )", rb"\1-", d, count=1),
    "a value past 64 bits": lambda d: re.sub(rb"(\n\t +READ: )", rb"\g<1>123456789012345678901234567890", d, count=1),
    "CRLF line ends": lambda d: d.replace(b"\n", b"\r\n"),
    "CR line ends": lambda d: d.replace(b"\n", b"\r"),
    "no newline at the end": lambda d: d.rstrip(b"\n"),
    "last line an all-zero one without newline": lambda d: d.rstrip(b"\n").rsplit(b"\n", 1)[0] + b"\n\t   LOOKUPP: 0 0 0 0 0 0 0 0 0",
    "lines before the first device line": lambda d: b"garbage: 1 2 3\n\n" + d,
    "bytes line too short": lambda d: re.sub(rb"(\tbytes:\t\d+ \d+ \d+)[^\n]*", rb"\1", d, count=1),
    "bytes line with a letter": lambda d: re.sub(rb"(\tbytes:\t\d+ )", rb"\1x", d, count=1),
    "bytes line twice": lambda d: re.sub(rb"(\tbytes:\t[^\n]*\n)", rb"\1\tbytes:\t1 2 3 4 5 6 7 8\n", d, count=1),
    "xprt with too few values": lambda d: re.sub(rb"(\txprt:\ttcp \d+ \d+)[^\n]*", rb"\1", d, count=1),
    "xprt with a letter at the end": lambda d: re.sub(rb"(\txprt:\ttcp [^\n]*)", rb"\1 z", d, count=1),
    "xprt of an unknown transport": lambda d: _replace(d, b"\txprt:\ttcp ", b"\txprt:\tvsock "),
    "xprt twice (nconnect)": lambda d: re.sub(rb"(\txprt:\ttcp [^\n]*\n)", rb"\1\txprt:\ttcp 1 2 3 4 5 6 7 8 9 10 11 12 13\n",
                                              d, count=1),
    "header line with a leading space": lambda d: _replace(d, b"\tbytes:\t", b" \t bytes:\t"),
    "opts without vers and proto": lambda d: re.sub(rb",(vers|proto)=[^,\n]*", b"", d, count=4),
    "opts with a bare vers": lambda d: _replace(d, b"vers=4.1,", b"vers,"),
    "opts with vers twice": lambda d: _replace(d, b"vers=3,", b"vers=3,vers=3.0,"),
    "RPC line without p/v": lambda d: re.sub(rb"p/v: \d+/\d+", b"p/v: ?", d, count=2),
    "escaped mountpoint": lambda d: _replace(d, b" on /nfs/p01 ", b" on /nfs/p\\04001 "),
    "udp transport": lambda d: re.sub(rb"\txprt:\ttcp( \d+){13}", b"\txprt:\tudp 1 2 3 4 5 6 7 8", d, count=1),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_equals_the_reference(name):
    assert_same(MALFORMED[name](BASE))


def test_a_malformed_section_goes_line_by_line_and_only_that_one(slow_sections):
    data = MALFORMED["non-numeric value"](BASE)
    sp.parse_mountstats(data)  # warm the names
    slow_sections.clear()
    mounts, problems = sp.parse_mountstats(data)
    assert len(slow_sections) == 1 and len(mounts) == 20
    assert len(problems) == 1 and problems[0].startswith(f"line {slow_sections[0] + 13}: invalid literal")


def test_random_damage_equals_the_reference():
    """Bytes deleted, inserted and lines repeated at random spots, 150 times (seeded)."""
    rng = random.Random(1234)
    base = HAND.read_bytes() + bench_style(seed=5)[:6000]
    alphabet = b"0 9:\n\t-x.device per-op statistics"
    for _ in range(150):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            kind = rng.randrange(3)
            if kind == 0:
                del data[at:at + rng.randrange(1, 8)]
            elif kind == 1:
                data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 6)))
            else:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b"\n", at) + 1 or len(data)
                data[start:start] = data[start:end]
        assert_same(bytes(data))


def test_never_used_operations_are_the_shared_idle_objects():
    """The contract storage._nfs relies on: `v is IDLE8 or v is IDLE9` for every all-zero line."""
    for data in (bench_style(), bench_style(fields=8), HAND.read_bytes()):
        sp.parse_mountstats(data)
        mounts, _ = sp.parse_mountstats(data)
        zeros = [v for m in mounts for v in m.ops.values() if not any(v)]
        assert zeros and all(v is sp.IDLE8 or v is sp.IDLE9 for v in zeros)


def test_mountinfo_paths_decode_as_os_fsdecode_does():
    """parse_mountinfo decodes paths itself now: same result as os.fsdecode, undecodable bytes included."""
    mounts, problems = sp.parse_mountinfo(b"36 35 98:0 /a\\040b /mnt/\xff\\011x rw,noatime - ext4 /dev/\xfe rw\n")
    assert problems == []
    m = mounts[0]
    assert (m.root, m.mountpoint, m.source) == (os.fsdecode(b"/a b"), os.fsdecode(b"/mnt/\xff\tx"),
                                                os.fsdecode(b"/dev/\xfe"))
    assert sp.parse_mountinfo(b"36 35 98-0 / /x rw - ext4 /dev/x rw\n")[1]  # no ":" in major:minor: reported
