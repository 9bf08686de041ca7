"""Tests for exporters.gpu_xid: catalogue, PCI keys, kernel-log parsing and the follower."""

from __future__ import annotations

import logging
import os
import termios
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporters import gpu_xid
from exporters.gpu_xid import (
    XID_CATALOGUE,
    XID_CLASSES,
    KmsgFollower,
    KmsgXid,
    catalogue_markdown,
    classify,
    describe,
    parse_kmsg_line,
    pci_key,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0  # generous: every wait below returns as soon as its condition holds

XID79_KMSG = "6,1234,5678901,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus."
XID79_DMESG = "[  123.456789] NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus."


def xid_line(code: int, bus: str = "3b", pid: str = "4242", text: str = "something happened") -> str:
    return f"[ 10.000000] NVRM: Xid (PCI:0000:{bus}:00): {code}, pid={pid}, name=python, {text}"


# --------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------

EXPECTED_CLASSES = {
    # reboot: drain, reset/reboot, inspect if it recurs
    46: "reboot", 48: "reboot", 61: "reboot", 62: "reboot", 63: "reboot", 64: "reboot",
    74: "reboot", 79: "reboot", 95: "reboot", 109: "reboot", 110: "reboot", 119: "reboot",
    120: "reboot", 123: "reboot", 140: "reboot", 143: "reboot",
    144: "reboot", 145: "reboot", 146: "reboot", 147: "reboot", 148: "reboot", 149: "reboot",
    150: "reboot",
    # hardware inspection
    54: "hw_inspection", 56: "hw_inspection", 57: "hw_inspection", 81: "hw_inspection",
    122: "hw_inspection",
    # application: check the job, do not drain
    8: "app", 13: "app", 31: "app", 32: "app", 43: "app", 68: "app", 69: "app", 94: "app",
    # harmless
    38: "ignore", 45: "ignore", 92: "ignore", 121: "ignore", 154: "ignore",
}


@pytest.mark.parametrize(("code", "expected"), sorted(EXPECTED_CLASSES.items()))
def test_classify_named_codes(code: int, expected: str) -> None:
    assert classify(code) == expected
    assert describe(code) == XID_CATALOGUE[code].description


def test_reference_classes() -> None:
    # shared/REFERENCE.md: reboot-class, contained ECC restarts the app, app-level, harmless.
    assert {classify(c) for c in (48, 63, 64, 74, 79, 95, 119, 120)} == {"reboot"}
    assert classify(94) == "app"
    assert {classify(c) for c in (13, 31, 43)} == {"app"}
    assert {classify(c) for c in (45, 92)} == {"ignore"}
    assert describe(79) == "GPU has fallen off the bus"


@pytest.mark.parametrize("code", [0, 1, 5, 12, 999, 100000, -1])
def test_unknown_codes(code: int) -> None:
    assert classify(code) == "unknown"
    assert describe(code) == "unknown Xid"


def test_catalogue_is_well_formed() -> None:
    assert XID_CLASSES == ("reboot", "hw_inspection", "app", "ignore", "unknown")
    assert len(XID_CATALOGUE) >= 40
    for code, entry in XID_CATALOGUE.items():
        assert entry.code == code
        assert entry.xid_class in XID_CLASSES
        assert entry.xid_class != "unknown"
        assert entry.description and entry.action
        assert "\n" not in entry.description + entry.action
    with pytest.raises(AttributeError):
        XID_CATALOGUE[79].xid_class = "ignore"  # type: ignore[misc]


def test_catalogue_markdown_table() -> None:
    table = catalogue_markdown()
    lines = table.splitlines()
    assert lines[0].startswith("| Xid |")
    assert len(lines) == 2 + len(XID_CATALOGUE)
    assert "| 79 | GPU has fallen off the bus | `reboot` |" in table
    codes = [int(line.split("|")[1]) for line in lines[2:]]
    assert codes == sorted(XID_CATALOGUE)


def test_committed_doc_contains_generated_table() -> None:
    doc = (ROOT / "docs" / "xid-catalogue.md").read_text(encoding="utf-8")
    assert catalogue_markdown() in doc, (
        "docs/xid-catalogue.md is stale: regenerate its table with "
        "exporters.gpu_xid.catalogue_markdown()"
    )
    assert "https://docs.nvidia.com/deploy/xid-errors/" in doc
    assert "https://github.com/leptonai/gpud/" in doc


# --------------------------------------------------------------------------------------------
# PCI keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    ["00000000:3B:00.0", "0000:3b:00", "0000:3b:00.0", "0000:3B:00.0", "PCI:0000:3b:00", " 0000:3b:00.0\n", "3b:00.0"],
)
def test_pci_key_equivalence(addr: str) -> None:
    assert pci_key(addr) == (0, 0x3B, 0)


