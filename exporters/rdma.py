"""The RDMA collector: InfiniBand, RoCE, Omni-Path and iWARP ports from sysfs.

Reads ``<--path.sysfs>/class/infiniband/<device>/`` as the kernel lays it out
(``drivers/infiniband/core/sysfs.c``): device identity (``fw_ver``, ``board_id``,
``hca_type``, ``node_guid``), per-port ``state``, ``phys_state``, ``rate`` and
``link_layer``, the PMA counters in ``counters/`` (and ``counters_ext/`` with
the 64-bit data and packet counters on older kernels), and the vendor's
``hw_counters/`` where the RoCE congestion story lives (CNPs, ECN marks,
retransmissions, sequence errors).

Failure rules: sysfs on real machines is untidy. A port without a performance
management agent reads ``N/A (no PMA)``; some drivers fail a read with EINVAL,
EPERM or EIO; Omni-Path and iWARP devices lack files that Mellanox HCAs have.
A file that cannot be read or parsed drops only its own series, is logged once
per (file, error) and is counted in ``gpufleet_exporter_rdma_read_errors_total``;
``N/A`` values and files a device simply does not have are not errors. Nothing
here raises out of ``collect`` for a single bad device.

Cost: a node with 8 HCAs has ~500 sysfs files to read per collection. What
rarely changes (device identity, each port's link layer and netdev, the list of
counter files) is read at a rescan, every ``--collector.rdma.rescan-interval``
(1m) and at once for a new device, after a failed read or when a listed counter
file vanishes; state, phys_state, rate and every counter are read each time,
relative to a directory fd of the port held from one rescan to the next: the
kernel then resolves one or two path components per file instead of the whole
``/sys/class/infiniband/<device>/ports/<n>/...`` path (through the class
symlink). Every read stays what reading by path would be: the fd is checked
against the path once per port and collection (a driver reload or a device
rename replaces the directory: the fd is reopened), and a file it no longer has
is read by its path. Each counter file is also held open and read with
``pread`` at offset 0, which makes sysfs run the attribute's ``show()`` afresh:
one syscall per counter instead of open/read/close (~50 fds per port, held only
while half of the soft ``RLIMIT_NOFILE`` stays free; otherwise each read opens
its file). A counter directory whose inode or mtime changed is reopened. The
fds are closed at the next rescan, when the device disappears and in
``close()`` (the agent calls it at shutdown).

Link flaps: ``rdma_port_state_changes_total`` counts how often the collector
saw a port's state id change between two collections. A flap that goes down
and up again between two samples is invisible to it; the hardware's own
``rdma_port_link_downed_total`` catches those (it is 8 bits wide and saturates).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from exporters.cli import duration
from exporters.collector import Collector, CollectorError, MetricSpec, SampleBuilder

log = logging.getLogger("gpufleet.collector.rdma")

COLLECTOR_NAME = "rdma"
COLLECTOR_HELP = "InfiniBand/RoCE HCA port state, rate and counters from sysfs"
DEFAULT_ENABLED = True

DEV = ("device",)
PORT = ("device", "port")

# counters/ file -> (metric, scale). Data counters count 4-byte words.
PMA_COUNTERS: dict[str, tuple[str, int]] = {
    "port_xmit_data": ("rdma_port_transmit_bytes_total", 4),
    "port_rcv_data": ("rdma_port_receive_bytes_total", 4),
    "port_xmit_packets": ("rdma_port_transmit_packets_total", 1),
    "port_rcv_packets": ("rdma_port_receive_packets_total", 1),
    "unicast_xmit_packets": ("rdma_port_transmit_unicast_packets_total", 1),
    "unicast_rcv_packets": ("rdma_port_receive_unicast_packets_total", 1),
    "multicast_xmit_packets": ("rdma_port_transmit_multicast_packets_total", 1),
    "multicast_rcv_packets": ("rdma_port_receive_multicast_packets_total", 1),
    "symbol_error": ("rdma_port_symbol_errors_total", 1),
    "link_error_recovery": ("rdma_port_link_error_recoveries_total", 1),
    "link_downed": ("rdma_port_link_downed_total", 1),
    "port_rcv_errors": ("rdma_port_receive_errors_total", 1),
    "port_rcv_remote_physical_errors": ("rdma_port_receive_remote_physical_errors_total", 1),
    "port_rcv_switch_relay_errors": ("rdma_port_receive_switch_relay_errors_total", 1),
    "port_xmit_discards": ("rdma_port_transmit_discards_total", 1),
    "port_xmit_constraint_errors": ("rdma_port_transmit_constraint_errors_total", 1),
    "port_rcv_constraint_errors": ("rdma_port_receive_constraint_errors_total", 1),
    "local_link_integrity_errors": ("rdma_port_local_link_integrity_errors_total", 1),
    "excessive_buffer_overrun_errors": ("rdma_port_excessive_buffer_overrun_errors_total", 1),
    "VL15_dropped": ("rdma_port_vl15_dropped_packets_total", 1),
    "port_xmit_wait": ("rdma_port_transmit_wait_ticks_total", 1),
}
# counters_ext/ (kernels before 4.x kept the 64-bit PMA counters apart) -> counters/ name it supersedes.
PMA_EXT_COUNTERS: dict[str, str] = {
    "port_xmit_data_64": "port_xmit_data",
    "port_rcv_data_64": "port_rcv_data",
    "port_xmit_packets_64": "port_xmit_packets",
    "port_rcv_packets_64": "port_rcv_packets",
    "port_unicast_xmit_packets": "unicast_xmit_packets",
    "port_unicast_rcv_packets": "unicast_rcv_packets",
    "port_multicast_xmit_packets": "multicast_xmit_packets",
    "port_multicast_rcv_packets": "multicast_rcv_packets",
}
PMA_HELP: dict[str, str] = {
    "rdma_port_transmit_bytes_total": "Bytes transmitted on the port, all VLs (PMA port_xmit_data, 4-byte words x 4).",
    "rdma_port_receive_bytes_total": "Bytes received on the port, all VLs (PMA port_rcv_data, 4-byte words x 4).",
    "rdma_port_transmit_packets_total": "Packets transmitted on the port (PMA port_xmit_packets).",
    "rdma_port_receive_packets_total": "Packets received on the port (PMA port_rcv_packets).",
    "rdma_port_transmit_unicast_packets_total": "Unicast packets transmitted (PMA unicast_xmit_packets).",
    "rdma_port_receive_unicast_packets_total": "Unicast packets received (PMA unicast_rcv_packets).",
    "rdma_port_transmit_multicast_packets_total": "Multicast packets transmitted (PMA multicast_xmit_packets).",
    "rdma_port_receive_multicast_packets_total": "Multicast packets received (PMA multicast_rcv_packets).",
    "rdma_port_symbol_errors_total": "Minor link errors detected on one or more physical lanes (PMA symbol_error; "
                                     "16 bits, saturates).",
    "rdma_port_link_error_recoveries_total": "Successful link error recoveries by the port training state machine "
                                             "(PMA link_error_recovery; 8 bits, saturates).",
    "rdma_port_link_downed_total": "Times the link error recovery failed and the link went down "
                                   "(PMA link_downed; 8 bits, saturates).",
    "rdma_port_receive_errors_total": "Received packets with errors: malformed, bad CRC, buffer overrun "
                                      "(PMA port_rcv_errors; 16 bits, saturates).",
    "rdma_port_receive_remote_physical_errors_total": "Received packets marked with the EBP delimiter: a physical "
                                                      "error further upstream (PMA port_rcv_remote_physical_errors).",
    "rdma_port_receive_switch_relay_errors_total": "Received packets discarded because they could not be forwarded "
                                                   "by the switch relay (PMA port_rcv_switch_relay_errors).",
    "rdma_port_transmit_discards_total": "Outbound packets discarded because the port was down or congested "
                                         "(PMA port_xmit_discards; 16 bits, saturates).",
    "rdma_port_transmit_constraint_errors_total": "Outbound packets dropped by partition or raw-packet constraint "
                                                  "checks (PMA port_xmit_constraint_errors).",
    "rdma_port_receive_constraint_errors_total": "Inbound packets dropped by partition or raw-packet constraint "
                                                 "checks (PMA port_rcv_constraint_errors).",
    "rdma_port_local_link_integrity_errors_total": "Times local physical errors exceeded the LocalPhyErrors "
                                                   "threshold (PMA local_link_integrity_errors; 4 bits).",
    "rdma_port_excessive_buffer_overrun_errors_total": "Times consecutive flow-control update periods had buffer "
                                                       "overruns (PMA excessive_buffer_overrun_errors; 4 bits).",
    "rdma_port_vl15_dropped_packets_total": "Subnet management (VL15) packets dropped for lack of buffers "
                                            "(PMA VL15_dropped).",
    "rdma_port_transmit_wait_ticks_total": "Ticks (sampling clock, hardware-defined) during which the port had data "
                                           "to send but no flow-control credits: a congestion signal "
                                           "(PMA port_xmit_wait).",
}

# hw_counters/ file -> named metric. Every other numeric file goes to rdma_port_hw_events_total.
HW_COUNTERS: dict[str, tuple[str, str]] = {
    "np_cnp_sent": ("rdma_port_cnp_sent_total",
                    "RoCE congestion notification packets sent by this port as notification point, on ECN-marked "
                    "traffic it received (hw_counters/np_cnp_sent)."),
    "rp_cnp_handled": ("rdma_port_cnp_handled_total",
                       "RoCE congestion notification packets handled by this port as reaction point, i.e. times "
                       "it slowed its sending (hw_counters/rp_cnp_handled)."),
    "np_ecn_marked_roce_packets": ("rdma_port_ecn_marked_packets_total",
                                   "RoCE packets received with an ECN congestion mark "
                                   "(hw_counters/np_ecn_marked_roce_packets)."),
    "out_of_sequence": ("rdma_port_out_of_sequence_packets_total",
                        "Packets received out of sequence: packet loss in a lossless fabric "
                        "(hw_counters/out_of_sequence)."),
    "packet_seq_err": ("rdma_port_packet_sequence_errors_total",
                       "Packet sequence error NAKs received (hw_counters/packet_seq_err)."),
    "local_ack_timeout_err": ("rdma_port_local_ack_timeouts_total",
                              "Times the ack timer of a sender queue pair expired (hw_counters/local_ack_timeout_err)."),
    "rnr_nak_retry_err": ("rdma_port_rnr_nak_retry_errors_total",
                          "Receiver-not-ready NAKs received after the retry limit was exceeded "
                          "(hw_counters/rnr_nak_retry_err)."),
    "roce_adp_retrans": ("rdma_port_retransmissions_total",
                         "RoCE adaptive retransmissions (hw_counters/roce_adp_retrans)."),
    "out_of_buffer": ("rdma_port_out_of_buffer_drops_total",
                      "Packets dropped because no receive buffer (WQE) was posted (hw_counters/out_of_buffer)."),
}
# Files in hw_counters/ that are settings, not counters.
HW_NOT_COUNTERS = frozenset({"lifespan"})

INFO_FILES = ("board_id", "fw_ver", "hca_type", "node_guid")

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("rdma_device_info", "gauge",
               "HCA identity from sysfs, value 1; a file the device lacks gives an empty label.",
               DEV + INFO_FILES),
    MetricSpec("rdma_port_info", "gauge",
               "Port facts, value 1. link_layer: InfiniBand or Ethernet (RoCE, iWARP); netdev: the network "
               "interface of the port (gid_attrs/ndevs, else the device's net/ directory), empty if none; "
               "join with network metrics on it.",
               PORT + ("link_layer", "netdev")),
    MetricSpec("rdma_port_state", "gauge",
               "Logical port state id: 1 DOWN, 2 INIT, 3 ARMED, 4 ACTIVE, 5 ACTIVE_DEFER.", PORT),
    MetricSpec("rdma_port_physical_state", "gauge",
               "Physical port state id: 1 Sleep, 2 Polling, 3 Disabled, 4 PortConfigurationTraining, 5 LinkUp, "
               "6 LinkErrorRecovery, 7 Phy Test.", PORT),
    MetricSpec("rdma_port_state_info", "gauge",
               "Port state names as the kernel writes them (e.g. ACTIVE, LinkUp), value 1.",
               PORT + ("state", "physical_state")),
    MetricSpec("rdma_port_rate_bytes_per_second", "gauge",
               "Negotiated signalling rate of the port (sysfs rate, Gb/s x 1e9 / 8).", PORT),
    MetricSpec("rdma_port_state_changes_total", "counter",
               "Changes of the logical port state id seen between two collections (link flaps); a flap "
               "faster than the collection interval is only in rdma_port_link_downed_total.", PORT),
    *(MetricSpec(name, "counter", PMA_HELP[name], PORT) for name, _ in PMA_COUNTERS.values()),
    *(MetricSpec(name, "counter", help_, PORT) for name, help_ in HW_COUNTERS.values()),
    MetricSpec("rdma_port_hw_events_total", "counter",
               "Every other numeric file of the port's vendor hw_counters/ directory, by file name (counter), "
               "so new NIC firmware needs no exporter release.", PORT + ("counter",)),
    MetricSpec("gpufleet_exporter_rdma_read_errors_total", "counter",
               "sysfs files under class/infiniband that the rdma collector could not read (EINVAL, EPERM, EIO, "
               "a directory) or parse, since start; their series are left out. N/A (no PMA) values and files "
               "a device does not have are not errors.", DEV),
)

_STATE_RE = re.compile(r"\s*(\d+)\s*:\s*(.*?)\s*", re.ASCII | re.DOTALL)
_RATE_RE = re.compile(r"\s*(\d{1,12}(?:\.\d{1,12})?)\s*Gb/sec\b.*", re.ASCII | re.DOTALL)
_NA = "N/A"


def parse_rate(text: Any) -> float | None:
    """``"200 Gb/sec (4X HDR)"`` -> bytes per second, None for anything else (never raises)."""
    if not isinstance(text, str):
        return None
    m = _RATE_RE.fullmatch(text)
    if m is None:
        return None
    # Exact: "53.125 Gb/sec" is 53125 * 10**9 / (8 * 10**3), and int / int is correctly rounded, so
    # 6640625000.0, not 6640624999.999999 (what Fraction gives, at a tenth of its cost: per port, per collection).
    whole, _, frac = m.group(1).partition(".")
    return int(whole + frac) * 1_000_000_000 / (8 * 10 ** len(frac))


_ASCII_SPACE = " \t\n\r\f\v"  # what re.ASCII's \s matches


def parse_state(text: str) -> tuple[int, str] | None:
    """``"4: ACTIVE"`` -> (4, "ACTIVE")."""
    # The regex's result without its backtracking (two states per port per collection); the regex,
    # the definition, then only sees what this does not take.
    num, colon, name = text.partition(":")
    num = num.strip(_ASCII_SPACE)
    if colon and num.isdigit() and num.isascii():
        return int(num), name.strip(_ASCII_SPACE)
    m = _STATE_RE.fullmatch(text)
    if m is None:
        return None
    return int(m.group(1)), m.group(2)


def _read_bytes(path: str) -> bytes:
    """One sysfs read: a single read() of up to a page, as sysfs serves it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _read_file(path: str) -> str:
    """``_read_bytes`` as text. Every read by path goes through here: fault-injection tests replace it,
    and then no directory fds are opened (see ``_open_dir``), so that the substitute sees every read."""
    return _read_bytes(path).decode("utf-8", "replace")


