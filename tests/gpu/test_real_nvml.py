"""Hardware validation: the GPU collector against the real NVML on an NVIDIA GPU node.

Run on a GPU machine with ``tests/gpu/run.sh`` (or ``pytest -v tests/gpu``).
Without a GPU every test is skipped; ``GPUFLEET_GPU_TESTS_BACKEND=sim`` runs the
same tests against ``SimulatedNVML(gpus=8)`` to check the suite itself. What a
GPU supports is asked of NVML directly, so each check adapts to the part (no
fan on SXM boards, no GPM before Hopper, no NVLink on PCIe cards, ...).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml
import pytest

from exporters.collector import render
from exporters.gpu import NATIVE_SPECS, NVLINK_COUNTERS, TEMPERATURE_THRESHOLDS, GpuCollector
from exporters.gpu_gpm import GPM_METRICS
from exporters.gpu_sim import CLOCK_EVENT_BITS, RECOVERY_ACTIONS
from tests.conftest import parse, value, wait_for

pytestmark = pytest.mark.gpu

INTERVAL_ENV = "GPUFLEET_GPU_TESTS_INTERVAL"
NATIVE_NAMES = [s.name for s in NATIVE_SPECS]
# The device-count gauge (named gpu_devices since promtool reserves _count for histograms).
COUNT_METRIC = next(n for n in ("gpu_devices", "gpu_count") if n in NATIVE_NAMES)
COUNTERS = {s.name for s in NATIVE_SPECS if s.type == "counter"}
GPM_RATIOS = [m.native for m in GPM_METRICS.values() if m.native.endswith("_ratio")]
GPM_RATES = [m.native for m in GPM_METRICS.values() if m.native.endswith("_per_second")]
ARCH_NAMES = {v: k.removeprefix("NVML_DEVICE_ARCH_").lower()
              for k, v in vars(pynvml).items() if k.startswith("NVML_DEVICE_ARCH_") and isinstance(v, int)}
RETIREMENT_CAUSES = {
    "single_bit_ecc": pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    "double_bit_ecc": pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
}
ECC_KINDS = {
    ("corrected", "volatile"): (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
    ("corrected", "aggregate"): (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC),
    ("uncorrected", "volatile"): (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
    ("uncorrected", "aggregate"): (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC),
}

Samples = dict[str, list[tuple[dict[str, str], float]]]


# -- direct NVML calls -------------------------------------------------------------------
def call(fn: Callable[..., Any], *args: Any) -> Any:
    """An NVML call, None when it does not answer (not supported, invalid link, ...)."""
    try:
        v = fn(*args)
    except pynvml.NVMLError:
        return None
    return v.decode() if isinstance(v, bytes) else v


def answers(fn: Callable[..., Any], *args: Any, accept: Callable[[Any], bool] = lambda _v: True) -> bool:
    v = call(fn, *args)
    return v is not None and bool(accept(v))


def field_answers(nvml: Any, h: Any, field_id: int) -> bool:
    values = call(nvml.nvmlDeviceGetFieldValues, h, [field_id])
    return values is not None and values[0].nvmlReturn == pynvml.NVML_SUCCESS


@dataclass
class GpuFacts:
    index: int
    name: str
    uuid: str
    pci_bus_id: str
    architecture: int | None
    gpm_supported: bool
    mig_enabled: bool

    @property
    def hopper_or_newer(self) -> bool:
        a = self.architecture
        return a is not None and a != pynvml.NVML_DEVICE_ARCH_UNKNOWN and a >= pynvml.NVML_DEVICE_ARCH_HOPPER

    @property
    def expects_gpm(self) -> bool:
        # GPM is per GPU instance under MIG; the collector reads the whole GPU.
        return self.gpm_supported or (self.hopper_or_newer and not self.mig_enabled)


def expected_series(nvml: Any, h: Any) -> list[tuple[str, dict[str, str]]]:
    """Series (name, labels beyond gpu/uuid) the collector must emit because this GPU answers the call.

    NVLink, GPM and clock-event reasons have tests of their own.
    """
    n = nvml
    exp: list[tuple[str, dict[str, str]]] = []

    def want(ok: bool, *series: tuple[str, dict[str, str]]) -> None:
        if ok:
            exp.extend(series)

    want(answers(n.nvmlDeviceGetUtilizationRates, h),
         ("gpu_utilization_ratio", {}), ("gpu_memory_utilization_ratio", {}))
    want(answers(n.nvmlDeviceGetMemoryInfo, h),
         ("gpu_memory_used_bytes", {}), ("gpu_memory_free_bytes", {}), ("gpu_memory_total_bytes", {}))
    want(answers(n.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU), ("gpu_temperature_celsius", {}))
    for name, const in TEMPERATURE_THRESHOLDS.items():
        want(answers(n.nvmlDeviceGetTemperatureThreshold, h, const, accept=lambda t: t > 0),
             ("gpu_temperature_threshold_celsius", {"threshold": name}))
    want(field_answers(n, h, pynvml.NVML_FI_DEV_MEMORY_TEMP), ("gpu_memory_temperature_celsius", {}))
    want(answers(n.nvmlDeviceGetPowerUsage, h), ("gpu_power_usage_watts", {}))
    want(answers(n.nvmlDeviceGetEnforcedPowerLimit, h), ("gpu_power_limit_watts", {}))
    want(answers(n.nvmlDeviceGetTotalEnergyConsumption, h), ("gpu_energy_consumption_joules_total", {}))
    want(answers(n.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM), ("gpu_sm_clock_hertz", {}))
    want(answers(n.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM), ("gpu_memory_clock_hertz", {}))
    want(answers(n.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM), ("gpu_sm_clock_max_hertz", {}))
    want(answers(n.nvmlDeviceGetFanSpeed, h), ("gpu_fan_speed_ratio", {}))
    want(answers(n.nvmlDeviceGetPerformanceState, h, accept=lambda p: p != pynvml.NVML_PSTATE_UNKNOWN),
         ("gpu_performance_state", {}))
    want(answers(n.nvmlDeviceGetPersistenceMode, h), ("gpu_persistence_mode", {}))
    want(answers(n.nvmlDeviceGetMigMode, h), ("gpu_mig_mode", {}))
    for (etype, counter), args in ECC_KINDS.items():
        want(answers(n.nvmlDeviceGetTotalEccErrors, h, *args),
             ("gpu_ecc_errors_total", {"error_type": etype, "counter": counter}))
    want(answers(n.nvmlDeviceGetRemappedRows, h),
         ("gpu_remapped_rows_total", {"cause": "correctable"}), ("gpu_remapped_rows_total", {"cause": "uncorrectable"}),
         ("gpu_row_remap_pending", {}), ("gpu_row_remap_failed", {}))
    retired = False
    for cause, const in RETIREMENT_CAUSES.items():
        ok = answers(n.nvmlDeviceGetRetiredPages, h, const)
        retired |= ok
        want(ok, ("gpu_retired_pages_total", {"cause": cause}))
    want(retired and answers(n.nvmlDeviceGetRetiredPagesPendingStatus, h), ("gpu_retired_pages_pending", {}))
    want(answers(n.nvmlDeviceGetPcieReplayCounter, h), ("gpu_pcie_replay_errors_total", {}))
    want(field_answers(n, h, pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION),
         *(("gpu_recovery_action", {"action": a}) for a in RECOVERY_ACTIONS))
    return exp


# -- scraping ----------------------------------------------------------------------------
@dataclass
class Scrape:
    samples: Samples
    payload: bytes
    collect_ms: float
    render_ms: float
    at: float  # time.monotonic() when the collection finished


def scrape(collector: GpuCollector) -> Scrape:
    t0 = time.perf_counter()
    families = collector.collect()
    t1 = time.perf_counter()
    payload = render(families)
    t2 = time.perf_counter()
    return Scrape(parse(payload), payload, (t1 - t0) * 1e3, (t2 - t1) * 1e3, time.monotonic())


@dataclass
class Run:
    collector: GpuCollector
    scrapes: list[Scrape]
    interval: float

    @property
    def last(self) -> Samples:
        return self.scrapes[-1].samples

    @property
    def prev(self) -> Samples:
        return self.scrapes[-2].samples


def of_gpu(samples: Samples, name: str, gpu: int, **labels: str) -> list[tuple[dict[str, str], float]]:
    want = {"gpu": str(gpu), **labels}
    return [(lab, v) for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in want.items())]


def series_keys(samples: Samples) -> set[tuple[str, frozenset]]:
    return {(name, frozenset(lab.items())) for name, items in samples.items() for lab, _ in items}


@pytest.fixture(scope="session")
def facts(nvml: Any, handles: list[Any], gpu_report: dict[str, Any]) -> list[GpuFacts]:
    out = []
    for i, h in enumerate(handles):
        pci = call(nvml.nvmlDeviceGetPciInfo, h)
        bus = pci.busId if pci is not None else ""
        support = call(nvml.nvmlGpmQueryDeviceSupport, h)
        mig = call(nvml.nvmlDeviceGetMigMode, h)
        out.append(GpuFacts(
            index=i,
            name=call(nvml.nvmlDeviceGetName, h) or "",
            uuid=call(nvml.nvmlDeviceGetUUID, h) or "",
            pci_bus_id=bus.decode() if isinstance(bus, bytes) else bus,
            architecture=call(nvml.nvmlDeviceGetArchitecture, h),
            gpm_supported=bool(support is not None and support.isSupportedDevice),
            mig_enabled=bool(mig is not None and mig[0] == pynvml.NVML_DEVICE_MIG_ENABLE),
        ))
    cuda = call(nvml.nvmlSystemGetCudaDriverVersion)
    arch = {ARCH_NAMES.get(f.architecture, str(f.architecture)) for f in out if f.architecture is not None}
    gpu_report.update(
        gpu_count=len(out),
        gpu_models=sorted({f.name for f in out}),
        driver_version=call(nvml.nvmlSystemGetDriverVersion),
        cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
        nvml_version=call(nvml.nvmlSystemGetNVMLVersion),
        architecture=", ".join(sorted(arch)) or None,
        gpus=[{
            "index": f.index,
            "name": f.name,
            "uuid": f.uuid,
            "pci_bus_id": f.pci_bus_id,
            "architecture": ARCH_NAMES.get(f.architecture) if f.architecture is not None else None,
            "gpm_supported": f.gpm_supported,
            "mig_enabled": f.mig_enabled,
        } for f in out],
    )
    return out


@pytest.fixture(scope="module")
def run(nvml: Any, facts: list[GpuFacts], backend_name: str, gpu_report: dict[str, Any]):
    """Three collections a few seconds apart on one collector (GPM rates need two samples)."""
    interval = float(os.environ.get(INTERVAL_ENV) or (3.0 if backend_name == "nvml" else 0.5))
    collector = GpuCollector(nvml)
    try:
        scrapes = [scrape(collector)]
        for _ in range(2):
            time.sleep(interval)
            scrapes.append(scrape(collector))
        steady = [s.collect_ms for s in scrapes[1:]]
        gpu_report.update(
            interval_s=interval,
            timing={
                "collect_ms_first": round(scrapes[0].collect_ms, 2),
                "collect_ms_steady": [round(x, 2) for x in steady],
                "collect_ms_steady_mean": round(statistics.fmean(steady), 2),
                "collect_ms_steady_min": round(min(steady), 2),
                "collect_ms_steady_max": round(max(steady), 2),
                "render_ms": [round(s.render_ms, 3) for s in scrapes],
                "render_ms_mean": round(statistics.fmean(s.render_ms for s in scrapes), 3),
                "series": sum(len(v) for v in scrapes[-1].samples.values()),
                "payload_bytes": len(scrapes[-1].payload),
            },
            families_present=[n for n in NATIVE_NAMES if n in scrapes[-1].samples],
            families_absent=[n for n in NATIVE_NAMES if n not in scrapes[-1].samples],
        )
        yield Run(collector, scrapes, interval)
    finally:
        collector.close()


# -- identity and presence ---------------------------------------------------------------
def test_gpu_count_matches_nvml(run: Run, nvml: Any) -> None:
    count = nvml.nvmlDeviceGetCount()
    assert count > 0
    for s in run.scrapes:
        assert value(s.samples, COUNT_METRIC) == count


def test_gpu_info_identifies_every_gpu(run: Run, nvml: Any, facts: list[GpuFacts]) -> None:
    infos = {lab["gpu"]: (lab, v) for lab, v in run.last.get("gpu_info", [])}
    assert sorted(infos, key=int) == [str(f.index) for f in facts]
    assert len(run.last["gpu_info"]) == len(facts), "one gpu_info series per GPU"
    driver = call(nvml.nvmlSystemGetDriverVersion)
    for f in facts:
        lab, v = infos[str(f.index)]
        assert v == 1
        for key in ("uuid", "name", "pci_bus_id", "driver_version"):
            assert lab[key].strip(), f"gpu {f.index}: empty {key} in {lab}"
        assert lab["uuid"] == f.uuid and lab["uuid"].startswith(("GPU-", "MIG-"))
        assert lab["name"] == f.name
        assert lab["pci_bus_id"].lower() == f.pci_bus_id.lower()
        assert lab["driver_version"] == driver
    assert len({lab["uuid"] for lab, _ in infos.values()}) == len(facts), "UUIDs are unique"


def test_every_gpu_is_up(run: Run, facts: list[GpuFacts]) -> None:
    for s in run.scrapes:
        down = [f.index for f in facts if value(s.samples, "gpu_up", gpu=f.index) != 1]
        assert not down, f"gpu_up 0 on GPUs {down}"


def test_every_supported_family_is_present(run: Run, nvml: Any, handles: list[Any]) -> None:
    missing = []
    for i, h in enumerate(handles):
        for name, labels in expected_series(nvml, h):
            if not of_gpu(run.last, name, i, **labels):
                missing.append(f"gpu {i}: {name}{labels or ''}")
    assert not missing, "NVML answers but the collector emits nothing:\n" + "\n".join(missing)


def test_no_failed_nvml_calls(run: Run) -> None:
    errors = run.last.get("gpufleet_exporter_nvml_errors_total", [])
    assert not errors, f"NVML calls failed (other than NotSupported): {errors}"


# -- values ------------------------------------------------------------------------------
def test_utilization_ratios_in_range(run: Run) -> None:
    for s in run.scrapes:
        for name in ("gpu_utilization_ratio", "gpu_memory_utilization_ratio"):
            for lab, v in s.samples.get(name, []):
                assert 0.0 <= v <= 1.0, f"{name}{lab} = {v}"


def test_memory_accounting(run: Run, nvml: Any, handles: list[Any]) -> None:
    for i, h in enumerate(handles):
        mem = call(nvml.nvmlDeviceGetMemoryInfo, h)
        if mem is None:
            continue
        total = value(run.last, "gpu_memory_total_bytes", gpu=i)
        used = value(run.last, "gpu_memory_used_bytes", gpu=i)
        free = value(run.last, "gpu_memory_free_bytes", gpu=i)
        assert total == mem.total, f"gpu {i}: total {total!r} != NVML {mem.total}"
        assert used >= 0 and free >= 0
        assert used + free <= total, f"gpu {i}: used {used} + free {free} > total {total}"


def test_temperatures_plausible(run: Run) -> None:
    for s in run.scrapes:
        for name in ("gpu_temperature_celsius", "gpu_memory_temperature_celsius"):
            for lab, v in s.samples.get(name, []):
                assert 0 < v < 120, f"{name}{lab} = {v}"
    thresholds: dict[str, dict[str, float]] = {}
    for lab, v in run.last.get("gpu_temperature_threshold_celsius", []):
        assert 0 < v < 200, f"threshold {lab} = {v}"
        thresholds.setdefault(lab["gpu"], {})[lab["threshold"]] = v
    for gpu, t in thresholds.items():
        if "slowdown" in t and "shutdown" in t:
            assert t["slowdown"] <= t["shutdown"], f"gpu {gpu}: {t}"
        if "shutdown" in t:
            for _, temp in of_gpu(run.last, "gpu_temperature_celsius", int(gpu)):
                assert temp < t["shutdown"], f"gpu {gpu} at {temp} C, shutdown at {t['shutdown']} C"


def test_power_within_limit(run: Run, facts: list[GpuFacts]) -> None:
    for s in run.scrapes:
        for f in facts:
            power = of_gpu(s.samples, "gpu_power_usage_watts", f.index)
            limit = of_gpu(s.samples, "gpu_power_limit_watts", f.index)
            if limit:
                assert limit[0][1] > 0, f"gpu {f.index}: power limit {limit[0][1]} W"
            if power:
                p = power[0][1]
                assert p > 0, f"gpu {f.index}: power {p} W"
                if limit:
                    assert p <= limit[0][1] * 1.2, f"gpu {f.index}: {p} W over limit {limit[0][1]} W"


def test_energy_counter_increases_with_power(run: Run, facts: list[GpuFacts]) -> None:
    name = "gpu_energy_consumption_joules_total"
    if name not in run.last:
        pytest.skip("no GPU reports total energy consumption")
    s1, s2 = run.scrapes[-2:]
    dt = s2.at - s1.at
    for f in facts:
        e1, e2 = of_gpu(s1.samples, name, f.index), of_gpu(s2.samples, name, f.index)
        if not e1 or not e2:
            continue
        joules = e2[0][1] - e1[0][1]
        assert joules > 0, f"gpu {f.index}: energy counter did not increase in {dt:.1f}s ({e1} -> {e2})"
        limit = of_gpu(s2.samples, "gpu_power_limit_watts", f.index)
        if limit:
            # joules, not millijoules: the average power over the interval is below the limit
            avg = joules / dt
            assert avg <= limit[0][1] * 1.5, f"gpu {f.index}: {joules:.1f} J in {dt:.1f}s = {avg:.0f} W"


def test_clocks_positive(run: Run) -> None:
    for s in run.scrapes:
        for name in ("gpu_sm_clock_hertz", "gpu_memory_clock_hertz", "gpu_sm_clock_max_hertz"):
            for lab, v in s.samples.get(name, []):
                # hertz, not megahertz: between 10 MHz and 10 GHz
                assert 1e7 <= v <= 1e10, f"{name}{lab} = {v}"
        for lab, v in s.samples.get("gpu_sm_clock_hertz", []):
            for _, vmax in of_gpu(s.samples, "gpu_sm_clock_max_hertz", int(lab["gpu"])):
                assert v <= vmax * 1.01, f"gpu {lab['gpu']}: SM clock {v} above max {vmax}"


def test_reliability_counters_and_flags(run: Run) -> None:
    m = run.last
    for name in ("gpu_ecc_errors_total", "gpu_remapped_rows_total", "gpu_retired_pages_total",
                 "gpu_pcie_replay_errors_total", "gpu_nvlink_errors_total"):
        for lab, v in m.get(name, []):
            assert v >= 0 and math.isfinite(v) and v == int(v), f"{name}{lab} = {v}"
    for lab, _ in m.get("gpu_ecc_errors_total", []):
        assert lab["error_type"] in ("corrected", "uncorrected") and lab["counter"] in ("volatile", "aggregate")
    for name in ("gpu_row_remap_pending", "gpu_row_remap_failed", "gpu_retired_pages_pending",
                 "gpu_persistence_mode", "gpu_mig_mode", "gpu_nvlink_up"):
        for lab, v in m.get(name, []):
            assert v in (0, 1), f"{name}{lab} = {v}"
    for lab, v in m.get("gpu_performance_state", []):
        assert v in range(16), f"P-state {lab} = {v}"
    for lab, v in m.get("gpu_fan_speed_ratio", []):
        assert v >= 0, f"fan {lab} = {v}"


def test_recovery_action_names_one_current_action(run: Run, facts: list[GpuFacts]) -> None:
    if "gpu_recovery_action" not in run.last:
        pytest.skip("the driver does not report NVML_FI_DEV_GET_GPU_RECOVERY_ACTION")
    for f in facts:
        series = of_gpu(run.last, "gpu_recovery_action", f.index)
        if not series:
            continue
        assert {lab["action"] for lab, _ in series} >= set(RECOVERY_ACTIONS)
        assert sorted(v for _, v in series) == [0] * (len(series) - 1) + [1], f"gpu {f.index}: {series}"


def test_gpm_families_on_hopper_and_newer(run: Run, facts: list[GpuFacts]) -> None:
    gpm_gpus = [f for f in facts if f.expects_gpm]
    if not gpm_gpus:
        archs = sorted({ARCH_NAMES.get(f.architecture, str(f.architecture)) for f in facts})
        pytest.skip(f"no GPU with NVML GPM (Hopper or newer, MIG off); architectures: {archs}")
    problems = []
    for s in run.scrapes[1:]:  # a rate needs two samples: present from the second collection on
        for f in gpm_gpus:
            for name in GPM_RATIOS:
                got = of_gpu(s.samples, name, f.index)
                if len(got) != 1:
                    problems.append(f"gpu {f.index} ({f.name}): {len(got)} {name} series")
                elif not 0.0 <= got[0][1] <= 1.0:
                    problems.append(f"gpu {f.index}: {name} = {got[0][1]}")
            for name in GPM_RATES:
                for _, v in of_gpu(s.samples, name, f.index):
                    if not (v >= 0 and math.isfinite(v)):
                        problems.append(f"gpu {f.index}: {name} = {v}")
    assert not problems, "\n".join(problems)


def test_nvlink_series_where_links_answer(run: Run, nvml: Any, handles: list[Any]) -> None:
    problems, links_seen = [], 0
    for i, h in enumerate(handles):
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            state = call(nvml.nvmlDeviceGetNvLinkState, h, link)
            up = of_gpu(run.last, "gpu_nvlink_up", i, link=str(link))
            if state is None:
                if up:
                    problems.append(f"gpu {i} link {link}: NVML does not answer but gpu_nvlink_up is {up}")
                continue
            links_seen += 1
            want = int(state == pynvml.NVML_FEATURE_ENABLED)
            if len(up) != 1 or up[0][1] != want:
                problems.append(f"gpu {i} link {link}: NVML state {state}, gpu_nvlink_up series {up}")
            for cname, const in NVLINK_COUNTERS.items():
                if call(nvml.nvmlDeviceGetNvLinkErrorCounter, h, link, const) is None:
                    continue
                errs = of_gpu(run.last, "gpu_nvlink_errors_total", i, link=str(link), counter=cname)
                if len(errs) != 1 or errs[0][1] < 0:
                    problems.append(f"gpu {i} link {link}: gpu_nvlink_errors_total{{counter={cname}}} {errs}")
    assert not problems, "\n".join(problems)
    if not links_seen:
        assert "gpu_nvlink_up" not in run.last
        pytest.skip("no NVLink: nvmlDeviceGetNvLinkState answers on no link")


def test_clock_event_reasons_one_series_per_reason(run: Run, nvml: Any, handles: list[Any]) -> None:
    for i, h in enumerate(handles):
        series = of_gpu(run.last, "gpu_clock_event_active", i)
        if call(nvml.nvmlDeviceGetCurrentClocksEventReasons, h) is None:
            assert not series, f"gpu {i}: NVML reports no clock-event reasons, collector emits {series}"
            continue
        reasons = [lab["reason"] for lab, _ in series]
        assert sorted(reasons) == sorted(CLOCK_EVENT_BITS), f"gpu {i}: reasons {reasons}"
        assert all(v in (0, 1) for _, v in series), f"gpu {i}: {series}"


# -- stability ---------------------------------------------------------------------------
def test_series_stable_between_scrapes(run: Run) -> None:
    a, b = series_keys(run.prev), series_keys(run.last)
    gone = sorted((n, dict(lab)) for n, lab in a - b)
    new = sorted((n, dict(lab)) for n, lab in b - a)
    assert not gone and not new, (f"series changed between scrapes {run.interval:g}s apart:\n"
                                  f"gone: {gone[:20]}\nnew: {new[:20]}")


def test_counters_never_decrease(run: Run) -> None:
    decreased = []
    for before, after in zip(run.scrapes, run.scrapes[1:], strict=False):
        for name in COUNTERS:
            old = {frozenset(lab.items()): v for lab, v in before.samples.get(name, [])}
            for lab, v in after.samples.get(name, []):
                prev = old.get(frozenset(lab.items()))
                if prev is not None and v < prev:
                    decreased.append(f"{name}{lab}: {prev} -> {v}")
    assert not decreased, "\n".join(decreased)


# -- Xid events --------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_xid_event_thread_registers_on_every_gpu(nvml: Any, facts: list[GpuFacts]) -> None:
    logger = logging.getLogger("gpufleet.tests.gpu.xid")
    logger.setLevel(logging.DEBUG)
    records = _Records()
    logger.addHandler(records)
    collector = GpuCollector(nvml, logger=logger)
    try:
        collector.collect()
        wait_for(lambda: collector._event_ok, timeout=10.0)
        m = parse(render(collector.collect()))
        assert value(m, "gpufleet_exporter_xid_source_up", source="nvml") == 1
        assert collector._event_error is None
        assert "Xid events: ok" in collector.status()
        listening = [r for r in records.records if r.getMessage() == "listening for NVML Xid events"]
        assert listening and listening[-1].gpus == len(facts), "registered for Xid events on every GPU"
        refused = [r for r in records.records if "cannot register for Xid events" in r.getMessage()]
        assert not refused, [getattr(r, "error", "") for r in refused]
    finally:
        collector.close()
        logger.removeHandler(records)


# -- exposition --------------------------------------------------------------------------
def test_promtool_check_metrics_is_silent(run: Run) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    proc = subprocess.run([promtool, "check", "metrics"], input=run.scrapes[-1].payload,
                          capture_output=True, timeout=60, check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0 and not out.strip(), f"promtool check metrics (rc {proc.returncode}):\n{out}"


def test_collection_timing_is_reported(run: Run, gpu_report: dict[str, Any]) -> None:
    """Not a limit: prints what this machine takes, for docs/hardware-validation.md."""
    t = gpu_report["timing"]
    print(f"\n{gpu_report['gpu_count']} x {', '.join(gpu_report['gpu_models'])}, driver "
          f"{gpu_report['driver_version']}, CUDA {gpu_report['cuda_driver_version']}: "
          f"collect first {t['collect_ms_first']} ms, steady {t['collect_ms_steady']} ms, "
          f"render {t['render_ms']} ms, {t['series']} series")
    assert t["series"] > 0 and gpu_report["families_present"]