def test_pci_key_distinguishes_domain_bus_device() -> None:
    assert pci_key("00000001:3B:00.0") == pci_key("0001:3b:00") == (1, 0x3B, 0)
    assert pci_key("0000:3b:01.0") == (0, 0x3B, 1)
    assert pci_key("0000:3b:00.0") != pci_key("0000:3c:00.0")
    assert pci_key("0000:3b:00.0") == pci_key("0000:3b:00.1")  # function is not part of the key


@pytest.mark.parametrize(
    "addr", ["", "garbage", "0000:3b", "0000:3g:00", "0000:3b:20.0", "0000:3b:00.8", "000000000:3b:00", ":3b:00", None, 42]
)
def test_pci_key_unparsable(addr: object) -> None:
    assert pci_key(addr) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# parse_kmsg_line
# --------------------------------------------------------------------------------------------


def test_parse_kmsg_record() -> None:
    x = parse_kmsg_line(XID79_KMSG, boot_time=1000.0)
    assert x == KmsgXid(
        pci=(0, 0x3B, 0),
        pci_bus_id="0000:3b:00",
        xid=79,
        pid=1234,
        message="pid=1234, name=python, GPU has fallen off the bus.",
        timestamp=pytest.approx(1005.678901),
    )


def test_parse_dmesg_line() -> None:
    x = parse_kmsg_line(XID79_DMESG, boot_time=1000.0)
    assert x is not None
    assert (x.pci, x.xid, x.pid) == ((0, 0x3B, 0), 79, 1234)
    assert x.timestamp == pytest.approx(1123.456789)
    assert x.message.endswith("GPU has fallen off the bus.")


def test_parse_unknown_pid_variant() -> None:
    line = "[ 5107.644336] NVRM: Xid (PCI:0000:ca:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
    x = parse_kmsg_line(line, boot_time=0.0)
    assert x is not None
    assert x.pid is None
    assert x.xid == 79 and x.pci == (0, 0xCA, 0)
    assert x.message == "pid='<unknown>', name=<unknown>, GPU has fallen off the bus."


