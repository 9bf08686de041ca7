"""A simulated NVML: the nvidia-ml-py (``pynvml``) module surface without a GPU.

``SimulatedNVML`` is injected under the real GPU collector in place of the
``pynvml`` module, so tests and the demo run the production code path. It keeps
pynvml's function names, argument order and return types (the same ctypes
structures, ``nvmlFriendlyObject`` for processes, ``str`` for strings) and
raises pynvml's own ``NVMLError_*`` classes. Constants and classes are taken
from the installed pynvml, so they cannot drift. A pynvml function the
simulator does not implement raises ``NVMLError_FunctionNotFound``, as the real
library does against an older driver.

Faults are injected into a running agent through a YAML/JSON *state file*,
re-read when it changes. The format is documented in docs/simulator.md; every
key is optional::

    driver_loaded: true            # false: nvmlInit fails, handles go stale
    gpus:
      "3":
        xid: {"79": 1}             # cumulative Xid events per code
        lost: true                 # GPU_IS_LOST on every call
        reset_required: false      # RESET_REQUIRED on every call
        hang: false                # every call on this GPU blocks until cleared
        ecc_uncorrected: 2         # volatile uncorrected ECC errors
        ecc_corrected: 10
        remap_pending: true
        remap_failed: false
        remapped_rows_correctable: 1
        remapped_rows_uncorrectable: 0
        clock_events: [hw_thermal_slowdown]
        nvlink_down: [0]
        nvlink_errors: {"0": {crc_flit: 3, crc_data: 0, replay: 1, recovery: 0}}
        pcie_replays: 4
        recovery_action: node_reboot
        utilization: 0.97
        memory_utilization: 0.4
        memory_used_bytes: 40000000000
        temperature_celsius: 83
        memory_temperature_celsius: 85
        power_watts: 650
        processes: [12345]         # or [{pid: 12345, used_memory_bytes: 1e9}]
        errors: {nvmlDeviceGetPowerUsage: NOT_SUPPORTED}
"""

from __future__ import annotations

import ctypes
import inspect
import json
import math
import os
import random
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

import pynvml
import yaml

# Clock-event reason names, shared with the collector (which decodes the real bitmask).
CLOCK_EVENT_BITS = {
    "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
    "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
    "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "display_clock_setting": pynvml.nvmlClocksEventReasonDisplayClockSetting,
}

RECOVERY_ACTIONS = {
    "none": pynvml.NVML_GPU_RECOVERY_ACTION_NONE,
    "gpu_reset": pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET,
    "node_reboot": pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT,
    "drain_p2p": pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P,
    "drain_and_reset": pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET,
}


@dataclass(frozen=True)
class Model:
    """A GPU profile with the limits NVML reports for the real part."""

    key: str
    name: str
    memory_total: int  # bytes
    power_limit_mw: int
    idle_power_mw: int
    sm_clock_max_mhz: int
    sm_clock_idle_mhz: int
    mem_clock_mhz: int
    nvlinks: int
    gpm: bool
    fan: bool
    page_retirement: bool  # pre-Ampere parts retire pages; Ampere+ remap rows
    row_remapping: bool
    temp_slowdown: int
    temp_shutdown: int
    temp_gpu_max: int
    temp_mem_max: int
    vbios: str
    mig: bool = True


MODELS = {
    m.key: m
    for m in (
        Model("h100-sxm5-80gb", "NVIDIA H100 80GB HBM3", 85520809984, 700000, 72000, 1980, 345, 2619,
              18, True, False, False, True, 90, 92, 87, 95, "96.00.89.00.01"),
        Model("h200-sxm5-141gb", "NVIDIA H200", 150754820096, 700000, 78000, 1980, 345, 3201,
              18, True, False, False, True, 90, 92, 87, 95, "96.00.A5.00.01"),
        Model("a100-sxm4-80gb", "NVIDIA A100-SXM4-80GB", 85899345920, 400000, 55000, 1410, 210, 1593,
              12, False, False, False, True, 90, 92, 85, 95, "92.00.45.00.03"),
        Model("v100-sxm2-32gb", "Tesla V100-SXM2-32GB", 34359738368, 300000, 40000, 1530, 135, 877,
              6, False, False, True, False, 87, 90, 83, 95, "88.00.80.00.01", mig=False),
        Model("l40s", "NVIDIA L40S", 48305799168, 350000, 35000, 2520, 210, 9001,
              0, False, True, False, True, 88, 93, 89, 95, "95.02.5A.00.01", mig=False),
    )
}
DEFAULT_MODEL = "h100-sxm5-80gb"
DRIVER_VERSION = "550.90.07"
CUDA_DRIVER_VERSION = 12040
# PCI bus numbers of the eight GPUs of an HGX H100 baseboard.
HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

