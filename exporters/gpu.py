"""The GPU collector: per-GPU metrics from NVML (nvidia-ml-py).

One collection reads every GPU into a ``GpuSample`` and renders it as gpufleet's
native ``gpu_*`` families and, with ``--gpu.dcgm-compat``, dcgm-exporter's
``DCGM_FI_*`` families (exporters/gpu_dcgm.py). Xid errors arrive out of band:
from NVML events on a background thread and/or from the kernel log
(exporters/gpu_xid.py), and are counted per GPU and code.

Failure rules: a call the GPU does not support is omitted (logged once); a GPU
that is lost or needs a reset reports ``gpu_up 0`` while the others report; a
missing library or unloaded driver fails the collector (the agent still serves)
and NVML is initialised again on the next collection, which is also how a
driver reload is survived.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pynvml

from exporters import gpu_dcgm, gpu_xid
from exporters.cli import non_negative_int
from exporters.collector import Collector, CollectorError, MetricSpec
from exporters.gpu_gpm import GPM_METRICS
from exporters.gpu_sim import CLOCK_EVENT_BITS, DEFAULT_MODEL, MODELS, RECOVERY_ACTIONS

log = logging.getLogger("gpufleet.collector.gpu")

COLLECTOR_NAME = "gpu"
COLLECTOR_HELP = "GPU metrics from NVML"
DEFAULT_ENABLED = True

GPU = ("gpu", "uuid")

NVLINK_COUNTERS = {
    "crc_flit": pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    "crc_data": pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
    "replay": pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    "recovery": pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
}
TEMPERATURE_THRESHOLDS = {
    "shutdown": pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
    "slowdown": pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
    "gpu_max": pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX,
    "memory_max": pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX,
}
RECOVERY_ACTION_NAMES = {v: k for k, v in RECOVERY_ACTIONS.items()}
for _name in ("RECOVER_IMEX_DOMAIN", "BUS_RESET", "SYSTEM_REBOOT"):
    _v = getattr(pynvml, f"NVML_GPU_RECOVERY_ACTION_{_name}", None)
    if _v is not None:
        RECOVERY_ACTION_NAMES[_v] = _name.lower()

INFO_LABELS = ("gpu", "uuid", "name", "pci_bus_id", "serial", "vbios_version", "driver_version",
               "cuda_driver_version")

NATIVE_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("gpu_info", "gauge", "Static GPU facts as labels, value 1; join on uuid.", INFO_LABELS),
    MetricSpec("gpu_devices", "gauge", "Number of GPUs NVML enumerates on this node (named so: promtool reserves _count for histograms)."),
    MetricSpec("gpu_devices_expected", "gauge", "GPUs this node should have (--gpu.expected-count).", (),
               "--gpu.expected-count"),
    MetricSpec("gpu_up", "gauge", "1 if the GPU answers NVML, 0 if NVML reports it lost or needing a reset.", GPU),
    MetricSpec("gpu_utilization_ratio", "gauge",
               "Fraction of the last sample period during which a kernel was running.", GPU),
    MetricSpec("gpu_memory_utilization_ratio", "gauge",
               "Fraction of the last sample period during which device memory was read or written "
               "(memory copy utilization).", GPU),
    MetricSpec("gpu_memory_used_bytes", "gauge", "Framebuffer memory in use.", GPU),
    MetricSpec("gpu_memory_free_bytes", "gauge", "Framebuffer memory free.", GPU),
    MetricSpec("gpu_memory_total_bytes", "gauge", "Framebuffer memory installed.", GPU),
    MetricSpec("gpu_temperature_celsius", "gauge", "GPU die temperature.", GPU),
    MetricSpec("gpu_memory_temperature_celsius", "gauge", "HBM temperature (where the GPU reports it).", GPU),
    MetricSpec("gpu_temperature_threshold_celsius", "gauge",
               "Temperature thresholds of the GPU: slowdown, shutdown, gpu_max, memory_max.",
               GPU + ("threshold",)),
    MetricSpec("gpu_power_usage_watts", "gauge", "Power draw of the board.", GPU),
    MetricSpec("gpu_power_limit_watts", "gauge", "Enforced power limit.", GPU),
    MetricSpec("gpu_energy_consumption_joules_total", "counter",
               "Energy consumed since the driver was loaded.", GPU),
    MetricSpec("gpu_sm_clock_hertz", "gauge", "Current SM clock.", GPU),
    MetricSpec("gpu_sm_clock_max_hertz", "gauge", "Maximum SM clock.", GPU),
    MetricSpec("gpu_memory_clock_hertz", "gauge", "Current memory clock.", GPU),
    MetricSpec("gpu_fan_speed_ratio", "gauge", "Intended fan speed as a fraction of maximum (boards with fans).",
               GPU),
    MetricSpec("gpu_performance_state", "gauge", "Performance state (P-state): 0 is maximum performance, 15 minimum.",
               GPU),
    MetricSpec("gpu_persistence_mode", "gauge", "1 if persistence mode is enabled.", GPU),
    MetricSpec("gpu_mig_mode", "gauge", "1 if MIG mode is enabled (current mode).", GPU),
    MetricSpec("gpu_ecc_errors_total", "counter",
               "ECC memory errors. error_type: corrected|uncorrected; counter: volatile (since driver load) "
               "or aggregate (lifetime).", GPU + ("error_type", "counter")),
    MetricSpec("gpu_remapped_rows_total", "counter",
               "Memory rows remapped, by cause: correctable or uncorrectable errors.", GPU + ("cause",)),
    MetricSpec("gpu_row_remap_pending", "gauge",
               "1 if a row remap is pending: the GPU needs a reset to apply it.", GPU),
    MetricSpec("gpu_row_remap_failed", "gauge",
               "1 if a row remap failed: the GPU should be inspected/replaced.", GPU),
    MetricSpec("gpu_retired_pages_total", "counter",
               "Memory pages retired (GPUs that retire pages instead of remapping rows), by cause.",
               GPU + ("cause",)),
    MetricSpec("gpu_retired_pages_pending", "gauge", "1 if page retirements wait for the next driver reload.", GPU),
    MetricSpec("gpu_pcie_replay_errors_total", "counter", "PCIe replays (link-level retransmissions).", GPU),
    MetricSpec("gpu_nvlink_up", "gauge", "1 if the NVLink link is active.", GPU + ("link",)),
    MetricSpec("gpu_nvlink_errors_total", "counter",
               "NVLink data-link errors per link: crc_flit, crc_data, replay, recovery.",
               GPU + ("link", "counter")),
    MetricSpec("gpu_clock_event_active", "gauge",
               "1 while the clock-event (throttle) reason holds the clocks down, per reason.",
               GPU + ("reason",)),
    MetricSpec("gpu_recovery_action", "gauge",
               "The driver's recommended recovery action, one series per action, 1 for the current one "
               "(drivers that report NVML_FI_DEV_GET_GPU_RECOVERY_ACTION).", GPU + ("action",)),
    MetricSpec("gpu_xid_errors_total", "counter",
               "Xid errors seen, per code, with the catalogue class (reboot, hw_inspection, app, ignore, unknown).",
               GPU + ("xid", "class")),
    MetricSpec("gpu_xid_last_timestamp_seconds", "gauge", "Unix time of the GPU's most recent Xid error.", GPU),
    *(MetricSpec(m.native, "gauge", m.help, GPU, "Hopper and newer (NVML GPM)") for m in GPM_METRICS.values()),
    MetricSpec("gpufleet_exporter_nvml_errors_total", "counter",
               "NVML calls that failed, by function and error (NotSupported excluded).", ("function", "error")),
    MetricSpec("gpufleet_exporter_xid_source_up", "gauge",
               "1 while the Xid source (nvml events or kmsg) is being read successfully.", ("source",)),
)


class _GpuGone(Exception):
    """NVML says this GPU is lost or needs a reset."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