@pytest.mark.parametrize(
    ("line", "xid", "pid", "pci"),
    [
        (
            "NVRM: Xid (PCI:0000:10:1c): 63, pid=1896, Row Remapper: New row marked for remapping, reset gpu to activate.",
            63, 1896, (0, 0x10, 0x1C),
        ),
        (
            "[ 5027.107226] NVRM: Xid (PCI:0000:3b:00): 119, pid=2546, name=nvidia-smi, Timeout after 6s of waiting "
            "for RPC response from GPU0 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20808513 0x598).",
            119, 2546, (0, 0x3B, 0),
        ),
        (
            "4,512,9876543210,-,caller=T42;NVRM: Xid (PCI:0000:b3:00): 154, GPU recovery action changed from 0x0 (None) "
            "to 0x1 (Reset).\n SUBSYSTEM=pci\n DEVICE=+pci:0000:b3:00.0\n",
            154, None, (0, 0xB3, 0),
        ),
        (
            "May 18 19:02:39 node17 kernel: NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus.",
            79, None, (0, 0x2B, 0),
        ),
        (
            "[Mon May 18 19:02:39 2025] NVRM: Xid (PCI:0000:2b:00): 94, pid=77, name=train.py, Ch 00000008, errorString CTX SWITCH TIMEOUT",
            94, 77, (0, 0x2B, 0),
        ),
        ("Jan 18 11:38:05 localhost kernel: [ 269.517039] NVRM: Xid (0000:01:00): 13, Graphics Exception", 13, None, (0, 1, 0)),
    ],
)
def test_parse_real_looking_lines(line: str, xid: int, pid: int | None, pci: tuple[int, int, int]) -> None:
    x = parse_kmsg_line(line)
    assert x is not None
    assert (x.xid, x.pid, x.pci) == (xid, pid, pci)
    assert "\n" not in x.message


def test_parse_154_message_and_kmsg_continuation() -> None:
    x = parse_kmsg_line(
        "4,512,2000000,-;NVRM: Xid (PCI:0000:b3:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 (Reset).\n"
        " SUBSYSTEM=pci\n DEVICE=+pci:0000:b3:00.0",
        boot_time=10.0,
    )
    assert x is not None
    assert x.message == "GPU recovery action changed from 0x0 (None) to 0x1 (Reset)."
    assert x.timestamp == pytest.approx(12.0)


def test_timestamps_default_to_wall_clock() -> None:
    before = time.time()
    x = parse_kmsg_line("NVRM: Xid (PCI:0000:3b:00): 13, pid=1, name=a, Graphics Exception")
    after = time.time()
    assert x is not None and before <= x.timestamp <= after

    # boot-relative time without boot_time: converted with the current boot time estimate
    y = parse_kmsg_line(XID79_KMSG)
    assert y is not None
    assert y.timestamp == pytest.approx(time.time() - time.monotonic() + 5.678901, abs=1.0)


@pytest.mark.parametrize(
    "line",
    [
        "6,1235,5678902,-;NVRM: GPU at PCI:0000:3b:00: GPU-0b11d014-1685-04bd-26ed-5fc0bc1c44ae",
        "[ 1.000] NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024",
        "NVRM: GPU 0000:2b:00.0: GPU has fallen off the bus.",
        "NVRM: GPU at 0000:01:00.0 has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00): , pid=1",
        "NVRM: Xid (PCI:nonsense): 79, pid=1, name=x, GPU has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00) 79 missing colon",
        "NVRM: Xid (PCI:0000:3b:00): 1234567890, pid=1",
        "6,1,2,-;kernel: eth0: link up",
        "",
        "\x00\x01\x02",
        "NVRM: Xid",
    ],
)
def test_non_xid_lines(line: str) -> None:
    assert parse_kmsg_line(line) is None


@pytest.mark.parametrize("bad", [None, b"NVRM: Xid (PCI:0000:3b:00): 79, x", 42, object()])
def test_parse_non_strings(bad: object) -> None:
    assert parse_kmsg_line(bad) is None  # type: ignore[arg-type]


def _check_result(x: KmsgXid | None) -> None:
    if x is not None:
        assert isinstance(x.xid, int) and x.xid >= 0
        assert len(x.pci) == 3 and all(isinstance(v, int) for v in x.pci)
        assert x.pid is None or isinstance(x.pid, int)
        assert isinstance(x.timestamp, float)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parse_never_raises_on_text(line: str) -> None:
    _check_result(parse_kmsg_line(line))


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_parse_never_raises_on_decoded_bytes(raw: bytes) -> None:
    _check_result(parse_kmsg_line(raw.decode("utf-8", "replace")))


_prefixes = st.sampled_from(["", "6,1,2,-;", "[ 1.5] ", "4,99,18446744073709551615,c;", "[ 99999999999.999999999] ", "x;"])