_HANDLE_BASE = 0x5157_0000  # fake, never dereferenced, pointer values for handles
_FUNCTIONS = {n for n, v in vars(pynvml).items() if n.startswith("nvml") and inspect.isfunction(v)}


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def _error_code(name: str) -> int:
    key = name.upper()
    if not key.startswith("NVML_ERROR_"):
        key = "NVML_ERROR_" + key
    code = getattr(pynvml, key, None)
    if not isinstance(code, int):
        raise ValueError(f"unknown NVML error {name!r}")
    return code


class StateFile:
    """The fault-injection file, re-read when its mtime or size changes."""

    def __init__(self, path: str | None, poll_interval: float = 0.05):
        self.path = path
        self.poll_interval = poll_interval
        self._sig: tuple[int, int, int] | None = None
        self.data: dict[str, Any] = {}
        self.error: str | None = None
        self._checked = 0.0

    def refresh(self, min_interval: float | None = None) -> bool:
        if not self.path:
            return False
        now = time.monotonic()
        if now - self._checked < (self.poll_interval if min_interval is None else min_interval):
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._sig is not None:
                self._sig, self.data = None, {}
                return True
            return False
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._sig:
            return False
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            data = (json.loads(text) if self.path.endswith(".json") else yaml.safe_load(text)) or {}
            if not isinstance(data, dict):
                raise ValueError("top level must be a mapping")
            gpus = data.get("gpus") or {}
            if not isinstance(gpus, dict):
                raise ValueError("'gpus' must map GPU index to settings")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            # Keep the last good state: a half-written file must not clear faults.
            self.error = f"{self.path}: {exc}"
            return False
        self._sig = sig
        self.data = data
        self.error = None
        return True

    def gpu(self, index: int) -> dict[str, Any]:
        gpus = self.data.get("gpus") or {}
        entry = gpus.get(str(index), gpus.get(index)) if isinstance(gpus, dict) else None
        return entry if isinstance(entry, dict) else {}


class _GPU:
    def __init__(self, index: int, model: Model, rng: random.Random, started: float):
        self.index = index
        self.model = model
        self.uuid = "GPU-" + str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        self.serial = str(1650000000000 + rng.randrange(10**9))
        bus = HGX_BUSES[index] if index < len(HGX_BUSES) else 0x10 + index
        self.pci_bus_id = f"00000000:{bus:02X}:00.0"
        self.bus = bus
        self.minor = index
        self.base_util = 0.55 + 0.4 * rng.random()
        self.phase = rng.random() * 2 * math.pi
        self.energy_mj = 0.0
        self.energy_at = started
        self.xid_delivered: dict[int, int] = {}