_STOCK_READ_FILE = _read_file
# An open through a held port directory fd that fails with one of these may only mean that the
# directory was removed since the collection began (driver reload, hot unplug; ESTALE on a network
# filesystem): the file is read by its path then, which is what decides, as without directory fds.
_RETRY_BY_PATH = frozenset({errno.ENOENT, errno.ENODEV, errno.ESTALE})
# The first read() of a counter file asks for this much (a 64-bit counter is 20 digits): a page-sized
# buffer costs a malloc and a realloc per file. A file that fills it is read on, up to a page in all.
_SMALL_READ = 64


def _fds_to_spare(n: int) -> bool:
    """Whether ``n`` more fds may be held open: the process keeps at least half of its soft
    RLIMIT_NOFILE free (a node with 16 ports holds ~800; systemd's default soft limit is 1024).
    Beyond that the counter files are opened at each read, as before."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return False
    return soft == resource.RLIM_INFINITY or in_use + n <= soft // 2


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _compile(pattern: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if pattern is None or pattern == "":
        return None
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)


def _listdir(path: str) -> list[str] | None:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return None


def _open_dir(path: str) -> tuple[int, tuple[int, int]] | None:
    """A directory fd to open a port's files relative to, and (st_dev, st_ino) of that directory;
    None to read them by path.

    None when the directory cannot be opened (vanished, EMFILE, ...: reads by
    path then fail or succeed as they would anyway) and when ``_read_file`` was
    replaced (see there).
    """
    if _read_file is not _STOCK_READ_FILE:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    return fd, (st.st_dev, st.st_ino)


# A counter file of a port and the row it makes: (file relative to the port directory, metric, labels,
# scale, supersedes). supersedes: a counters_ext/ 64-bit value, which replaces the counters/ one read
# before it for the same port.
_CounterRow = tuple[str, str, tuple[str, ...], int, bool]


@dataclass(slots=True)
class _Flaps:
    """A port's state id at the last collection (None: never read) and how often it changed."""

    last: int | None = None
    changes: int = 0