@settings(max_examples=400, deadline=None)
@given(
    prefix=_prefixes,
    addr=st.text(max_size=20),
    code=st.text(alphabet="0123456789-+ x", max_size=12),
    rest=st.text(max_size=40),
    boot=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_parse_never_raises_on_near_misses(prefix: str, addr: str, code: str, rest: str, boot: float | None) -> None:
    _check_result(parse_kmsg_line(f"{prefix}NVRM: Xid ({addr}): {code}, {rest}", boot_time=boot))


@settings(max_examples=200, deadline=None)
@given(
    bus=st.integers(0, 255),
    dev=st.integers(0, 31),
    code=st.integers(0, 999999),
    pid=st.one_of(st.none(), st.integers(0, 4194304)),
)
def test_parse_roundtrip(bus: int, dev: int, code: int, pid: int | None) -> None:
    pid_text = "'<unknown>'" if pid is None else str(pid)
    x = parse_kmsg_line(f"6,1,1000000,-;NVRM: Xid (PCI:0000:{bus:02x}:{dev:02x}): {code}, pid={pid_text}, name=p, m", 0.0)
    assert x is not None
    assert (x.pci, x.xid, x.pid) == ((0, bus, dev), code, pid)
    assert x.pci == pci_key(f"00000000:{bus:02X}:{dev:02X}.0")
    assert x.timestamp == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# KmsgFollower
# --------------------------------------------------------------------------------------------


class Collector:
    """Collects delivered Xids; waits on a condition, not on sleeps."""

    def __init__(self) -> None:
        self.items: list[KmsgXid] = []
        self.cond = threading.Condition()

    def __call__(self, x: KmsgXid) -> None:
        with self.cond:
            self.items.append(x)
            self.cond.notify_all()

    def wait_count(self, n: int, timeout: float = TIMEOUT) -> list[KmsgXid]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.items) >= n, timeout)
            assert ok, f"expected {n} Xids, got {[x.xid for x in self.items]}"
            return list(self.items)

    def xids(self) -> list[int]:
        with self.cond:
            return [x.xid for x in self.items]


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture
def log() -> tuple[logging.Logger, ListHandler]:
    logger = logging.getLogger(f"test.gpu_xid.{id(object())}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


@pytest.fixture
def followers():
    started: list[KmsgFollower] = []
    yield started
    for f in started:
        f.stop()


def wait_until(pred, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        ev.wait(0.005)


def append(path: Path, *lines: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")


def make(followers, path, on_xid, **kw) -> KmsgFollower:
    kw.setdefault("poll_interval", 0.01)
    f = KmsgFollower(str(path), on_xid, **kw)
    followers.append(f)
    f.start()
    return f


def test_file_preexisting_and_appended_lines(tmp_path: Path, followers, log) -> None:
    path = tmp_path / "kern.log"
    append(path, "[ 1.0] unrelated line", xid_line(79), xid_line(13, bus="3c"))
    got = Collector()
    f = make(followers, path, got, logger=log[0])
    items = got.wait_count(2)
    assert [x.xid for x in items] == [79, 13]
    assert items[1].pci == pci_key("00000000:3C:00.0")
    assert f.healthy and f.lines_read >= 3

    append(path, "[ 2.0] another unrelated line", xid_line(48))
    items = got.wait_count(3)
    assert items[2].xid == 48
    wait_until(lambda: f.lines_read == 5)
    assert f.last_error is None


def test_file_partial_line_waits_for_newline(tmp_path: Path, followers) -> None:
    path = tmp_path / "kern.log"
    path.write_text("")
    got = Collector()
    f = make(followers, path, got)
    wait_until(lambda: f.healthy)
    with open(path, "a") as fh:
        fh.write("[ 3.0] NVRM: Xid (PCI:0000:3b:00): 7")
        fh.flush()
        fh.write("9, pid=1, name=x, GPU has fallen off the bus.\n")
    assert [x.xid for x in got.wait_count(1)] == [79]


def test_file_from_start_false_skips_existing(tmp_path: Path, followers) -> None:
    path = tmp_path / "kern.log"
    append(path, xid_line(31), xid_line(43))
    got = Collector()
    f = make(followers, path, got, from_start=False)
    wait_until(lambda: f.healthy)
    append(path, xid_line(95))
    assert [x.xid for x in got.wait_count(1)] == [95]
    assert got.xids() == [95]


def test_file_truncation(tmp_path: Path, followers, log) -> None:
    path = tmp_path / "kern.log"
    filler = "x" * 200
    append(path, xid_line(79, text=filler), xid_line(48, text=filler), xid_line(74, text=filler))
    got = Collector()
    make(followers, path, got, logger=log[0])
    got.wait_count(3)
    # truncate and write less than before (as `> kern.log` plus a new line would)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(xid_line(119) + "\n")
    items = got.wait_count(4)
    assert items[3].xid == 119
    assert any("truncated" in r.getMessage() for r in log[1].records)


def test_file_rotation(tmp_path: Path, followers, log) -> None:
    path = tmp_path / "kern.log"
    append(path, xid_line(79))
    got = Collector()
    f = make(followers, path, got, logger=log[0])
    got.wait_count(1)
    os.rename(path, tmp_path / "kern.log.1")
    append(path, xid_line(120), xid_line(92))  # new inode at the same path
    items = got.wait_count(3)
    assert [x.xid for x in items] == [79, 120, 92]
    wait_until(lambda: f.healthy)
    # the old file is no longer followed
    append(tmp_path / "kern.log.1", xid_line(8))
    append(path, xid_line(13))
    items = got.wait_count(4)
    assert items[3].xid == 13
    assert 8 not in got.xids()


def test_file_missing_then_appears(tmp_path: Path, followers, log) -> None:
    logger, handler = log
    path = tmp_path / "later" / "kern.log"

    attempts = threading.Semaphore(0)

    class Counting(KmsgFollower):
        def _follow_once(self) -> None:
            super()._follow_once()
            attempts.release()

    got = Collector()
    f = Counting(str(path), got, poll_interval=0.01, logger=logger)
    followers.append(f)
    f.start()
    for _ in range(5):  # several retries while the file is missing
        assert attempts.acquire(timeout=TIMEOUT)
    assert not f.healthy
    assert f.last_error is not None and "No such file" in f.last_error
    warnings = handler.warnings()
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per state change, not per retry
    assert "No such file" in warnings[0].__dict__["reason"]

    path.parent.mkdir()
    append(path, xid_line(64))
    assert got.wait_count(1)[0].xid == 64
    wait_until(lambda: f.healthy)

    # removed again: unhealthy, and picked up again (from the start) when recreated
    path.unlink()
    wait_until(lambda: not f.healthy)
    append(path, xid_line(63))
    assert got.wait_count(2)[1].xid == 63
    wait_until(lambda: f.healthy)


def test_unreadable_path_is_unhealthy(tmp_path: Path, followers, log) -> None:
    got = Collector()
    f = make(followers, tmp_path, got, logger=log[0])  # a directory: neither file nor device
    wait_until(lambda: f.last_error is not None)
    assert not f.healthy
    assert len(log[1].warnings()) == 1


def test_callback_exception_does_not_kill_thread(tmp_path: Path, followers, log) -> None:
    logger, handler = log
    path = tmp_path / "kern.log"
    got = Collector()
    calls: list[int] = []

    def on_xid(x: KmsgXid) -> None:
        calls.append(x.xid)
        if len(calls) == 1:
            raise RuntimeError("boom")
        got(x)

    append(path, xid_line(79), xid_line(48))
    f = make(followers, path, on_xid, logger=logger)
    assert [x.xid for x in got.wait_count(1)] == [48]
    assert calls == [79, 48]
    assert f.healthy
    assert any(r.exc_info for r in handler.records)


@pytest.mark.parametrize("state", ["file", "missing"])
def test_stop_is_prompt(tmp_path: Path, state: str) -> None:
    path = tmp_path / "kern.log"
    if state == "file":
        append(path, xid_line(79))
    f = KmsgFollower(str(path), Collector(), poll_interval=30.0)
    f.start()
    if state == "file":
        wait_until(lambda: f.lines_read == 1)
    else:
        wait_until(lambda: f.last_error is not None)
    thread = f._thread
    assert thread is not None and thread.daemon
    t0 = time.monotonic()
    f.stop()
    assert time.monotonic() - t0 < 1.0
    assert not thread.is_alive()


def test_start_twice_raises(tmp_path: Path, followers) -> None:
    f = make(followers, tmp_path / "kern.log", Collector())
    with pytest.raises(RuntimeError):
        f.start()


# -- character devices ------------------------------------------------------------------------


@pytest.fixture
def pty_device():
    """A pseudo-terminal: its slave is a character device that returns one line per read."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO  # nobody reads the master side
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_device_records(pty_device, followers, log) -> None:
    master, dev = pty_device
    got = Collector()
    f = make(followers, dev, got, logger=log[0], poll_interval=30.0)  # waits use poll(), not the interval
    wait_until(lambda: f.healthy)
    os.write(master, (XID79_KMSG + "\n").encode())
    os.write(master, b"6,1236,5679000,-;usb 1-1: new device\n")
    os.write(master, b"4,1237,5680000,-;NVRM: Xid (PCI:0000:3c:00): 94, pid=9, name=x, Contained ECC error.\n")
    items = got.wait_count(2)
    assert [(x.xid, x.pci) for x in items] == [(79, (0, 0x3B, 0)), (94, (0, 0x3C, 0))]
    wait_until(lambda: f.lines_read == 3)
    t0 = time.monotonic()
    thread = f._thread
    f.stop()
    assert time.monotonic() - t0 < 1.0
    assert thread is not None and not thread.is_alive()


def test_device_epipe_is_logged_once_and_skipped(pty_device, followers, log, monkeypatch) -> None:
    logger, handler = log
    master, dev = pty_device
    real_read = gpu_xid._kmsg_read
    failures = iter([True, True, False])

    def flaky_read(fd: int) -> bytes:
        data = real_read(fd)  # raises BlockingIOError when there is nothing to read
        if next(failures, False):
            raise BrokenPipeError(32, "Broken pipe")
        return data

    monkeypatch.setattr(gpu_xid, "_kmsg_read", flaky_read)
    got = Collector()
    f = make(followers, dev, got, logger=logger)
    wait_until(lambda: f.healthy)
    os.write(master, b"6,1,1,-;NVRM: Xid (PCI:0000:3b:00): 13, pid=1, name=a, lost\n")
    os.write(master, b"6,2,2,-;NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=a, lost\n")
    os.write(master, b"6,3,3,-;NVRM: Xid (PCI:0000:3b:00): 43, pid=1, name=a, kept\n")
    assert [x.xid for x in got.wait_count(1)] == [43]
    assert f.records_lost == 2
    assert f.healthy
    epipe = [r for r in handler.warnings() if "overwritten" in r.getMessage()]
    assert len(epipe) == 1


def test_real_dev_kmsg_if_readable(followers) -> None:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        pytest.skip(f"/dev/kmsg not readable: {exc}")
    os.close(fd)
    f = make(followers, "/dev/kmsg", Collector(), poll_interval=30.0)
    wait_until(lambda: f.healthy)
    t0 = time.monotonic()
    f.stop()
    assert time.monotonic() - t0 < 1.0
    assert f.last_error is None or "overwritten" in f.last_error
