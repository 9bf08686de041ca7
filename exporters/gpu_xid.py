"""NVIDIA Xid catalogue, kernel-log parsing and a kernel-log follower.

The NVIDIA driver reports GPU faults ("Xid errors") to the kernel log as::

    NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.

This module

* classifies Xid codes into operator classes (:data:`XID_CLASSES`), following NVIDIA's Xid
  catalogue and leptonai/gpud's table; ``docs/xid-catalogue.md`` is generated from
  :data:`XID_CATALOGUE` by :func:`catalogue_markdown` and explains the choices;
* parses ``/dev/kmsg`` records and ``dmesg`` lines (:func:`parse_kmsg_line`);
* follows ``/dev/kmsg`` (or a regular file, ``tail -F`` style) on a background thread
  (:class:`KmsgFollower`).

Regenerate the table in the doc with::

    python -c 'from exporters.gpu_xid import catalogue_markdown; print(catalogue_markdown(), end="")'
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "XID_CLASSES",
    "XidEntry",
    "XID_CATALOGUE",
    "classify",
    "describe",
    "catalogue_markdown",
    "pci_key",
    "KmsgXid",
    "parse_kmsg_line",
    "KmsgFollower",
]

XID_CLASSES = ("reboot", "hw_inspection", "app", "ignore", "unknown")


@dataclass(frozen=True)
class XidEntry:
    code: int
    description: str  # short, e.g. "GPU has fallen off the bus"
    xid_class: str  # one of XID_CLASSES (never "unknown" in the table itself)
    action: str  # short recommended operator action


# Class meanings:
#   reboot        the GPU/node needs a GPU reset or reboot before reuse: drain it. Escalate to
#                 hardware inspection when a reboot does not clear it (gpud's policy).
#   hw_inspection hardware is likely bad: drain and open an RMA/inspection ticket.
#   app           an application fault: check the job first, do not drain.
#   ignore        harmless or informational: never alert.
#
# The primary source is NVIDIA's Xid catalogue (immediate "resolution bucket"); deviations and
# disagreements with gpud are listed in docs/xid-catalogue.md.
_R, _H, _A, _I = "reboot", "hw_inspection", "app", "ignore"

_ENTRIES: tuple[tuple[int, str, str, str], ...] = (
    (8, "GPU stopped processing", _A,
     "Restart the job; contact NVIDIA support if it recurs"),
    (13, "Graphics engine exception", _A,
     "Check the job (illegal memory access, bad kernel); run DCGM diagnostics if it recurs on one GPU"),
    (31, "GPU memory page fault", _A,
     "Check the job (illegal address access, compute-sanitizer); inspect the GPU only if it recurs"),
    (32, "Invalid or corrupted push buffer stream (PBDMA)", _A,
     "Restart the job; if it recurs on one GPU, reboot and check the PCIe link"),
    (38, "Driver firmware error (FECS watchdog timeout)", _I,
     "None; contact NVIDIA support if it recurs"),
    (43, "GPU stopped processing (channel reset after a software fault)", _A,
     "Check the job that owned the channel; the GPU stays usable"),
    (45, "Preemptive cleanup after a previous error or a killed application", _I,
     "None; act on the Xid that preceded it (alone: check fabric manager)"),
    (46, "GPU stopped processing (GPU timeout)", _R,
     "Drain, reset the GPU or reboot; contact support if it recurs"),
    (48, "Double-bit ECC error (DBE)", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs after reboot"),
    (54, "Auxiliary power is not connected to the GPU board", _H,
     "Drain and check power cables and mechanicals"),
    (56, "Display engine error", _H,
     "Drain and contact support (not expected on Ampere and newer data-centre GPUs)"),
    (57, "Error programming video memory interface", _H,
     "Drain and contact support (not expected on Ampere and newer data-centre GPUs)"),
    (61, "Internal micro-controller breakpoint/warning", _R,
     "Drain, reset the GPU or reboot; contact support if it recurs"),
    (62, "Internal micro-controller halt", _R,
     "Drain, reset the GPU or reboot; inspect hardware if it recurs"),
    (63, "ECC page retirement or row-remapping recording event", _R,
     "Drain when convenient and reset the GPU so the remap takes effect; inspect if it recurs"),
    (64, "ECC page retirement or row-remapping recording failure", _R,
     "Drain and reset the GPU / reboot; inspect hardware (RMA) if it recurs"),
    (68, "NVDEC0 (video decoder) exception", _A,
     "Restart the job; contact support if it recurs"),
    (69, "Graphics engine class error", _A,
     "Check the job (CUDA/application bug); contact support if it recurs"),
    (74, "NVLink error", _R,
     "Drain and reset the GPU / reboot; inspect the NVLink/NVSwitch hardware if it recurs"),
    (79, "GPU has fallen off the bus", _R,
     "Drain and reboot the node; inspect hardware (PCIe, power, thermals) if it recurs"),
    (81, "VGA subsystem error", _H,
     "Drain and open a hardware inspection"),
    (92, "High single-bit ECC error rate", _I,
     "None (corrected errors); watch the ECC and remapped-row counters"),
    (94, "Contained ECC error", _A,
     "Restart the affected application; reset the GPU when convenient to apply row remapping"),
    (95, "Uncontained ECC error", _R,
     "Drain and reset the GPU / reboot now; inspect hardware if it recurs"),
    (109, "Context switch timeout", _R,
     "Drain and reset the GPU; contact support if it recurs"),
    (110, "Security fault error", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs"),
    (119, "GSP RPC timeout", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs"),
    (120, "GSP error", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs"),
    (121, "C2C link corrected error", _I,
     "None (corrected, no operational impact); retrain the link at the next reset"),
    (122, "SPI PMU RPC read failure", _H,
     "Drain and contact support"),
    (123, "SPI PMU RPC write failure", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs"),
    (140, "ECC unrecovered error", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs"),
    (143, "GPU initialization failure", _R,
     "Drain and reset the GPU / reboot; inspect hardware if it recurs"),
    (144, "NVLink: SAW error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (145, "NVLink: RLW error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (146, "NVLink: TLW error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (147, "NVLink: TREX error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (148, "NVLink: NVLPW_CTRL error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (149, "NVLink: NETIR error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (150, "NVLink: MSE error", _R,
     "Drain and reset the GPU per NVIDIA's NVLink5 workflow; decode the error status"),
    (154, "GPU recovery action changed", _I,
     "None itself; act on the Xid it accompanies (see the GPU recovery action)"),
)

XID_CATALOGUE: dict[int, XidEntry] = {
    code: XidEntry(code=code, description=desc, xid_class=cls, action=action)
    for code, desc, cls, action in _ENTRIES
}


def classify(code: int) -> str:
    """The operator class of an Xid code; ``"unknown"`` for codes not in the catalogue."""
    entry = XID_CATALOGUE.get(code)
    return entry.xid_class if entry is not None else "unknown"


def describe(code: int) -> str:
    """A short description of an Xid code; ``"unknown Xid"`` for codes not in the catalogue."""
    entry = XID_CATALOGUE.get(code)
    return entry.description if entry is not None else "unknown Xid"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def catalogue_markdown() -> str:
    """Render :data:`XID_CATALOGUE` as a Markdown table (the one in docs/xid-catalogue.md)."""
    lines = [
        "| Xid | Description | Class | Recommended action |",
        "| ---: | --- | --- | --- |",
    ]
    for code in sorted(XID_CATALOGUE):
        e = XID_CATALOGUE[code]
        lines.append(
            f"| {e.code} | {_md_cell(e.description)} | `{e.xid_class}` | {_md_cell(e.action)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# PCI addresses
# --------------------------------------------------------------------------------------------

# [domain:]bus:device[.function], hexadecimal, optionally prefixed "PCI:" (as in Xid lines).
_PCI_RE = re.compile(
    r"^(?:pci:)?(?:(?P<domain>[0-9a-f]{1,8}):)?(?P<bus>[0-9a-f]{1,2}):(?P<device>[0-9a-f]{1,2})"
    r"(?:\.(?P<function>[0-7]))?$",
    re.IGNORECASE,
)


def pci_key(bus_id: str) -> tuple[int, int, int] | None:
    """Normalise a PCI address to ``(domain, bus, device)``.

    NVML's ``"00000000:3B:00.0"``, the kernel's ``"0000:3b:00"`` and ``"0000:3b:00.0"`` (and
    ``"PCI:0000:3b:00"`` as written in Xid lines) all give ``(0, 0x3b, 0)``. The function
    number is dropped (Xid lines do not carry it). ``None`` if the string is not a PCI address.
    """
    if not isinstance(bus_id, str):
        return None
    m = _PCI_RE.match(bus_id.strip())
    if m is None:
        return None
    domain = int(m.group("domain") or "0", 16)
    bus = int(m.group("bus"), 16)
    device = int(m.group("device"), 16)
    if device > 0x1F:  # 5-bit device number
        return None
    return (domain, bus, device)


# --------------------------------------------------------------------------------------------
# Kernel log parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KmsgXid:
    pci: tuple[int, int, int]  # pci_key of the address
    pci_bus_id: str  # as written in the log (without the "PCI:" prefix), e.g. "0000:3b:00"
    xid: int
    pid: int | None
    message: str  # the rest of the line after the code
    timestamp: float  # wall-clock seconds


# /dev/kmsg record: "<prio>,<seq>,<usec>,<flags>[,<more>];<message>" (Documentation/ABI/testing/dev-kmsg)
_KMSG_RE = re.compile(r"^\s*\d{1,10},\d{1,20},(?P<usec>\d{1,20})(?:,[^;]*)?;(?P<msg>.*)$", re.DOTALL)
# dmesg: "[  123.456789] message" (the bracket may also hold "dmesg -T" wall-clock text)
_DMESG_TS_RE = re.compile(r"^\s*(?:<\d{1,3}>)?\[\s*(?P<sec>\d{1,12}\.\d{1,9})\]")  # "dmesg -r": "<4>[...]"
# The Xid itself; the code is bounded so int() can never hit the digit limit.
_XID_RE = re.compile(
    r"NVRM: Xid \((?P<addr>[^()\s]{1,64})\): (?P<xid>\d{1,6})(?:,\s?(?P<rest>.*))?$",
    re.DOTALL,
)
_PID_RE = re.compile(r"^pid=(?P<val>'[^']*'|\"[^\"]*\"|[^,\s]*)")


def _default_boot_time() -> float:
    # kmsg timestamps come from the kernel's local clock, which tracks CLOCK_MONOTONIC.
    return time.time() - time.monotonic()


def parse_kmsg_line(line: str, boot_time: float | None = None) -> KmsgXid | None:
    """Parse one kernel log line or /dev/kmsg record; ``None`` unless it is an Xid report.

    Accepts ``/dev/kmsg`` records (``"6,1234,5678901,-;NVRM: Xid (PCI:...): 79, ..."``), dmesg
    lines (``"[ 123.456] NVRM: Xid ..."``) and any line containing the ``NVRM: Xid`` report
    (syslog/journal prefixes). The boot-relative time of a kmsg record or a dmesg bracket is
    converted to wall-clock seconds with ``boot_time`` (default: now minus the monotonic
    clock); lines without one are stamped with ``time.time()``. Never raises.
    """
    try:
        return _parse(line, boot_time)
    except Exception:  # defensive: garbage must never take the caller down
        return None


def _parse(line: str, boot_time: float | None) -> KmsgXid | None:
    if not isinstance(line, str) or "NVRM: Xid" not in line:
        return None
    text = line.split("\n", 1)[0].rstrip("\r")  # a kmsg record's key=value continuation lines
    rel: float | None = None
    km = _KMSG_RE.match(text)
    if km is not None:
        rel = int(km.group("usec")) / 1e6
        text = km.group("msg")
    else:
        dm = _DMESG_TS_RE.match(text)
        if dm is not None:
            rel = float(dm.group("sec"))
    m = _XID_RE.search(text)
    if m is None:
        return None
    addr = m.group("addr")
    key = pci_key(addr)
    if key is None:
        return None
    rest = (m.group("rest") or "").strip()
    pid: int | None = None
    pm = _PID_RE.match(rest)
    if pm is not None:
        val = pm.group("val").strip("'\"")
        if val.isascii() and val.isdigit() and len(val) <= 10:
            pid = int(val)
    if rel is not None:
        base = _default_boot_time() if boot_time is None else boot_time
        timestamp = base + rel
    else:
        timestamp = time.time()
    return KmsgXid(
        pci=key,
        pci_bus_id=addr[4:] if addr[:4].upper() == "PCI:" else addr,
        xid=int(m.group("xid")),
        pid=pid,
        message=rest,
        timestamp=timestamp,
    )


# --------------------------------------------------------------------------------------------
# Kernel log follower
# --------------------------------------------------------------------------------------------

_KMSG_RECORD_MAX = 16384  # a read smaller than the next record fails with EINVAL
_MAX_PARTIAL_LINE = 1 << 20


def _kmsg_read(fd: int) -> bytes:
    """One ``read(2)`` on a kmsg-like device (one record per call). Patched in tests."""
    return os.read(fd, _KMSG_RECORD_MAX)


class KmsgFollower:
    """Background thread following the kernel log for Xid lines.

    ``path`` may be a character device (``/dev/kmsg``: one record per non-blocking read) or a
    regular file (followed like ``tail -F``: appended lines, truncation, replacement). A missing
    or unreadable path is retried every ``poll_interval`` while :attr:`healthy` is False; the
    reason is logged once per state change. ``on_xid`` is called on the follower thread for
    every Xid line; its exceptions are logged and do not stop the follower.

    ``from_start=False`` skips what the path holds when it is first opened (``tail -n0 -F``);
    a file that appears or is replaced later is always read from its start.
    """

    def __init__(
        self,
        path: str,
        on_xid: Callable[[KmsgXid], None],
        *,
        from_start: bool = True,
        poll_interval: float = 0.5,
        logger: logging.Logger | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.path = path
        self._on_xid = on_xid
        self._from_start = from_start
        self._poll_interval = poll_interval
        self._log = logger or logging.getLogger(__name__)
        self.lines_read = 0
        self.xids_seen = 0
        self.records_lost = 0  # EPIPE: kmsg records overwritten before we read them
        self._healthy = False
        self._last_error: str | None = None
        self._logged_state: tuple[bool, str | None] | None = None
        self._epipe_logged = False
        self._first_open = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while the path cannot be opened or read."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        """The most recent error (kept after recovery), or None if there never was one."""
        return self._last_error

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("KmsgFollower already started")
        self._stop.clear()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=f"kmsg-follower:{self.path}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._log.warning("kmsg follower did not stop in time", extra={"path": self.path})
                return  # leave the wake pipe to the (daemon) thread
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = None

    # -- state and delivery -------------------------------------------------------------------

    def _set_healthy(self, mode: str) -> None:
        self._healthy = True
        state = (True, None)
        if self._logged_state != state:
            self._logged_state = state
            self._log.info("following kernel log", extra={"path": self.path, "mode": mode})

    def _set_unhealthy(self, reason: str, exc_info: bool = False) -> None:
        self._healthy = False
        self._last_error = reason
        state = (False, reason)
        if self._logged_state != state:
            self._logged_state = state
            self._log.warning(
                "cannot follow kernel log", extra={"path": self.path, "reason": reason}, exc_info=exc_info
            )

    def _handle_line(self, raw: bytes) -> None:
        self.lines_read += 1
        line = raw.decode("utf-8", "replace")
        xid = parse_kmsg_line(line)
        if xid is None:
            return
        self.xids_seen += 1
        try:
            self._on_xid(xid)
        except Exception:
            self._log.exception("Xid callback failed", extra={"path": self.path, "xid": xid.xid})

    def _wait(self, timeout: float) -> None:
        self._stop.wait(timeout)

    # -- thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow_once()
            except Exception as exc:  # never let the thread die
                self._set_unhealthy(f"unexpected error: {exc!r}", exc_info=True)
                self._wait(self._poll_interval)

    def _follow_once(self) -> None:
        """Open the path and follow it until it must be reopened (or stop)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._open_failed(exc)
            return
        if stat.S_ISCHR(st.st_mode):
            self._follow_device()
        elif stat.S_ISREG(st.st_mode):
            self._follow_file()
        else:
            self._first_open = False
            self._set_unhealthy("not a character device or regular file")
            self._wait(self._poll_interval)

    def _open_failed(self, exc: OSError) -> None:
        self._first_open = False
        self._set_unhealthy(f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, exc.errno)})")
        self._wait(self._poll_interval)

    # /dev/kmsg --------------------------------------------------------------------------------

    def _follow_device(self) -> None:
        try:
            # O_NOCTTY: harmless for /dev/kmsg, keeps a tty path from becoming our controlling tty
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            self._open_failed(exc)
            return
        try:
            if self._first_open and not self._from_start:
                with contextlib.suppress(OSError):
                    os.lseek(fd, 0, os.SEEK_END)  # kmsg: position after the last record
            self._first_open = False
            self._set_healthy("device")
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)
            if self._wake_r is not None:
                poller.register(self._wake_r, select.POLLIN)
            timeout_ms = max(1, int(self._poll_interval * 1000))
            while not self._stop.is_set():
                try:
                    record = _kmsg_read(fd)
                except BlockingIOError:  # EAGAIN: no record yet
                    poller.poll(timeout_ms)
                    continue
                except InterruptedError:  # EINTR
                    continue
                except BrokenPipeError:  # EPIPE: records overwritten since the last read
                    self._records_lost()
                    continue
                except OSError as exc:
                    self._set_unhealthy(f"read failed: {exc.strerror or exc}")
                    self._wait(self._poll_interval)
                    return
                if not record:  # EOF (not expected from /dev/kmsg)
                    self._wait(self._poll_interval)
                    continue
                self._set_healthy("device")
                # One record per read; continuation lines (" KEY=value") belong to it.
                self._handle_line(record.split(b"\n", 1)[0])
        finally:
            os.close(fd)

    def _records_lost(self) -> None:
        self.records_lost += 1
        self._last_error = "kernel log records were overwritten before they were read"
        if not self._epipe_logged:
            self._epipe_logged = True
            self._log.warning(
                "kernel log records were overwritten before they were read; continuing",
                extra={"path": self.path},
            )
        else:
            self._log.debug("kernel log records overwritten again", extra={"path": self.path})

    # regular file ----------------------------------------------------------------------------

    def _follow_file(self) -> None:
        try:
            f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in finally
        except OSError as exc:
            self._open_failed(exc)
            return
        try:
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
            if self._first_open and not self._from_start:
                f.seek(0, io.SEEK_END)
            self._first_open = False
            self._set_healthy("file")
            pending = b""
            while not self._stop.is_set():
                try:
                    chunk = f.read(65536)
                except OSError as exc:
                    self._set_unhealthy(f"read failed: {exc.strerror or exc}")
                    self._wait(self._poll_interval)
                    return
                if chunk:
                    self._set_healthy("file")
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    if len(pending) > _MAX_PARTIAL_LINE:  # garbage without newlines: drop it
                        pending = b""
                    for line in lines:
                        if self._stop.is_set():
                            return
                        self._handle_line(line)
                    continue
                # At end of file: was it truncated, replaced or removed?
                try:
                    cur = os.stat(self.path)
                except FileNotFoundError:
                    return  # removed: the caller retries opening it (and reports it missing)
                except OSError as exc:
                    self._set_unhealthy(f"stat failed: {exc.strerror or exc}")
                    return
                if (cur.st_dev, cur.st_ino) != ident:
                    self._log.info("kernel log file replaced; reopening", extra={"path": self.path})
                    return  # the caller reopens the new file from its start
                if cur.st_size < f.tell():
                    self._log.info("kernel log file truncated; reading from start", extra={"path": self.path})
                    f.seek(0)
                    pending = b""
                    continue
                self._wait(self._poll_interval)
        finally:
            f.close()