@dataclass(eq=False)
class _PortLayout:
    port: str
    path: str
    labels: tuple[str, str]  # (device, port)
    info: tuple[str, str, str, str]  # rdma_port_info labels: device, port, link_layer, netdev
    counters: list[_CounterRow]  # counters/, counters_ext/, hw_counters/ in this order, each sorted
    flaps: _Flaps  # shared with RdmaCollector._flaps: it outlives rescans and the device
    dir_fd: int | None = None  # the port directory (see _open_dir); closed by close()
    dir_id: tuple[int, int] = (-1, -1)  # its (st_dev, st_ino)
    # An fd held open per counter file (None: opened at each read), read with pread() at offset 0,
    # which makes sysfs run the attribute's show() afresh: one syscall per counter instead of three.
    held: list[int | None] = field(default_factory=list)
    subdirs: tuple[tuple[str, int, int], ...] = ()  # (counters/ hw_counters/ ..., st_ino, st_mtime_ns)

    def open_dir(self) -> None:
        """(Re)open the port directory's fd and the counter files' (for a new layout, or after the
        directory or one of its counter directories changed)."""
        self.close()
        self.held = [None] * len(self.counters)
        opened = _open_dir(self.path)
        if opened is None:
            return
        self.dir_fd, self.dir_id = opened
        self.subdirs = ()  # empty: no fd held, nothing to watch
        if not self.counters or not _fds_to_spare(len(self.counters)):
            return
        try:
            subdirs = tuple(self._subdir_ids(sorted({name.partition("/")[0] for name, *_ in self.counters})))
        except OSError:
            return  # a counter directory unreadable: every file is opened at each read
        self.subdirs = subdirs
        for i, (name, *_) in enumerate(self.counters):
            try:
                self.held[i] = os.open(name, os.O_RDONLY, dir_fd=self.dir_fd)
            except OSError:
                pass  # opened at each read, which reports the error as it always did

    def _subdir_ids(self, subs: Iterable[str]) -> Iterable[tuple[str, int, int]]:
        for sub in subs:
            st = os.stat(sub, dir_fd=self.dir_fd)
            yield sub, st.st_ino, st.st_mtime_ns

    def _subdirs_changed(self) -> bool:
        """Whether a counter directory was replaced or had files added or removed (never on sysfs
        itself, where a driver reload replaces the port directory, but a held fd would go on
        reading a removed file's last contents)."""
        try:
            return tuple(self._subdir_ids(sub for sub, _, _ in self.subdirs)) != self.subdirs
        except OSError:
            return True

    def current_dir_fd(self) -> int | None:
        """The directory fd, if it is still the directory ``path`` names; None: read by path.

        A driver reload removes the port's directory and creates a new one,
        an ``rdma dev set name`` renames it: the fd would go on reading a dead
        directory, or another device's. One stat per port and collection
        (~50 files) keeps every read what reading by path would have been;
        a directory replaced since the collection began is caught per file
        (``_RETRY_BY_PATH``).
        """
        if self.dir_fd is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # gone or unreachable: read by path, which fails as it always did
        if (st.st_dev, st.st_ino) != self.dir_id or (self.subdirs and self._subdirs_changed()):
            self.open_dir()
        return self.dir_fd

    def close(self) -> None:
        fd, self.dir_fd = self.dir_fd, None
        if fd is not None:
            os.close(fd)
        held, self.held = self.held, [None] * len(self.held)
        for fd in held:
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        """A layout dropped without close() (a collector that is never closed) does not leak its fd."""
        if getattr(self, "dir_fd", None) is not None or any(getattr(self, "held", ())):
            self.close()


