"""NVML GPM (GPU Performance Monitoring) metrics, Hopper and newer.

One table maps each GPM metric id to gpufleet's native name, dcgm-exporter's
``DCGM_FI_PROF_*`` name and the scale from NVML's unit (percent, MiB/s) to both
(ratio 0-1, bytes/s), so the two outputs cannot disagree.
"""

from __future__ import annotations

from typing import NamedTuple

import pynvml

MIB = 1024 * 1024


class GpmMetric(NamedTuple):
    native: str
    dcgm: str
    scale: float
    help: str


GPM_METRICS: dict[int, GpmMetric] = {
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: GpmMetric(
        "gpu_graphics_engine_active_ratio", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", 0.01,
        "Fraction of time the graphics/compute engine was active (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_SM_UTIL: GpmMetric(
        "gpu_sm_active_ratio", "DCGM_FI_PROF_SM_ACTIVE", 0.01,
        "Fraction of time at least one warp was resident on an SM, averaged over SMs (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: GpmMetric(
        "gpu_sm_occupancy_ratio", "DCGM_FI_PROF_SM_OCCUPANCY", 0.01,
        "Resident warps as a fraction of the maximum, averaged over SMs (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: GpmMetric(
        "gpu_tensor_active_ratio", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 0.01,
        "Fraction of cycles any tensor pipe was active (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: GpmMetric(
        "gpu_dram_active_ratio", "DCGM_FI_PROF_DRAM_ACTIVE", 0.01,
        "Fraction of cycles the HBM/DRAM interface was busy (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_FP64_UTIL: GpmMetric(
        "gpu_fp64_active_ratio", "DCGM_FI_PROF_PIPE_FP64_ACTIVE", 0.01,
        "Fraction of cycles the FP64 pipe was active (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_FP32_UTIL: GpmMetric(
        "gpu_fp32_active_ratio", "DCGM_FI_PROF_PIPE_FP32_ACTIVE", 0.01,
        "Fraction of cycles the FP32 pipe was active (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_FP16_UTIL: GpmMetric(
        "gpu_fp16_active_ratio", "DCGM_FI_PROF_PIPE_FP16_ACTIVE", 0.01,
        "Fraction of cycles the FP16 pipe was active (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: GpmMetric(
        "gpu_pcie_transmit_bytes_per_second", "DCGM_FI_PROF_PCIE_TX_BYTES", MIB,
        "PCIe bytes sent per second over the last interval (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: GpmMetric(
        "gpu_pcie_receive_bytes_per_second", "DCGM_FI_PROF_PCIE_RX_BYTES", MIB,
        "PCIe bytes received per second over the last interval (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: GpmMetric(
        "gpu_nvlink_transmit_bytes_per_second", "DCGM_FI_PROF_NVLINK_TX_BYTES", MIB,
        "NVLink bytes sent per second, all links (NVML GPM)."),
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: GpmMetric(
        "gpu_nvlink_receive_bytes_per_second", "DCGM_FI_PROF_NVLINK_RX_BYTES", MIB,
        "NVLink bytes received per second, all links (NVML GPM)."),
}