class _Reinit(Exception):
    """NVML itself went away (driver unloaded/reloaded): initialise again."""


def error_name(exc: pynvml.NVMLError) -> str:
    return type(exc).__name__.removeprefix("NVMLError_") or "Unknown"


def handle_key(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


@dataclass
class GpuSample:
    index: int
    uuid: str
    up: bool = True
    gone_reason: str = ""
    info: dict[str, str] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    ecc: dict[tuple[str, str], float] = field(default_factory=dict)
    remapped: tuple[int, int, int, int] | None = None
    retired: dict[str, float] = field(default_factory=dict)
    nvlink_up: dict[int, int] = field(default_factory=dict)
    nvlink_errors: dict[tuple[int, str], float] = field(default_factory=dict)
    clock_events: int | None = None
    recovery_action: int | None = None
    gpm: dict[int, float] = field(default_factory=dict)


class XidCounter:
    """Xid events per GPU and code from one or two sources.

    With both NVML events and the kernel log enabled, each source counts the
    same events independently and the exposed count is the larger of the two,
    so an event is never counted twice and one source missing it is covered by
    the other.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[tuple[int, int], int]] = {}
        self._last: dict[int, float] = {}
        self.last_code: dict[int, int] = {}

    def add(self, source: str, gpu: int, code: int, when: float) -> None:
        with self._lock:
            counts = self._counts.setdefault(source, {})
            counts[(gpu, code)] = counts.get((gpu, code), 0) + 1
            if when >= self._last.get(gpu, 0.0):
                self._last[gpu] = when
                self.last_code[gpu] = code

    def snapshot(self) -> tuple[dict[tuple[int, int], int], dict[int, float]]:
        with self._lock:
            merged: dict[tuple[int, int], int] = {}
            for counts in self._counts.values():
                for key, n in counts.items():
                    merged[key] = max(merged.get(key, 0), n)
            return merged, dict(self._last)


class GpuCollector(Collector):
    name = "gpu"

    def __init__(
        self,
        nvml: Any = pynvml,
        *,
        expected_count: int | None = None,
        dcgm_compat: bool = False,
        dcgm_hostname: str = "",
        xid_sources: tuple[str, ...] = ("nvml",),
        kmsg_path: str = "/dev/kmsg",
        gpm: bool = True,
        event_timeout_ms: int = 500,
        logger: logging.Logger | None = None,
    ):
        self.nvml = nvml
        self.expected_count = expected_count
        self.dcgm_compat = dcgm_compat
        self.dcgm_hostname = dcgm_hostname or os.environ.get("NODE_NAME") or socket.gethostname()
        self.xid_sources = xid_sources
        self.gpm_enabled = gpm
        self.log = logger or log
        self.specs = NATIVE_SPECS + (gpu_dcgm.SPECS if dcgm_compat else ())
        self._initialized = False
        self._generation = 0
        self._static: dict[int, dict[str, str]] = {}
        self._uuids: dict[int, str] = {}
        self._nvlinks: dict[int, int] = {}
        self._gpm_supported: dict[int, bool] = {}
        self._gpm_prev: dict[int, Any] = {}
        self._logged: set[tuple] = set()
        self._errors: dict[tuple[str, str], int] = {}
        self._handles: dict[int, int] = {}  # handle pointer value -> index
        self._pci_index: dict[tuple[int, int, int], int] = {}
        self._lock = threading.Lock()
        self.xids = XidCounter()
        self._stop = threading.Event()
        self._event_thread: threading.Thread | None = None
        self._event_ok = False
        self._event_error: str | None = None
        self._event_timeout_ms = event_timeout_ms
        self._kmsg: gpu_xid.KmsgFollower | None = None
        self._kmsg_pending: list[gpu_xid.KmsgXid] = []
        if "kmsg" in xid_sources:
            self._kmsg = gpu_xid.KmsgFollower(kmsg_path, self._on_kmsg_xid, logger=self.log)
            self._kmsg.start()

    # -- NVML session ----------------------------------------------------------------
    def _ensure_init(self) -> None:
        if self._initialized:
            return
        try:
            self.nvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise CollectorError(
                "NVML library libnvidia-ml.so.1 not found: is the NVIDIA driver installed? "
                "(use --gpu.backend=sim to run without a GPU)"
            ) from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise CollectorError("NVIDIA driver not loaded: NVML cannot talk to the GPUs") from None
        except pynvml.NVMLError as exc:
            raise CollectorError(f"nvmlInit failed: {exc} ({error_name(exc)})") from None
        self._initialized = True
        self._generation += 1
        with self._lock:
            self._static.clear()
            self._nvlinks.clear()
            self._gpm_supported.clear()
            self._gpm_prev.clear()
            self._handles.clear()
        self.log.info("NVML initialised", extra={"collector": self.name, "generation": self._generation})
        if "nvml" in self.xid_sources:
            self._start_event_thread()

    def _reinit_later(self, why: str) -> None:
        if self._initialized:
            self.log.warning("NVML went away, will initialise again", extra={"collector": self.name,
                                                                            "reason": why})
        self._initialized = False
        try:
            self.nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass

    # -- calls -----------------------------------------------------------------------
    def _call(self, idx: int, fn: str, *args: Any) -> Any:
        """Call NVML for one GPU. Returns None when the call cannot answer."""
        try:
            return getattr(self.nvml, fn)(*args)
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired) as exc:
            raise _GpuGone(error_name(exc)) from None
        except (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded,
                pynvml.NVMLError_LibRmVersionMismatch) as exc:
            raise _Reinit(f"{fn}: {error_name(exc)}") from None
        except pynvml.NVMLError_NotSupported:
            self._once((idx, fn, "NotSupported"), logging.INFO, "NVML call not supported, metric omitted",
                       gpu=idx, function=fn)
            return None
        except pynvml.NVMLError as exc:
            self._count_error(fn, error_name(exc))
            self._once((idx, fn, error_name(exc)), logging.WARNING, "NVML call failed, metric omitted",
                       gpu=idx, function=fn, error=error_name(exc))
            return None

    def _count_error(self, fn: str, err: str) -> None:
        with self._lock:
            self._errors[(fn, err)] = self._errors.get((fn, err), 0) + 1

    def _once(self, key: tuple, level: int, msg: str, **fields: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.log(level, msg, extra={"collector": self.name, **fields})

    # -- collection ------------------------------------------------------------------
    def collect(self) -> list:
        self._ensure_init()
        try:
            count = self.nvml.nvmlDeviceGetCount()
            samples = [self._read_gpu(i) for i in range(count)]
        except _Reinit as exc:
            self._reinit_later(str(exc))
            raise CollectorError(f"NVML is not available ({exc}); initialising again next time") from None
        except (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded) as exc:
            self._reinit_later(error_name(exc))
            raise CollectorError(f"NVML is not available (nvmlDeviceGetCount: {error_name(exc)}); "
                                 "initialising again next time") from None
        except pynvml.NVMLError as exc:
            raise CollectorError(f"nvmlDeviceGetCount failed: {error_name(exc)}") from None
        if samples and not any(s.up for s in samples) and all(s.gone_reason == "Unknown" for s in samples):
            self._reinit_later("every GPU failed")
        b = self.builder()
        b.add("gpu_devices", (), count)
        if self.expected_count is not None:
            b.add("gpu_devices_expected", (), self.expected_count)
        self._resolve_kmsg()
        xid_counts, xid_last = self.xids.snapshot()
        for s in samples:
            self._emit(b, s)
        for (idx, code), n in sorted(xid_counts.items()):
            b.add("gpu_xid_errors_total", (idx, self._uuids.get(idx, ""), code, gpu_xid.classify(code)), n)
        for idx, ts in sorted(xid_last.items()):
            b.add("gpu_xid_last_timestamp_seconds", (idx, self._uuids.get(idx, "")), ts)
        with self._lock:
            errors = dict(self._errors)
        for (fn, err), n in sorted(errors.items()):
            b.add("gpufleet_exporter_nvml_errors_total", (fn, err), n)
        if "nvml" in self.xid_sources:
            b.add("gpufleet_exporter_xid_source_up", ("nvml",), int(self._event_ok))
        if self._kmsg is not None:
            b.add("gpufleet_exporter_xid_source_up", ("kmsg",), int(self._kmsg.healthy))
        if self.dcgm_compat:
            gpu_dcgm.emit(b, samples, self.dcgm_hostname, self.xids.last_code)
        return b.families()

    def _static_info(self, idx: int, h: Any) -> dict[str, str]:
        info = self._static.get(idx)
        if info is not None:
            return info
        pci = self._call(idx, "nvmlDeviceGetPciInfo", h)
        bus_id = pci.busId if pci is not None else ""
        if isinstance(bus_id, bytes):
            bus_id = bus_id.decode()
        cuda = self._call(idx, "nvmlSystemGetCudaDriverVersion")
        info = {
            "uuid": self._call(idx, "nvmlDeviceGetUUID", h) or "",
            "name": self._call(idx, "nvmlDeviceGetName", h) or "",
            "pci_bus_id": bus_id,
            "serial": self._call(idx, "nvmlDeviceGetSerial", h) or "",
            "vbios_version": self._call(idx, "nvmlDeviceGetVbiosVersion", h) or "",
            "driver_version": self._call(idx, "nvmlSystemGetDriverVersion") or "",
            "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "",
        }
        with self._lock:
            self._static[idx] = info
            self._uuids[idx] = info["uuid"]
            self._handles[handle_key(h)] = idx
            key = gpu_xid.pci_key(bus_id)
            if key is not None:
                self._pci_index[key] = idx
        return info

    def _read_gpu(self, idx: int) -> GpuSample:
        s = GpuSample(index=idx, uuid=self._uuids.get(idx, ""))
        try:
            h = self.nvml.nvmlDeviceGetHandleByIndex(idx)
            self._read_into(s, idx, h)
        except _GpuGone as exc:
            s.up, s.gone_reason = False, exc.error
            self._once((idx, "gone", exc.error), logging.ERROR, "GPU unusable", gpu=idx, uuid=s.uuid,
                       error=exc.error)
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired) as exc:
            s.up, s.gone_reason = False, error_name(exc)
            self._once((idx, "gone", s.gone_reason), logging.ERROR, "GPU unusable", gpu=idx, uuid=s.uuid,
                       error=s.gone_reason)
        except (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded) as exc:
            raise _Reinit(error_name(exc)) from None
        except pynvml.NVMLError as exc:
            s.up, s.gone_reason = False, error_name(exc)
            self._once((idx, "handle", s.gone_reason), logging.ERROR, "cannot get a handle for the GPU",
                       gpu=idx, error=s.gone_reason)
        if s.up:
            self._logged.discard((idx, "gone", "GpuIsLost"))
            self._logged.discard((idx, "gone", "ResetRequired"))
        return s

    def _read_into(self, s: GpuSample, idx: int, h: Any) -> None:
        c = self._call
        s.info = self._static_info(idx, h)
        s.uuid = s.info["uuid"]
        v = s.values
        util = c(idx, "nvmlDeviceGetUtilizationRates", h)
        if util is not None:
            v["gpu_utilization_ratio"] = util.gpu / 100.0
            v["gpu_memory_utilization_ratio"] = util.memory / 100.0
        mem = c(idx, "nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            v["gpu_memory_used_bytes"] = mem.used
            v["gpu_memory_free_bytes"] = mem.free
            v["gpu_memory_total_bytes"] = mem.total
        temp = c(idx, "nvmlDeviceGetTemperature", h, pynvml.NVML_TEMPERATURE_GPU)
        if temp is not None:
            v["gpu_temperature_celsius"] = temp
        for name, threshold in TEMPERATURE_THRESHOLDS.items():
            t = self._call_quiet(idx, "nvmlDeviceGetTemperatureThreshold", h, threshold)
            if t is not None and t > 0:
                s.thresholds[name] = t
        power = c(idx, "nvmlDeviceGetPowerUsage", h)
        if power is not None:
            v["gpu_power_usage_watts"] = power / 1000.0
        limit = c(idx, "nvmlDeviceGetEnforcedPowerLimit", h)
        if limit is not None:
            v["gpu_power_limit_watts"] = limit / 1000.0
        energy = c(idx, "nvmlDeviceGetTotalEnergyConsumption", h)
        if energy is not None:
            v["gpu_energy_consumption_joules_total"] = energy / 1000.0
        for name, clock in (("gpu_sm_clock_hertz", pynvml.NVML_CLOCK_SM),
                            ("gpu_memory_clock_hertz", pynvml.NVML_CLOCK_MEM)):
            mhz = c(idx, "nvmlDeviceGetClockInfo", h, clock)
            if mhz is not None:
                v[name] = mhz * 1e6
        max_sm = c(idx, "nvmlDeviceGetMaxClockInfo", h, pynvml.NVML_CLOCK_SM)
        if max_sm is not None:
            v["gpu_sm_clock_max_hertz"] = max_sm * 1e6
        fan = c(idx, "nvmlDeviceGetFanSpeed", h)
        if fan is not None:
            v["gpu_fan_speed_ratio"] = fan / 100.0
        pstate = c(idx, "nvmlDeviceGetPerformanceState", h)
        if pstate is not None and pstate != pynvml.NVML_PSTATE_UNKNOWN:
            v["gpu_performance_state"] = pstate
        persistence = c(idx, "nvmlDeviceGetPersistenceMode", h)
        if persistence is not None:
            v["gpu_persistence_mode"] = int(persistence == pynvml.NVML_FEATURE_ENABLED)
        mig = c(idx, "nvmlDeviceGetMigMode", h)
        if mig is not None:
            v["gpu_mig_mode"] = int(mig[0] == pynvml.NVML_DEVICE_MIG_ENABLE)
        # Reliability
        for etype, ename in ((pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
                             (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected")):
            for ctype, cname in ((pynvml.NVML_VOLATILE_ECC, "volatile"), (pynvml.NVML_AGGREGATE_ECC, "aggregate")):
                n = c(idx, "nvmlDeviceGetTotalEccErrors", h, etype, ctype)
                if n is not None:
                    s.ecc[(ename, cname)] = n
        s.remapped = c(idx, "nvmlDeviceGetRemappedRows", h)
        for cause, const in (("single_bit_ecc", pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
                             ("double_bit_ecc", pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)):
            pages = c(idx, "nvmlDeviceGetRetiredPages", h, const)
            if pages is not None:
                s.retired[cause] = len(pages)
        if s.retired:
            pending = c(idx, "nvmlDeviceGetRetiredPagesPendingStatus", h)
            if pending is not None:
                v["gpu_retired_pages_pending"] = int(pending == pynvml.NVML_FEATURE_ENABLED)
        replay = c(idx, "nvmlDeviceGetPcieReplayCounter", h)
        if replay is not None:
            v["gpu_pcie_replay_errors_total"] = replay
        self._read_nvlink(s, idx, h)
        s.clock_events = c(idx, "nvmlDeviceGetCurrentClocksEventReasons", h)
        self._read_fields(s, idx, h)
        if self.gpm_enabled:
            self._read_gpm(s, idx, h)

    def _call_quiet(self, idx: int, fn: str, *args: Any) -> Any:
        """Like _call, for optional probes where an error is expected on some parts."""
        try:
            return getattr(self.nvml, fn)(*args)
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired) as exc:
            raise _GpuGone(error_name(exc)) from None
        except (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded) as exc:
            raise _Reinit(f"{fn}: {error_name(exc)}") from None
        except pynvml.NVMLError:
            return None

    def _read_nvlink(self, s: GpuSample, idx: int, h: Any) -> None:
        links = self._nvlinks.get(idx)
        if links is None:
            # Probe once per NVML session: links answer until the first invalid index.
            links = 0
            for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
                if self._call_quiet(idx, "nvmlDeviceGetNvLinkState", h, link) is None:
                    break
                links = link + 1
            self._nvlinks[idx] = links
        for link in range(links):
            state = self._call(idx, "nvmlDeviceGetNvLinkState", h, link)
            if state is not None:
                s.nvlink_up[link] = int(state == pynvml.NVML_FEATURE_ENABLED)
            for cname, const in NVLINK_COUNTERS.items():
                n = self._call(idx, "nvmlDeviceGetNvLinkErrorCounter", h, link, const)
                if n is not None:
                    s.nvlink_errors[(link, cname)] = n

    def _read_fields(self, s: GpuSample, idx: int, h: Any) -> None:
        fields = [pynvml.NVML_FI_DEV_MEMORY_TEMP, pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        values = self._call(idx, "nvmlDeviceGetFieldValues", h, fields)
        if values is None:
            return
        for fv in values:
            if fv.nvmlReturn != pynvml.NVML_SUCCESS:
                self._once((idx, "field", fv.fieldId), logging.INFO, "NVML field not supported, metric omitted",
                           gpu=idx, field=fv.fieldId)
                continue
            value = _field_value(fv)
            if fv.fieldId == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                s.values["gpu_memory_temperature_celsius"] = value
            elif fv.fieldId == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
                s.recovery_action = int(value)

    def _read_gpm(self, s: GpuSample, idx: int, h: Any) -> None:
        supported = self._gpm_supported.get(idx)
        if supported is None:
            support = self._call_quiet(idx, "nvmlGpmQueryDeviceSupport", h)
            supported = bool(support is not None and support.isSupportedDevice)
            self._gpm_supported[idx] = supported
            if not supported:
                self._once((idx, "gpm"), logging.INFO, "GPM profiling metrics not supported on this GPU",
                           gpu=idx)
        if not supported:
            return
        try:
            sample = self.nvml.nvmlGpmSampleAlloc()
            self.nvml.nvmlGpmSampleGet(h, sample)
        except (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired) as exc:
            raise _GpuGone(error_name(exc)) from None
        except pynvml.NVMLError as exc:
            self._count_error("nvmlGpmSampleGet", error_name(exc))
            self._once((idx, "gpm-sample", error_name(exc)), logging.WARNING, "GPM sample failed", gpu=idx,
                       error=error_name(exc))
            return
        prev = self._gpm_prev.get(idx)
        self._gpm_prev[idx] = sample
        if prev is None:
            return  # a rate needs two samples: the first collection has none
        try:
            mg = pynvml.c_nvmlGpmMetricsGet_t()
            mg.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(GPM_METRICS)
            mg.sample1, mg.sample2 = prev, sample
            for i, metric_id in enumerate(GPM_METRICS):
                mg.metrics[i].metricId = metric_id
            self.nvml.nvmlGpmMetricsGet(mg)
            for i in range(mg.numMetrics):
                m = mg.metrics[i]
                if m.nvmlReturn == pynvml.NVML_SUCCESS:
                    s.gpm[m.metricId] = m.value
        except pynvml.NVMLError as exc:
            self._count_error("nvmlGpmMetricsGet", error_name(exc))
            self._once((idx, "gpm-get", error_name(exc)), logging.WARNING, "GPM metrics failed", gpu=idx,
                       error=error_name(exc))
        finally:
            try:
                self.nvml.nvmlGpmSampleFree(prev)
            except pynvml.NVMLError:
                pass

    # -- emission --------------------------------------------------------------------
    def _emit(self, b: Any, s: GpuSample) -> None:
        g = (s.index, s.uuid)
        b.add("gpu_up", g, int(s.up))
        if s.info:
            b.add("gpu_info", tuple(str(x) for x in (s.index, *(s.info[k] for k in INFO_LABELS[1:]))), 1)
        if not s.up:
            return
        for name, value in s.values.items():
            b.add(name, g, value)
        for name, t in s.thresholds.items():
            b.add("gpu_temperature_threshold_celsius", g + (name,), t)
        for (etype, counter), n in s.ecc.items():
            b.add("gpu_ecc_errors_total", g + (etype, counter), n)
        if s.remapped is not None:
            corr, unc, pending, failed = s.remapped
            b.add("gpu_remapped_rows_total", g + ("correctable",), corr)
            b.add("gpu_remapped_rows_total", g + ("uncorrectable",), unc)
            b.add("gpu_row_remap_pending", g, int(bool(pending)))
            b.add("gpu_row_remap_failed", g, int(bool(failed)))
        for cause, n in s.retired.items():
            b.add("gpu_retired_pages_total", g + (cause,), n)
        for link, up in s.nvlink_up.items():
            b.add("gpu_nvlink_up", g + (str(link),), up)
        for (link, cname), n in s.nvlink_errors.items():
            b.add("gpu_nvlink_errors_total", g + (str(link), cname), n)
        if s.clock_events is not None:
            for reason, bit in CLOCK_EVENT_BITS.items():
                b.add("gpu_clock_event_active", g + (reason,), int(bool(s.clock_events & bit)))
        if s.recovery_action is not None:
            current = RECOVERY_ACTION_NAMES.get(s.recovery_action, f"unknown_{s.recovery_action}")
            for action in RECOVERY_ACTIONS:
                b.add("gpu_recovery_action", g + (action,), int(action == current))
            if current not in RECOVERY_ACTIONS:
                b.add("gpu_recovery_action", g + (current,), 1)
        for metric_id, value in s.gpm.items():
            m = GPM_METRICS[metric_id]
            b.add(m.native, g, value * m.scale)

    # -- Xid sources -----------------------------------------------------------------
    def _start_event_thread(self) -> None:
        if self._event_thread is not None and self._event_thread.is_alive():
            return  # it notices the new NVML session by itself
        self._event_thread = threading.Thread(target=self._event_loop, name="nvml-xid-events", daemon=True)
        self._event_thread.start()

    def _register_events(self) -> tuple[Any, int]:
        generation = self._generation
        es = self.nvml.nvmlEventSetCreate()
        registered = 0
        for idx in range(self.nvml.nvmlDeviceGetCount()):
            try:
                h = self.nvml.nvmlDeviceGetHandleByIndex(idx)
                with self._lock:
                    self._handles[handle_key(h)] = idx
                self.nvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, es)
                registered += 1
            except pynvml.NVMLError as exc:
                self._once(("xid-register", idx, error_name(exc)), logging.WARNING,
                           "cannot register for Xid events on this GPU", gpu=idx, error=error_name(exc))
        self.log.info("listening for NVML Xid events", extra={"collector": self.name, "gpus": registered})
        return es, generation

    def _event_loop(self) -> None:
        es, generation, backoff = None, -1, 0.5
        while not self._stop.is_set():
            try:
                if es is None or generation != self._generation:
                    if es is not None:
                        try:
                            self.nvml.nvmlEventSetFree(es)
                        except pynvml.NVMLError:
                            pass
                        es = None
                    if not self._initialized:
                        self._stop.wait(backoff)
                        continue
                    es, generation = self._register_events()
                    self._event_ok, self._event_error, backoff = True, None, 0.5
                try:
                    data = self.nvml.nvmlEventSetWait_v2(es, self._event_timeout_ms)
                except pynvml.NVMLError_Timeout:
                    continue
                if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                    with self._lock:
                        idx = self._handles.get(handle_key(data.device), -1)
                    self.xids.add("nvml", idx, int(data.eventData), time.time())
                    self.log.warning("Xid error", extra={"collector": self.name, "source": "nvml", "gpu": idx,
                                                         "xid": int(data.eventData),
                                                         "class": gpu_xid.classify(int(data.eventData))})
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any error
                msg = f"{type(exc).__name__}: {exc}"
                if msg != self._event_error:
                    self.log.error("Xid event watcher failed, retrying", extra={"collector": self.name,
                                                                               "reason": msg})
                self._event_ok, self._event_error = False, msg
                if es is not None:
                    try:
                        self.nvml.nvmlEventSetFree(es)
                    except Exception:  # noqa: BLE001 - the set may be gone with the driver
                        pass
                es = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        if es is not None:
            try:
                self.nvml.nvmlEventSetFree(es)
            except Exception:  # noqa: BLE001
                pass

    def _on_kmsg_xid(self, ev: gpu_xid.KmsgXid) -> None:
        # The kernel names the GPU by PCI address; the mapping to an index is
        # known once NVML has been read, so early lines wait for it.
        with self._lock:
            self._kmsg_pending.append(ev)
        self.log.warning("Xid error", extra={"collector": self.name, "source": "kmsg", "xid": ev.xid,
                                             "class": gpu_xid.classify(ev.xid), "pci_bus_id": ev.pci_bus_id})

    def _resolve_kmsg(self) -> None:
        with self._lock:
            pending, self._kmsg_pending = self._kmsg_pending, []
            mapping = dict(self._pci_index)
        for ev in pending:
            idx = mapping.get(ev.pci, -1)
            if idx < 0:
                self._once(("kmsg-unmapped", ev.pci_bus_id), logging.WARNING,
                           "Xid for a PCI address NVML does not report; counted under gpu=-1",
                           pci_bus_id=ev.pci_bus_id)
            self.xids.add("kmsg", idx, ev.xid, ev.timestamp)

    def status(self) -> str:
        parts = [f"NVML {'initialised' if self._initialized else 'not initialised'}"]
        parts.append(f"GPUs seen: {len(self._static)}")
        if "nvml" in self.xid_sources:
            parts.append(f"Xid events: {'ok' if self._event_ok else (self._event_error or 'starting')}")
        if self._kmsg is not None:
            parts.append(f"kmsg: {'ok' if self._kmsg.healthy else (self._kmsg.last_error or 'starting')}")
        return "; ".join(parts)

    def close(self) -> None:
        self._stop.set()
        if self._event_thread is not None:
            self._event_thread.join(timeout=2 * self._event_timeout_ms / 1000 + 1)
        if self._kmsg is not None:
            self._kmsg.stop()
        if self._initialized:
            try:
                self.nvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
            self._initialized = False


_VALUE_FIELDS = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def _field_value(fv: Any) -> float:
    """The value of an nvmlFieldValue_t, read from the union member its type names."""
    member = _VALUE_FIELDS.get(fv.valueType)
    if member is None:
        raise CollectorError(f"unknown NVML value type {fv.valueType}")
    return getattr(fv.value, member)


def add_arguments(p: argparse.ArgumentParser) -> None:
    gpu = p.add_argument_group("gpu collector (--collector.gpu)")
    gpu.add_argument("--gpu.backend", dest="gpu_backend", choices=("nvml", "sim"), default="nvml",
                     help="nvml: the real NVML library (libnvidia-ml.so.1). sim: simulated GPUs, for demos and "
                          "tests (see --sim.*).")
    gpu.add_argument("--gpu.expected-count", dest="gpu_expected", type=non_negative_int, default=None, metavar="N",
                     help="GPUs this node should have; exported as gpu_devices_expected so a GPU that fell off "
                          "the bus is visible.")
    gpu.add_argument("--gpu.dcgm-compat", dest="dcgm_compat", action="store_true",
                     help="Also expose dcgm-exporter's DCGM_FI_* series with its names, units and labels.")
    gpu.add_argument("--gpu.dcgm-hostname", dest="dcgm_hostname", default="",
                     help="Value of the Hostname label of DCGM_FI_* series (default: $NODE_NAME, else the host "
                          "name).")
    gpu.add_argument("--gpu.xid-source", dest="xid_source", choices=("nvml", "kmsg", "both"), default="nvml",
                     help="Where Xid errors are read: NVML events, the kernel log (<rootfs>/dev/kmsg), or both "
                          "(each event counted once: the larger count of the two sources wins).")
    gpu.add_argument("--gpu.kmsg-path", dest="kmsg_path", default="",
                     help="Kernel log to follow for Xid lines (default <rootfs>/dev/kmsg; a regular file is "
                          "followed like tail -F).")
    gpu.add_argument("--gpu.gpm", dest="gpm", action=argparse.BooleanOptionalAction, default=True,
                     help="Profiling metrics (SM/tensor/DRAM activity, NVLink and PCIe rates) through NVML GPM "
                          "on Hopper and newer.")
    sim = p.add_argument_group("simulator (--gpu.backend=sim)")
    sim.add_argument("--sim.gpus", dest="sim_gpus", type=non_negative_int, default=8, help="Simulated GPUs.")
    sim.add_argument("--sim.model", dest="sim_model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                     help="GPU profile (name, memory, power limit, NVLinks, GPM support).")
    sim.add_argument("--sim.seed", dest="sim_seed", type=int, default=0,
                     help="Seed for UUIDs, serials and load patterns; use one per simulated node.")
    sim.add_argument("--sim.state-file", dest="sim_state", default="", metavar="FILE",
                     help="YAML/JSON fault-injection file, re-read when it changes (docs/simulator.md).")


def nvml_for(args: argparse.Namespace) -> Any:
    """The NVML backend the flags select, one per agent: collectors that read
    NVML (gpu, jobs) share it, so a simulated node looks the same to all of them."""
    nvml = getattr(args, "_nvml", None)
    if nvml is None:
        if args.gpu_backend == "sim":
            from exporters.gpu_sim import SimulatedNVML

            nvml = SimulatedNVML(gpus=args.sim_gpus, model=args.sim_model, seed=args.sim_seed,
                                 state_file=args.sim_state or None)
        else:
            nvml = pynvml
        args._nvml = nvml
    return nvml


def create(args: argparse.Namespace) -> GpuCollector:
    nvml = nvml_for(args)
    sources = ("nvml", "kmsg") if args.xid_source == "both" else (args.xid_source,)
    return GpuCollector(
        nvml,
        expected_count=args.gpu_expected,
        dcgm_compat=args.dcgm_compat,
        dcgm_hostname=args.dcgm_hostname,
        xid_sources=sources,
        kmsg_path=args.kmsg_path or os.path.join(args.rootfs, "dev/kmsg"),
        gpm=args.gpm,
    )