@dataclass(eq=False)
class _DeviceLayout:
    info: tuple[str, ...]  # rdma_device_info labels: device, then INFO_FILES
    ports: list[_PortLayout]
    scanned: float  # time.monotonic(); -inf: scan again next collection

    def close(self) -> None:
        for p in self.ports:
            p.close()


class _Families(dict):
    """metric -> the builder's row list for it, fetched on first use (so families keep the order in
    which they first get a sample) and then by one dict lookup per sample."""

    def __init__(self, b: SampleBuilder):
        super().__init__()
        self.b = b

    def __missing__(self, name: str) -> list:
        rows = self[name] = self.b.rows(name)
        return rows


class RdmaCollector(Collector):
    name = "rdma"
    specs = SPECS

    def __init__(
        self,
        sysfs: str = "/sys",
        *,
        device_include: str | re.Pattern[str] | None = None,
        device_exclude: str | re.Pattern[str] | None = None,
        rescan_interval: float = 60.0,
        logger: logging.Logger | None = None,
    ):
        self.root = os.path.join(sysfs, "class", "infiniband")
        self.include = _compile(device_include)
        self.exclude = _compile(device_exclude)
        self.log = logger or log
        self._logged: set[tuple] = set()
        self._read_errors: dict[str, int] = {}
        self._flaps: dict[tuple[str, str], _Flaps] = {}
        self._devices_seen = 0
        self.rescan_interval = rescan_interval
        self._layouts: dict[str, _DeviceLayout] = {}

    def status(self) -> str:
        return f"{self._devices_seen} RDMA devices under {self.root}"

    def close(self) -> None:
        """Close the ports' directory fds (a later ``collect`` scans and opens them again)."""
        layouts = list(self._layouts.values())
        self._layouts.clear()
        for layout in layouts:
            layout.close()

    # -- reading ---------------------------------------------------------------------
    def _once(self, key: tuple, level: int, msg: str, **fields: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.log(level, msg, extra={"collector": self.name, **fields})

    def _error(self, device: str, path: str, why: str) -> None:
        self._read_errors[device] = self._read_errors.get(device, 0) + 1
        self._once((path, why), logging.WARNING, "cannot read sysfs file, series left out", device=device,
                   path=path, error=why)

    def _read(self, device: str, path: str, missing_ok: bool = True) -> str | None:
        """The stripped text of a file; None (and counted, unless merely missing) when unreadable."""
        try:
            return _read_file(path).strip()
        except FileNotFoundError:
            if not missing_ok:
                self._error(device, path, "ENOENT")
            return None
        except OSError as exc:
            self._error(device, path, _errname(exc))
            return None

    def _int(self, device: str, path: str, text: str) -> int | None:
        if text.isdigit() and text.isascii():
            return int(text)
        if text.startswith(_NA):
            self._once((path, "N/A"), logging.DEBUG, "counter not available, series left out", device=device,
                       path=path, value=text)
            return None
        self._error(device, path, "unparseable")
        return None

    # -- collection ------------------------------------------------------------------
    def _wanted(self, device: str) -> bool:
        if self.include is not None and not self.include.fullmatch(device):
            return False
        return not (self.exclude is not None and self.exclude.fullmatch(device))

    def collect(self) -> list:
        b = self.builder()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            # No RDMA stack loaded (or no HCA): nothing to report, which is not a failure.
            self._once((self.root, "ENOENT"), logging.INFO, "no RDMA devices (directory missing)", path=self.root)
            names = []
        except OSError as exc:
            raise CollectorError(f"cannot list {self.root}: {_errname(exc)}") from None
        devices = sorted(d for d in names if self._wanted(d))
        self._devices_seen = len(devices)
        now = time.monotonic()
        for gone in self._layouts.keys() - set(devices):
            self._layouts.pop(gone).close()
        fam = _Families(b)
        for device in devices:
            self._read_errors.setdefault(device, 0)
            layout = self._layouts.get(device)
            if layout is None or now - layout.scanned >= self.rescan_interval:
                layout = self._scan(device, now)
            self._collect_device(fam, device, layout)
        present = set(devices)
        for key in sorted(self._flaps):
            flaps = self._flaps[key]
            if flaps.last is not None and key[0] in present:
                fam["rdma_port_state_changes_total"].append((key, flaps.changes))
        errors = fam["gpufleet_exporter_rdma_read_errors_total"] if devices else []
        errors += [((device,), self._read_errors[device]) for device in devices]
        return b.families()

    # -- layout: what rarely changes, re-read every rescan interval ------------------
    def _scan(self, device: str, now: float) -> _DeviceLayout:
        """Read a device's identity, its ports' link layer and netdev, list its counter files and open
        each port's directory fd (the previous layout's are closed).

        Kept for ``rescan_interval`` seconds, unless a read failed (then it is
        scanned again next time, so a transient error neither sticks nor goes
        uncounted) or a listed counter file vanishes (a driver reload).
        """
        old = self._layouts.pop(device, None)
        if old is not None:
            old.close()
        errors_before = self._read_errors[device]
        ddir = os.path.join(self.root, device)
        info = tuple(self._read(device, os.path.join(ddir, f)) or "" for f in INFO_FILES)
        ports: list[_PortLayout] = []
        pdir = os.path.join(ddir, "ports")
        try:
            port_names = _listdir(pdir) or []
        except OSError as exc:
            self._error(device, pdir, _errname(exc))
            port_names = []
        net_ports: dict[str, str] | None = None
        for port in sorted((p for p in port_names if p.isdigit()), key=int):
            pp = os.path.join(pdir, port)
            link_layer = self._read(device, os.path.join(pp, "link_layer")) or ""
            # IB GIDs have no netdev behind them (reads fail with EINVAL): skip straight to net/.
            netdev = self._gid_netdev(pp) if link_layer != "InfiniBand" else None
            if netdev is None:
                if net_ports is None:
                    net_ports = self._device_netdevs(ddir)
                netdev = net_ports.get(port, "")
            labels = (device, port)
            # counters_ext/ after counters/: the 64-bit value wins over the saturating 32-bit one.
            rows: list[_CounterRow] = []
            for f in sorted(self._names(device, os.path.join(pp, "counters"))):
                if f in PMA_COUNTERS:
                    metric, scale = PMA_COUNTERS[f]
                    rows.append((f"counters/{f}", metric, labels, scale, False))
            for f in sorted(self._names(device, os.path.join(pp, "counters_ext"))):
                if f in PMA_EXT_COUNTERS:
                    metric, scale = PMA_COUNTERS[PMA_EXT_COUNTERS[f]]
                    rows.append((f"counters_ext/{f}", metric, labels, scale, True))
            for f in sorted(self._names(device, os.path.join(pp, "hw_counters"))):
                if f not in HW_NOT_COUNTERS:
                    named = HW_COUNTERS.get(f)
                    rows.append((f"hw_counters/{f}", named[0], labels, 1, False) if named is not None
                                else (f"hw_counters/{f}", "rdma_port_hw_events_total", (device, port, f), 1, False))
            flaps = self._flaps.setdefault(labels, _Flaps())
            ports.append(p := _PortLayout(port, pp, labels, (device, port, link_layer, netdev), rows, flaps))
            p.open_dir()
        scanned = now if self._read_errors[device] == errors_before else -math.inf
        layout = self._layouts[device] = _DeviceLayout((device, *info), ports, scanned)
        return layout

    # -- collection ------------------------------------------------------------------
    def _collect_device(self, fam: _Families, device: str, layout: _DeviceLayout) -> None:
        fam["rdma_device_info"].append((layout.info, 1))
        for p in layout.ports:
            fam["rdma_port_info"].append((p.info, 1))
            self._collect_port(fam, device, layout, p)

    def _collect_port(self, fam: _Families, device: str, layout: _DeviceLayout, p: _PortLayout) -> None:
        labels = p.labels
        dir_fd = p.current_dir_fd()
        state = self._state(device, layout, p, dir_fd, "state")
        phys = self._state(device, layout, p, dir_fd, "phys_state")
        if state is not None:
            fam["rdma_port_state"].append((labels, state[0]))
            flaps = p.flaps
            if flaps.last is not None and flaps.last != state[0]:
                flaps.changes += 1
            flaps.last = state[0]
        if phys is not None:
            fam["rdma_port_physical_state"].append((labels, phys[0]))
        if state is not None or phys is not None:
            fam["rdma_port_state_info"].append(
                ((device, p.port, state[1] if state else "", phys[1] if phys else ""), 1))

        rate_text = self._read_at(device, layout, p, dir_fd, "rate")
        if rate_text is not None:
            rate = parse_rate(rate_text)
            if rate is None:
                self._error(device, os.path.join(p.path, "rate"), "unparseable")
            else:
                fam["rdma_port_rate_bytes_per_second"].append((labels, rate))

        # The hot loop (~50 files per port, every collection): the read and the all-digits parse are
        # inlined, as each Python call layer here costs more than the parse itself.
        os_pread = os.pread
        for (name, metric, row_labels, scale, supersedes), held in zip(p.counters, p.held, strict=True):
            if dir_fd is None:
                v = self._counter(device, layout, os.path.join(p.path, name))
                if v is None:
                    continue
            else:
                if held is not None:
                    try:
                        data = os_pread(held, _SMALL_READ, 0)
                        if len(data) == _SMALL_READ:
                            data = os_pread(held, 4096, 0)
                    except OSError as exc:  # ENODEV: the device went away; EINVAL, EIO...: its show() failed
                        data = self._read_by_path(device, layout, p, name, exc, missing_ok=False)
                        if data is None:
                            continue
                else:
                    data = self._open_and_read(device, layout, p, dir_fd, name)
                    if data is None:
                        continue
                text = data.strip()
                if text.isdigit():  # bytes.isdigit: ASCII digits only, as _int requires
                    v = int(text)
                else:
                    v = self._int(device, os.path.join(p.path, name), data.decode("utf-8", "replace").strip())
                    if v is None:
                        continue
            rows = fam[metric]
            if supersedes and rows and rows[-1][0] is row_labels:
                rows[-1] = (row_labels, v * scale)
            else:
                rows.append((row_labels, v * scale))

    def _open_and_read(self, device: str, layout: _DeviceLayout, p: _PortLayout, dir_fd: int,
                       name: str) -> bytes | None:
        """A counter file without a held fd, opened through the port directory's fd for one read."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except OSError as exc:
            return self._read_by_path(device, layout, p, name, exc, missing_ok=False)
        try:
            data = os.read(fd, _SMALL_READ)
            if len(data) == _SMALL_READ:
                data += os.read(fd, 4096 - _SMALL_READ)
        except OSError as exc:
            self._failed(device, layout, os.path.join(p.path, name), exc, missing_ok=False)
            return None
        finally:
            os.close(fd)
        return data

    def _failed(self, device: str, layout: _DeviceLayout, path: str, exc: OSError, missing_ok: bool) -> None:
        """A failed per-collection read: counted (unless merely missing and that is ok); a vanished
        counter file means the layout is stale (driver reload?): rescan next time."""
        if isinstance(exc, FileNotFoundError):
            if missing_ok:
                return
            layout.scanned = -math.inf
        self._error(device, path, _errname(exc))

    def _read_by_path(self, device: str, layout: _DeviceLayout, p: _PortLayout, name: str, exc: OSError,
                      missing_ok: bool) -> bytes | None:
        """The open through the port's directory fd failed with ``exc``: read by path as without the fd,
        if the directory may just have been replaced (the next collection's ``current_dir_fd`` reopens it)."""
        path = os.path.join(p.path, name)
        if exc.errno not in _RETRY_BY_PATH:
            self._failed(device, layout, path, exc, missing_ok)
            return None
        try:
            data = _read_bytes(path)
        except OSError as exc2:
            self._failed(device, layout, path, exc2, missing_ok)
            return None
        return data

    def _read_at(self, device: str, layout: _DeviceLayout, p: _PortLayout, dir_fd: int | None,
                 name: str) -> str | None:
        """``_read`` (a missing file is no error) of a file of the port directory, through its fd."""
        if dir_fd is None:
            return self._read(device, os.path.join(p.path, name))
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except OSError as exc:
            data = self._read_by_path(device, layout, p, name, exc, missing_ok=True)
        else:
            try:
                data = os.read(fd, 4096)
            except OSError as exc:
                self._failed(device, layout, os.path.join(p.path, name), exc, missing_ok=True)
                data = None
            finally:
                os.close(fd)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def _counter(self, device: str, layout: _DeviceLayout, path: str) -> int | None:
        """A counter file read by path (a port without a directory fd, see ``current_dir_fd``)."""
        try:
            text = _read_file(path).strip()
        except OSError as exc:
            self._failed(device, layout, path, exc, missing_ok=False)
            return None
        if text.isdigit() and text.isascii():
            return int(text)
        return self._int(device, path, text)

    def _state(self, device: str, layout: _DeviceLayout, p: _PortLayout, dir_fd: int | None,
               name: str) -> tuple[int, str] | None:
        text = self._read_at(device, layout, p, dir_fd, name)
        if text is None:
            return None
        parsed = parse_state(text)
        if parsed is None:
            self._error(device, os.path.join(p.path, name), "unparseable")
        return parsed

    def _names(self, device: str, path: str) -> Iterable[str]:
        try:
            return _listdir(path) or ()
        except OSError as exc:
            self._error(device, path, _errname(exc))
            return ()

    # -- netdev ----------------------------------------------------------------------
    def _gid_netdev(self, pp: str) -> str | None:
        """The netdev of the port's first populated GID entry (RoCE); None if there is none.

        Empty GID entries fail with EINVAL, and IB ports have no netdev behind
        their GIDs, so failures here are expected and neither logged nor counted.
        Only the first entries are tried: the default GIDs (0 and 1) carry the
        netdev whenever there is one, and a port has up to 256 entries.
        """
        ndir = os.path.join(pp, "gid_attrs", "ndevs")
        for entry in range(8):
            try:
                name = _read_file(os.path.join(ndir, str(entry))).strip()
            except FileNotFoundError:
                return None  # no gid_attrs (old kernel, OPA) or past the table's end
            except OSError:
                continue
            if name:
                return name
        return None

    def _device_netdevs(self, ddir: str) -> dict[str, str]:
        """Port -> netdev from ``<device>/device/net/*`` (IPoIB, or RoCE on older kernels).

        Each interface's ``dev_port`` (0-based) names its port; an interface
        without one belongs to port 1. Best effort, like ``_gid_netdev``.
        """
        ndir = os.path.join(ddir, "device", "net")
        try:
            names = sorted(os.listdir(ndir))
        except OSError:
            return {}
        out: dict[str, str] = {}
        for name in names:
            try:
                port = str(int(_read_file(os.path.join(ndir, name, "dev_port")).strip()) + 1)
            except (OSError, ValueError):
                port = "1"
            out.setdefault(port, name)
        return out


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rdma collector (--collector.rdma)")
    g.add_argument("--collector.rdma.device-include", dest="rdma_device_include", type=_regex, default=None,
                   metavar="REGEX",
                   help="Only report RDMA devices whose name fully matches (e.g. 'mlx5_[0-7]').")
    g.add_argument("--collector.rdma.device-exclude", dest="rdma_device_exclude", type=_regex, default=None,
                   metavar="REGEX",
                   help="Do not report RDMA devices whose name fully matches (applied after the include).")
    g.add_argument("--collector.rdma.rescan-interval", dest="rdma_rescan_interval", type=duration, default=60.0,
                   metavar="DURATION",
                   help="How often to re-read what rarely changes: device identity (fw_ver, board_id, ...), each "
                        "port's link layer and netdev, and the list of counter files (default 1m; 0 = every "
                        "collection). A new device, a failed read or a vanished counter file rescans at once. "
                        "State, rate and counters are read every collection, through fds held open from one "
                        "rescan to the next (about 50 per port, while half the soft open-files limit stays free).")


def create(args: argparse.Namespace) -> RdmaCollector:
    return RdmaCollector(
        sysfs=args.sysfs,
        device_include=getattr(args, "rdma_device_include", None),
        device_exclude=getattr(args, "rdma_device_exclude", None),
        rescan_interval=getattr(args, "rdma_rescan_interval", 60.0),
    )