class SimulatedNVML:
    """Drop-in replacement for the ``pynvml`` module, backed by simulated GPUs."""

    def __init__(
        self,
        gpus: int = 8,
        model: str = DEFAULT_MODEL,
        seed: int = 0,
        state_file: str | None = None,
        clock=time.time,
        state_poll_interval: float = 0.05,
    ):
        if model not in MODELS:
            raise ValueError(f"unknown simulated model {model!r}; choose from {', '.join(sorted(MODELS))}")
        if gpus < 0:
            raise ValueError("number of simulated GPUs must be >= 0")
        self._model = MODELS[model]
        self._clock = clock
        rng = random.Random(seed)
        started = clock()
        self._gpus = [_GPU(i, self._model, rng, started) for i in range(gpus)]
        self.state = StateFile(state_file, state_poll_interval)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._initialized = 0
        self._generation = 0  # bumped when the simulated driver unloads: handles go stale
        self._event_sets: dict[int, dict[str, Any]] = {}
        self._next_set = 1
        self._gpm_samples: dict[int, tuple[int, float, float]] = {}
        self._next_sample = 1
        self.calls: dict[str, int] = {}
        self.state.refresh(0)
        self._was_loaded = self._driver_loaded()

    # -- module surface: constants, structures and errors come from pynvml ---------
    def __getattr__(self, name: str) -> Any:
        if name in _FUNCTIONS:
            def _missing(*_args, **_kwargs):
                raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

            _missing.__name__ = name
            return _missing
        try:
            return getattr(pynvml, name)
        except AttributeError:
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}") from None

    # -- internals ---------------------------------------------------------------
    def _driver_loaded(self) -> bool:
        return bool(self.state.data.get("driver_loaded", True))

    def _sync(self) -> None:
        """Re-read the state file and apply what changed (new Xids, driver reload)."""
        if not self.state.refresh():
            return
        with self._cond:
            loaded = self._driver_loaded()
            if self._was_loaded and not loaded:
                self._initialized = 0
                self._generation += 1
            self._was_loaded = loaded
            self._cond.notify_all()

    def _enter(self, fn: str) -> None:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        self._sync()
        if not self._driver_loaded() or self._initialized <= 0:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Any, fn: str) -> _GPU:
        """Resolve a handle, applying the per-GPU faults of the state file."""
        self._enter(fn)
        try:
            value = ctypes.cast(handle, ctypes.c_void_p).value or 0
        except (TypeError, ctypes.ArgumentError):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT) from None
        generation, index = divmod(value - _HANDLE_BASE, 0x1000)
        if value < _HANDLE_BASE or not 0 <= index < len(self._gpus):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if generation != self._generation:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = self._gpus[index]
        self._faults(gpu, fn)
        return gpu

    def _faults(self, gpu: _GPU, fn: str) -> None:
        st = self.state.gpu(gpu.index)
        while st.get("hang"):
            # A wedged GPU: the call blocks until the fault is cleared (or forever).
            time.sleep(0.02)
            self._sync()
            st = self.state.gpu(gpu.index)
        if st.get("lost"):
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        if st.get("reset_required"):
            raise _err(pynvml.NVML_ERROR_RESET_REQUIRED)
        errors = st.get("errors") or {}
        if isinstance(errors, dict) and fn in errors:
            raise _err(_error_code(str(errors[fn])))

    def _st(self, gpu: _GPU) -> dict[str, Any]:
        return self.state.gpu(gpu.index)

    def _util(self, gpu: _GPU) -> float:
        st = self._st(gpu)
        if "utilization" in st:
            return min(1.0, max(0.0, float(st["utilization"])))
        wobble = 0.05 * math.sin(self._clock() / 30.0 + gpu.phase)
        return min(1.0, max(0.0, gpu.base_util + wobble))

    def _power_mw(self, gpu: _GPU) -> int:
        st = self._st(gpu)
        if "power_watts" in st:
            return int(float(st["power_watts"]) * 1000)
        m = gpu.model
        return int(m.idle_power_mw + (m.power_limit_mw * 0.92 - m.idle_power_mw) * self._util(gpu))

    def _handle(self, index: int) -> Any:
        return ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + self._generation * 0x1000 + index), pynvml.c_nvmlDevice_t)

    # -- init / system -------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.calls["nvmlInit"] = self.calls.get("nvmlInit", 0) + 1
        self._sync()
        if self.state.data.get("library_missing"):
            raise _err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if not self._driver_loaded():
            raise _err(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        with self._lock:
            self._initialized += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            if self._initialized <= 0:
                raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
            self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return DRIVER_VERSION

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        return CUDA_DRIVER_VERSION

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.nvmlSystemGetCudaDriverVersion()

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return "12." + DRIVER_VERSION

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= int(index) < len(self._gpus):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._handle(int(index))

    # -- identity ------------------------------------------------------------------
    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetIndex").index

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetMinorNumber").minor

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").model.name

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetSerial").serial

    def nvmlDeviceGetVbiosVersion(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetVbiosVersion").model.vbios

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo")
        info = pynvml.nvmlPciInfo_t()
        info.busIdLegacy = gpu.pci_bus_id[4:].encode()
        info.busId = gpu.pci_bus_id.encode()
        info.domain, info.bus, info.device = 0, gpu.bus, 0
        info.pciDeviceId = 0x233010DE
        info.pciSubSystemId = 0x16C110DE
        return info

    def nvmlDeviceGetPciInfo_v3(self, handle: Any) -> Any:
        return self.nvmlDeviceGetPciInfo(handle)

    # -- load ----------------------------------------------------------------------
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        st = self._st(gpu)
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = round(self._util(gpu) * 100)
        mem = st.get("memory_utilization", self._util(gpu) * 0.45)
        util.memory = round(float(mem) * 100)
        return util

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        st = self._st(gpu)
        total = gpu.model.memory_total
        used = int(st.get("memory_used_bytes", total * (0.02 + 0.85 * self._util(gpu))))
        used = max(0, min(total, used))
        mem = pynvml.c_nvmlMemory_t()
        mem.total, mem.used, mem.free = total, used, total - used
        return mem

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        st = self._st(gpu)
        return int(st.get("temperature_celsius", 32 + 38 * self._util(gpu)))

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperatureThreshold")
        m = gpu.model
        table = {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: m.temp_shutdown,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: m.temp_slowdown,
            pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: m.temp_mem_max,
            pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: m.temp_gpu_max,
        }
        if threshold not in table:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return table[threshold]

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._power_mw(self._gpu(handle, "nvmlDeviceGetPowerUsage"))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").model.power_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerManagementLimit").model.power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption")
        with self._lock:
            now = self._clock()
            gpu.energy_mj += max(0.0, now - gpu.energy_at) * self._power_mw(gpu)
            gpu.energy_at = now
            return int(gpu.energy_mj)

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        m = gpu.model
        if clock_type == pynvml.NVML_CLOCK_SM or clock_type == pynvml.NVML_CLOCK_GRAPHICS:
            st = self._st(gpu)
            if "sm_clock_mhz" in st:
                return int(st["sm_clock_mhz"])
            if self._clock_event_mask(gpu) & (
                pynvml.nvmlClocksEventReasonHwSlowdown
                | pynvml.nvmlClocksEventReasonHwThermalSlowdown
                | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown
            ):
                return m.sm_clock_max_mhz // 2
            return m.sm_clock_idle_mhz if self._util(gpu) < 0.01 else m.sm_clock_max_mhz
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return m.mem_clock_mhz
        raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetMaxClockInfo")
        if clock_type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
            return gpu.model.sm_clock_max_mhz
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return gpu.model.mem_clock_mhz
        raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetFanSpeed(self, handle: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetFanSpeed")
        if not gpu.model.fan:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(30 + 50 * self._util(gpu))

    def nvmlDeviceGetPerformanceState(self, handle: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPerformanceState")
        return int(self._st(gpu).get("pstate", 0))

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPersistenceMode")
        return int(bool(self._st(gpu).get("persistence_mode", True)))

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetMigMode")
        if not gpu.model.mig:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = int(bool(self._st(gpu).get("mig_mode", False)))
        return [mode, mode]

    # -- reliability ---------------------------------------------------------------
    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        self._gpu(handle, "nvmlDeviceGetEccMode")
        return [pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED]

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        st = self._st(gpu)
        kind = "uncorrected" if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else "corrected"
        volatile = int(st.get(f"ecc_{kind}", 0))
        if counter_type == pynvml.NVML_VOLATILE_ECC:
            return volatile
        return volatile + int(st.get(f"ecc_{kind}_aggregate_base", 0))

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        gpu = self._gpu(handle, "nvmlDeviceGetRemappedRows")
        if not gpu.model.row_remapping:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        st = self._st(gpu)
        return (
            int(st.get("remapped_rows_correctable", 0)),
            int(st.get("remapped_rows_uncorrectable", 0)),
            int(bool(st.get("remap_pending", False))),
            int(bool(st.get("remap_failed", False))),
        )

    def nvmlDeviceGetRetiredPages(self, handle: Any, source: int) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetRetiredPages")
        if not gpu.model.page_retirement:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        key = "retired_pages_dbe" if source == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR else "retired_pages_sbe"
        return [0x1000 * (i + 1) for i in range(int(self._st(gpu).get(key, 0)))]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetRetiredPagesPendingStatus")
        if not gpu.model.page_retirement:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(bool(self._st(gpu).get("retired_pages_pending", False)))

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPcieReplayCounter")
        return int(self._st(gpu).get("pcie_replays", 0))

    def _clock_event_mask(self, gpu: _GPU) -> int:
        st = self._st(gpu)
        mask = 0
        for reason in st.get("clock_events") or []:
            if reason not in CLOCK_EVENT_BITS:
                raise ValueError(f"state file: unknown clock event {reason!r}")
            mask |= CLOCK_EVENT_BITS[reason]
        if "clock_events" not in st and self._util(gpu) < 0.01:
            mask |= pynvml.nvmlClocksEventReasonGpuIdle
        return mask

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._clock_event_mask(self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons"))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._clock_event_mask(self._gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons"))

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetNvLinkState")
        if gpu.model.nvlinks == 0:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < gpu.model.nvlinks:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        down = {int(x) for x in self._st(gpu).get("nvlink_down") or []}
        return pynvml.NVML_FEATURE_DISABLED if link in down else pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: Any, link: int, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetNvLinkErrorCounter")
        if not 0 <= link < gpu.model.nvlinks:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        names = {
            pynvml.NVML_NVLINK_ERROR_DL_REPLAY: "replay",
            pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: "recovery",
            pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: "crc_flit",
            pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: "crc_data",
        }
        if counter not in names:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        errors = self._st(gpu).get("nvlink_errors") or {}
        per_link = errors.get(str(link), errors.get(link, {})) or {}
        return int(per_link.get(names[counter], 0))

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[Any]) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        st = self._st(gpu)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        now_us = int(self._clock() * 1e6)
        for i, fid in enumerate(field_ids):
            try:
                values[i].fieldId, values[i].scopeId = fid
            except TypeError:
                values[i].fieldId = fid
            values[i].timestamp = now_us
            fid = values[i].fieldId
            if fid == pynvml.NVML_FI_DEV_MEMORY_TEMP and gpu.model.gpm:
                values[i].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                values[i].value.uiVal = int(st.get("memory_temperature_celsius", 36 + 40 * self._util(gpu)))
                values[i].nvmlReturn = pynvml.NVML_SUCCESS
            elif fid == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and gpu.model.gpm:
                values[i].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                values[i].value.uiVal = RECOVERY_ACTIONS[str(st.get("recovery_action", "none"))]
                values[i].nvmlReturn = pynvml.NVML_SUCCESS
            else:
                values[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    # -- processes -----------------------------------------------------------------
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        out = []
        for p in self._st(gpu).get("processes") or []:
            if isinstance(p, dict):
                pid, used = int(p["pid"]), p.get("used_memory_bytes")
            else:
                pid, used = int(p), None
            out.append(
                pynvml.nvmlFriendlyObject(
                    {
                        "pid": pid,
                        "usedGpuMemory": int(used) if used is not None else None,
                        "gpuInstanceId": 0xFFFFFFFF,
                        "computeInstanceId": 0xFFFFFFFF,
                    }
                )
            )
        return out

    nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses

    # -- events (Xid) --------------------------------------------------------------
    def nvmlEventSetCreate(self) -> Any:
        self._enter("nvmlEventSetCreate")
        with self._lock:
            key = self._next_set
            self._next_set += 1
            self._event_sets[key] = {"handles": {}, "queue": [], "generation": self._generation}
        return ctypes.cast(ctypes.c_void_p(0x7E00_0000 + key), pynvml.c_nvmlEventSet_t)

    def _event_set(self, event_set: Any) -> dict[str, Any]:
        key = (ctypes.cast(event_set, ctypes.c_void_p).value or 0) - 0x7E00_0000
        es = self._event_sets.get(key)
        if es is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return es

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None:
        gpu = self._gpu(handle, "nvmlDeviceRegisterEvents")
        with self._lock:
            es = self._event_set(event_set)
            es["handles"][gpu.index] = int(event_types)
            # Events that happened before registration are not delivered (as in NVML).
            for code, count in self._xid_counts(gpu).items():
                gpu.xid_delivered[code] = max(gpu.xid_delivered.get(code, 0), count)

    def _xid_counts(self, gpu: _GPU) -> dict[int, int]:
        raw = self._st(gpu).get("xid") or {}
        return {int(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _pump_xids(self) -> None:
        """Turn raised Xid counts in the state file into queued events."""
        for gpu in self._gpus:
            for code, count in self._xid_counts(gpu).items():
                seen = gpu.xid_delivered.get(code, 0)
                if count > seen:
                    gpu.xid_delivered[code] = count
                    for es in self._event_sets.values():
                        mask = es["handles"].get(gpu.index, 0)
                        if mask & pynvml.nvmlEventTypeXidCriticalError:
                            es["queue"].extend([(gpu.index, code)] * (count - seen))

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        self.calls["nvmlEventSetWait_v2"] = self.calls.get("nvmlEventSetWait_v2", 0) + 1
        deadline = time.monotonic() + timeout_ms / 1000.0
        with self._cond:
            es = self._event_set(event_set)
            while True:
                self._sync()
                if es["generation"] != self._generation or not self._driver_loaded():
                    raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
                self._pump_xids()
                if es["queue"]:
                    index, code = es["queue"].pop(0)
                    data = pynvml.c_nvmlEventData_t()
                    data.device = self._handle(index)
                    data.eventType = pynvml.nvmlEventTypeXidCriticalError
                    data.eventData = code
                    data.gpuInstanceId = 0xFFFFFFFF
                    data.computeInstanceId = 0xFFFFFFFF
                    return data
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _err(pynvml.NVML_ERROR_TIMEOUT)
                self._cond.wait(min(left, 0.05))

    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: Any) -> None:
        with self._lock:
            key = (ctypes.cast(event_set, ctypes.c_void_p).value or 0) - 0x7E00_0000
            if self._event_sets.pop(key, None) is None:
                raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    # -- GPM (Hopper profiling metrics) ----------------------------------------------
    def nvmlGpmQueryDeviceSupport(self, handle: Any) -> Any:
        gpu = self._gpu(handle, "nvmlGpmQueryDeviceSupport")
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(gpu.model.gpm)
        return support

    def nvmlGpmSampleAlloc(self) -> Any:
        self._enter("nvmlGpmSampleAlloc")
        with self._lock:
            key = self._next_sample
            self._next_sample += 1
            self._gpm_samples[key] = (-1, 0.0, 0.0)
        return ctypes.cast(ctypes.c_void_p(0x6B00_0000 + key), pynvml.c_nvmlGpmSample_t)

    def _sample_key(self, sample: Any) -> int:
        key = (ctypes.cast(sample, ctypes.c_void_p).value or 0) - 0x6B00_0000
        if key not in self._gpm_samples:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return key

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        with self._lock:
            self._gpm_samples.pop(self._sample_key(sample))

    def nvmlGpmSampleGet(self, handle: Any, sample: Any) -> Any:
        gpu = self._gpu(handle, "nvmlGpmSampleGet")
        if not gpu.model.gpm:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        with self._lock:
            self._gpm_samples[self._sample_key(sample)] = (gpu.index, self._clock(), self._util(gpu))
        return sample

    def gpm_profile(self, util: float) -> dict[int, float]:
        """GPM metric values (NVML units: percent, MiB/s) for a utilization level."""
        nvlink_mib = 450_000 * 0.25 * util  # H100: 450 GB/s each way at full rate
        return {
            pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: 100 * util,
            pynvml.NVML_GPM_METRIC_SM_UTIL: 100 * util * 0.9,
            pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 100 * util * 0.45,
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 100 * util * 0.6,
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 100 * util * 0.5,
            pynvml.NVML_GPM_METRIC_FP64_UTIL: 100 * util * 0.01,
            pynvml.NVML_GPM_METRIC_FP32_UTIL: 100 * util * 0.12,
            pynvml.NVML_GPM_METRIC_FP16_UTIL: 100 * util * 0.35,
            pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: 2000 * util,
            pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: 6000 * util,
            pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: nvlink_mib,
            pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: nvlink_mib,
        }

    def nvmlGpmMetricsGet(self, metrics_get: Any) -> Any:
        self._enter("nvmlGpmMetricsGet")
        if metrics_get.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise _err(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        with self._lock:
            i1, t1, u1 = self._gpm_samples[self._sample_key(metrics_get.sample1)]
            i2, t2, u2 = self._gpm_samples[self._sample_key(metrics_get.sample2)]
        if i1 < 0 or i1 != i2 or t2 <= t1:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._faults(self._gpus[i1], "nvmlGpmMetricsGet")
        profile = self.gpm_profile((u1 + u2) / 2)
        for i in range(metrics_get.numMetrics):
            m = metrics_get.metrics[i]
            if m.metricId in profile:
                m.value = profile[m.metricId]
                m.nvmlReturn = pynvml.NVML_SUCCESS
            else:
                m.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return metrics_get


def uuid_for(seed: int, index: int) -> str:
    """The UUID the simulator gives GPU ``index`` under ``seed`` (for tests and docs)."""
    return SimulatedNVML(gpus=index + 1, seed=seed)._gpus[index].uuid
