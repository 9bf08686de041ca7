"""dcgm-exporter compatible series (``--gpu.dcgm-compat``).

The names, units, types and labels follow released dcgm-exporter versions
(default-counters.csv and its label set: ``gpu``, ``UUID``, ``device``
``nvidiaN``, ``modelName``, ``pci_bus_id``, ``Hostname``), so NVIDIA's published
DCGM Grafana dashboard and DCGM alert rules work unchanged against gpufleet.
They are built from the same per-GPU sample as the native series, never from a
second set of NVML calls. Being dcgm-exporter's spelling, these names do not
follow Prometheus naming practice (no ``_total``, MiB, MHz); ``promtool check
metrics`` is run on the native output only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from exporters import gpu_xid
from exporters.collector import MetricSpec
from exporters.gpu_gpm import GPM_METRICS

if TYPE_CHECKING:
    from exporters.gpu import GpuSample

LABELS = ("gpu", "UUID", "device", "modelName", "pci_bus_id", "Hostname")
COND = "--gpu.dcgm-compat"
MIB = 1024 * 1024

# name -> (type, help, how to compute it from a GpuSample)
_FIELDS: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %)."),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("gauge", "Memory utilization (in %)."),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_FB_USED": ("gauge", "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_FB_TOTAL": ("gauge", "Framebuffer memory total (in MiB)."),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)."),
    "DCGM_FI_DEV_MEMORY_TEMP": ("gauge", "Memory temperature (in C)."),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": ("gauge", "Power management limit (in W)."),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("counter", "Total energy consumption since boot (in mJ)."),
    "DCGM_FI_DEV_SM_CLOCK": ("gauge", "SM clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEM_CLOCK": ("gauge", "Memory clock frequency (in MHz)."),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("counter", "Total number of PCIe retries."),
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": ("gauge", "Current clock throttle reasons (bitmask)."),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("counter", "Total number of single-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("counter", "Total number of double-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": ("counter", "Total number of single-bit persistent ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": ("counter", "Total number of double-bit persistent ECC errors."),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for correctable errors."),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for uncorrectable errors."),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("gauge", "Whether remapping of rows has failed."),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": ("gauge", "Whether remapping of rows is pending."),
    "DCGM_FI_DEV_RETIRED_SBE": ("counter", "Total number of retired pages due to single-bit errors."),
    "DCGM_FI_DEV_RETIRED_DBE": ("counter", "Total number of retired pages due to double-bit errors."),
    "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink flow-control CRC errors."),
    "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink data CRC errors."),
    "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink retries."),
    "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink recovery errors."),
}

SPECS: tuple[MetricSpec, ...] = (
    *(MetricSpec(n, t, h, LABELS, COND) for n, (t, h) in _FIELDS.items()),
    *(MetricSpec(m.dcgm, "gauge", m.help, LABELS, COND) for m in GPM_METRICS.values()),
    MetricSpec("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.",
               LABELS + ("err_code", "err_msg"), COND),
)

# native value key -> (DCGM name, scale)
_FROM_VALUES = {
    "gpu_utilization_ratio": ("DCGM_FI_DEV_GPU_UTIL", 100),
    "gpu_memory_utilization_ratio": ("DCGM_FI_DEV_MEM_COPY_UTIL", 100),
    "gpu_memory_free_bytes": ("DCGM_FI_DEV_FB_FREE", 1 / MIB),
    "gpu_memory_used_bytes": ("DCGM_FI_DEV_FB_USED", 1 / MIB),
    "gpu_memory_total_bytes": ("DCGM_FI_DEV_FB_TOTAL", 1 / MIB),
    "gpu_temperature_celsius": ("DCGM_FI_DEV_GPU_TEMP", 1),
    "gpu_memory_temperature_celsius": ("DCGM_FI_DEV_MEMORY_TEMP", 1),
    "gpu_power_usage_watts": ("DCGM_FI_DEV_POWER_USAGE", 1),
    "gpu_power_limit_watts": ("DCGM_FI_DEV_POWER_MGMT_LIMIT", 1),
    "gpu_energy_consumption_joules_total": ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1000),
    "gpu_sm_clock_hertz": ("DCGM_FI_DEV_SM_CLOCK", 1e-6),
    "gpu_memory_clock_hertz": ("DCGM_FI_DEV_MEM_CLOCK", 1e-6),
    "gpu_pcie_replay_errors_total": ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 1),
}
_ECC = {
    ("corrected", "volatile"): "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    ("uncorrected", "volatile"): "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    ("corrected", "aggregate"): "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    ("uncorrected", "aggregate"): "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
}
_NVLINK = {
    "crc_flit": "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
    "crc_data": "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
    "replay": "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
    "recovery": "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
}
def labels_for(s: GpuSample, hostname: str) -> tuple[str, ...]:
    return (
        str(s.index),
        s.uuid,
        f"nvidia{s.index}",
        s.info.get("name", ""),
        s.info.get("pci_bus_id", ""),
        hostname,
    )


def emit(b: Any, samples: Iterable[GpuSample], hostname: str, last_xid: Mapping[int, int]) -> None:
    """Add the DCGM-named series for every reachable GPU to the builder."""
    for s in samples:
        if not s.up:
            continue  # dcgm-exporter drops a GPU it cannot read
        lab = labels_for(s, hostname)
        for key, value in s.values.items():
            if key in _FROM_VALUES:
                name, scale = _FROM_VALUES[key]
                b.add(name, lab, value * scale)
        if s.clock_events is not None:
            b.add("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", lab, s.clock_events)
        for key, name in _ECC.items():
            if key in s.ecc:
                b.add(name, lab, s.ecc[key])
        if s.remapped is not None:
            corr, unc, pending, failed = s.remapped
            b.add("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", lab, corr)
            b.add("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", lab, unc)
            b.add("DCGM_FI_DEV_ROW_REMAP_FAILURE", lab, int(bool(failed)))
            b.add("DCGM_FI_DEV_ROW_REMAP_PENDING", lab, int(bool(pending)))
        if "single_bit_ecc" in s.retired:
            b.add("DCGM_FI_DEV_RETIRED_SBE", lab, s.retired["single_bit_ecc"])
        if "double_bit_ecc" in s.retired:
            b.add("DCGM_FI_DEV_RETIRED_DBE", lab, s.retired["double_bit_ecc"])
        if s.nvlink_errors:
            for cname, name in _NVLINK.items():
                b.add(name, lab, sum(n for (_, c), n in s.nvlink_errors.items() if c == cname))
        for metric_id, value in s.gpm.items():
            m = GPM_METRICS[metric_id]
            b.add(m.dcgm, lab, value * m.scale)
        code = last_xid.get(s.index, 0)
        b.add("DCGM_FI_DEV_XID_ERRORS", lab + (str(code), gpu_xid.describe(code) if code else ""), code)
