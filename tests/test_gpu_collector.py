"""The GPU collector against the simulator: every metric family, values and labels."""

from __future__ import annotations

import logging

import pynvml
import pytest

from exporters.gpu import GpuCollector
from exporters.gpu_sim import MODELS, SimulatedNVML
from tests.conftest import scrape_collector, value, wait_for

H100 = MODELS["h100-sxm5-80gb"]


@pytest.fixture
def make(sim_state):
    made: list[GpuCollector] = []

    def _make(gpus: int = 8, model: str = "h100-sxm5-80gb", seed: int = 0, **kw) -> GpuCollector:
        sim = SimulatedNVML(gpus=gpus, model=model, seed=seed, state_file=str(sim_state.path), state_poll_interval=0)
        c = GpuCollector(sim, event_timeout_ms=20, **kw)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.close()


def test_info_series_carries_identity_and_driver(make):
    c = make()
    m = scrape_collector(c)
    infos = m["gpu_info"]
    assert len(infos) == 8
    lab, v = infos[3]
    assert v == 1
    uuid = c.nvml.nvmlDeviceGetUUID(c.nvml.nvmlDeviceGetHandleByIndex(3))
    assert lab == {
        "gpu": "3",
        "uuid": uuid,
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:5D:00.0",
        "serial": lab["serial"],
        "vbios_version": H100.vbios,
        "driver_version": "550.90.07",
        "cuda_driver_version": "12.4",
    }
    assert lab["serial"].isdigit()
    assert value(m, "gpu_devices") == 8
    assert "gpu_devices_expected" not in m


def test_expected_count_makes_a_missing_gpu_visible(make):
    c = make(gpus=7, expected_count=8)
    m = scrape_collector(c)
    assert value(m, "gpu_devices") == 7
    assert value(m, "gpu_devices_expected") == 8


def test_load_values_follow_the_state_file(make, sim_state):
    sim_state.gpu(2, utilization=0.97, memory_utilization=0.4, memory_used_bytes=40_000_000_000,
                  temperature_celsius=83, memory_temperature_celsius=85, power_watts=650, pstate=2)
    m = scrape_collector(make())
    g = {"gpu": "2"}
    assert value(m, "gpu_up", **g) == 1
    assert value(m, "gpu_utilization_ratio", **g) == pytest.approx(0.97)
    assert value(m, "gpu_memory_utilization_ratio", **g) == pytest.approx(0.40)
    assert value(m, "gpu_memory_used_bytes", **g) == 40_000_000_000
    assert value(m, "gpu_memory_total_bytes", **g) == H100.memory_total
    assert value(m, "gpu_memory_free_bytes", **g) == H100.memory_total - 40_000_000_000
    assert value(m, "gpu_temperature_celsius", **g) == 83
    assert value(m, "gpu_memory_temperature_celsius", **g) == 85
    assert value(m, "gpu_power_usage_watts", **g) == 650
    assert value(m, "gpu_power_limit_watts", **g) == 700
    assert value(m, "gpu_performance_state", **g) == 2
    assert value(m, "gpu_sm_clock_hertz", **g) == 1980e6
    assert value(m, "gpu_sm_clock_max_hertz", **g) == 1980e6
    assert value(m, "gpu_memory_clock_hertz", **g) == 2619e6
    assert value(m, "gpu_persistence_mode", **g) == 1
    assert value(m, "gpu_mig_mode", **g) == 0
    assert value(m, "gpu_temperature_threshold_celsius", threshold="slowdown", **g) == H100.temp_slowdown
    assert value(m, "gpu_temperature_threshold_celsius", threshold="shutdown", **g) == H100.temp_shutdown
    assert value(m, "gpu_temperature_threshold_celsius", threshold="memory_max", **g) == H100.temp_mem_max


def test_energy_counter_integrates_power(make, sim_state):
    now = [1000.0]
    sim_state.gpu(0, power_watts=500)
    c = make()
    c.nvml._clock = lambda: now[0]
    first = value(scrape_collector(c), "gpu_energy_consumption_joules_total", gpu="0")
    now[0] += 10
    second = value(scrape_collector(c), "gpu_energy_consumption_joules_total", gpu="0")
    assert second - first == pytest.approx(5000, rel=1e-6)  # 500 W for 10 s


def test_reliability_counters(make, sim_state):
    sim_state.gpu(1, ecc_uncorrected=2, ecc_corrected=10, ecc_uncorrected_aggregate_base=5,
                  remapped_rows_correctable=3, remapped_rows_uncorrectable=1, remap_pending=True,
                  pcie_replays=4, nvlink_down=[0, 5],
                  nvlink_errors={"0": {"crc_flit": 3, "crc_data": 2, "replay": 1, "recovery": 7}})
    m = scrape_collector(make())
    g = {"gpu": "1"}
    assert value(m, "gpu_ecc_errors_total", error_type="uncorrected", counter="volatile", **g) == 2
    assert value(m, "gpu_ecc_errors_total", error_type="uncorrected", counter="aggregate", **g) == 7
    assert value(m, "gpu_ecc_errors_total", error_type="corrected", counter="volatile", **g) == 10
    assert value(m, "gpu_remapped_rows_total", cause="correctable", **g) == 3
    assert value(m, "gpu_remapped_rows_total", cause="uncorrectable", **g) == 1
    assert value(m, "gpu_row_remap_pending", **g) == 1
    assert value(m, "gpu_row_remap_failed", **g) == 0
    assert value(m, "gpu_pcie_replay_errors_total", **g) == 4
    ups = {lab["link"]: v for lab, v in m["gpu_nvlink_up"] if lab["gpu"] == "1"}
    assert len(ups) == H100.nvlinks
    assert ups["0"] == 0 and ups["5"] == 0 and ups["1"] == 1
    assert value(m, "gpu_nvlink_errors_total", link="0", counter="crc_flit", **g) == 3
    assert value(m, "gpu_nvlink_errors_total", link="0", counter="crc_data", **g) == 2
    assert value(m, "gpu_nvlink_errors_total", link="0", counter="replay", **g) == 1
    assert value(m, "gpu_nvlink_errors_total", link="0", counter="recovery", **g) == 7
    assert value(m, "gpu_nvlink_errors_total", link="3", counter="crc_flit", **g) == 0
    # H100 remaps rows; it does not retire pages, so those series are absent, not zero.
    assert "gpu_retired_pages_total" not in m


def test_page_retirement_on_gpus_that_retire_pages(make, sim_state):
    sim_state.gpu(0, retired_pages_dbe=2, retired_pages_sbe=1, retired_pages_pending=True)
    m = scrape_collector(make(model="v100-sxm2-32gb"))
    assert value(m, "gpu_retired_pages_total", gpu="0", cause="double_bit_ecc") == 2
    assert value(m, "gpu_retired_pages_total", gpu="0", cause="single_bit_ecc") == 1
    assert value(m, "gpu_retired_pages_pending", gpu="0") == 1
    assert "gpu_row_remap_pending" not in m


def test_clock_event_reasons_are_decoded_one_series_each(make, sim_state):
    sim_state.gpu(4, clock_events=["hw_thermal_slowdown", "hw_power_brake"])
    m = scrape_collector(make())
    reasons = {lab["reason"]: v for lab, v in m["gpu_clock_event_active"] if lab["gpu"] == "4"}
    assert reasons["hw_thermal_slowdown"] == 1
    assert reasons["hw_power_brake"] == 1
    assert reasons["sw_power_cap"] == 0
    assert reasons["hw_slowdown"] == 0
    assert set(reasons) >= {"gpu_idle", "sw_thermal_slowdown", "sync_boost"}
    # The simulated clocks drop under a hardware slowdown, as real ones do.
    assert value(m, "gpu_sm_clock_hertz", gpu="4") < value(m, "gpu_sm_clock_hertz", gpu="3")


def test_recovery_action_is_one_hot(make, sim_state):
    sim_state.gpu(6, recovery_action="node_reboot")
    m = scrape_collector(make())
    actions = {lab["action"]: v for lab, v in m["gpu_recovery_action"] if lab["gpu"] == "6"}
    assert actions["node_reboot"] == 1
    assert sum(actions.values()) == 1
    assert value(m, "gpu_recovery_action", gpu="5", action="none") == 1


def test_fan_speed_reported_on_boards_with_fans(make):
    m = scrape_collector(make(model="l40s", gpus=2))
    assert 0 < value(m, "gpu_fan_speed_ratio", gpu="0") <= 1


def test_gpm_profiling_needs_two_samples_and_is_absent_where_unsupported(make, sim_state):
    sim_state.gpu(0, utilization=0.8)
    c = make()
    first = scrape_collector(c)
    assert "gpu_sm_active_ratio" not in first  # a rate needs two samples
    c.nvml._clock_offset = 0
    m = wait_for(lambda: (s := scrape_collector(c)) and "gpu_sm_active_ratio" in s and s)
    assert value(m, "gpu_sm_active_ratio", gpu="0") == pytest.approx(0.8 * 0.9)
    assert value(m, "gpu_tensor_active_ratio", gpu="0") == pytest.approx(0.8 * 0.6)
    assert value(m, "gpu_dram_active_ratio", gpu="0") == pytest.approx(0.8 * 0.5)
    assert value(m, "gpu_fp16_active_ratio", gpu="0") == pytest.approx(0.8 * 0.35)
    assert value(m, "gpu_nvlink_receive_bytes_per_second", gpu="0") == pytest.approx(
        450_000 * 0.25 * 0.8 * 1024 * 1024)
    for name in ("gpu_sm_occupancy_ratio", "gpu_fp64_active_ratio", "gpu_fp32_active_ratio",
                 "gpu_pcie_transmit_bytes_per_second", "gpu_nvlink_transmit_bytes_per_second"):
        assert len(m[name]) == 8
    # Samples are freed: only the latest one per GPU stays allocated.
    assert len(c.nvml._gpm_samples) == 8

    a100 = make(model="a100-sxm4-80gb", gpus=2)
    scrape_collector(a100)
    m = scrape_collector(a100)
    assert not [n for n in m if n.endswith("_active_ratio") or n.endswith("_bytes_per_second")]


def test_xid_events_count_per_code_with_class(make, sim_state):
    c = make()
    scrape_collector(c)
    wait_for(lambda: c._event_ok)
    sim_state.gpu(3, xid={"79": 1, "13": 2})
    wait_for(lambda: sum(c.xids.snapshot()[0].values()) == 3)
    m = scrape_collector(c)
    assert value(m, "gpu_xid_errors_total", gpu="3", xid="79", **{"class": "reboot"}) == 1
    assert value(m, "gpu_xid_errors_total", gpu="3", xid="13", **{"class": "app"}) == 2
    assert value(m, "gpu_xid_last_timestamp_seconds", gpu="3") > 1.7e9
    sim_state.gpu(3, xid={"79": 3, "13": 2})  # two more 79s: a counter, repeats are not hidden
    wait_for(lambda: sum(c.xids.snapshot()[0].values()) == 5)
    assert value(scrape_collector(c), "gpu_xid_errors_total", gpu="3", xid="79") == 3
    assert value(scrape_collector(c), "gpufleet_exporter_xid_source_up", source="nvml") == 1


def test_xid_from_kernel_log_maps_pci_address_to_gpu(make, tmp_path):
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(
        "6,1000,5000000,-;NVRM: loading NVIDIA UNIX x86_64 Kernel Module 550.90.07\n"
        "3,1001,6000000,-;NVRM: Xid (PCI:0000:5d:00): 79, pid=1234, name=python, GPU has fallen off the bus.\n"
    )
    c = make(xid_sources=("kmsg",), kmsg_path=str(kmsg))
    scrape_collector(c)  # learns PCI addresses
    m = wait_for(lambda: (s := scrape_collector(c)) and "gpu_xid_errors_total" in s and s)
    assert value(m, "gpu_xid_errors_total", gpu="3", xid="79", **{"class": "reboot"}) == 1
    with kmsg.open("a") as f:
        f.write("3,1002,7000000,-;NVRM: Xid (PCI:0000:18:00): 13, pid=99, Graphics Exception\n")
    m = wait_for(lambda: (s := scrape_collector(c)) and len(s.get("gpu_xid_errors_total", [])) == 2 and s)
    assert value(m, "gpu_xid_errors_total", gpu="0", xid="13") == 1
    assert value(m, "gpufleet_exporter_xid_source_up", source="kmsg") == 1


def test_both_xid_sources_count_each_event_once(make, sim_state, tmp_path):
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    c = make(xid_sources=("nvml", "kmsg"), kmsg_path=str(kmsg))
    scrape_collector(c)
    wait_for(lambda: c._event_ok)
    sim_state.gpu(3, xid={"79": 1})
    with kmsg.open("a") as f:
        f.write("3,1,1,-;NVRM: Xid (PCI:0000:5d:00): 79, pid=1, GPU has fallen off the bus.\n")
    wait_for(lambda: c.xids._counts.get("nvml") and c.xids._counts.get("kmsg")
             or (scrape_collector(c) and False))
    assert value(scrape_collector(c), "gpu_xid_errors_total", gpu="3", xid="79") == 1


def test_lost_gpu_reports_down_and_the_others_still_report(make, sim_state):
    c = make()
    scrape_collector(c)  # the agent knew the GPU before it fell off the bus
    sim_state.gpu(5, lost=True)
    m = scrape_collector(c)
    assert value(m, "gpu_up", gpu="5") == 0
    uuid = next(lab["uuid"] for lab, _ in m["gpu_up"] if lab["gpu"] == "5")
    assert uuid.startswith("GPU-")  # identity kept from before the loss
    assert not [lab for lab, _ in m["gpu_utilization_ratio"] if lab["gpu"] == "5"]
    assert len(m["gpu_utilization_ratio"]) == 7
    assert all(value(m, "gpu_up", gpu=str(i)) == 1 for i in range(8) if i != 5)
    sim_state.gpu(5, lost=False, reset_required=True)
    assert value(scrape_collector(c), "gpu_up", gpu="5") == 0
    sim_state.gpu(5, reset_required=False)
    assert value(scrape_collector(c), "gpu_up", gpu="5") == 1


def test_not_supported_is_omitted_and_logged_once(make, sim_state, caplog):
    sim_state.gpu(1, errors={"nvmlDeviceGetPowerUsage": "NOT_SUPPORTED"})
    c = make()
    with caplog.at_level(logging.INFO, logger="gpufleet.collector.gpu"):
        for _ in range(3):
            m = scrape_collector(c)
    assert not [lab for lab, _ in m["gpu_power_usage_watts"] if lab["gpu"] == "1"]
    assert len(m["gpu_power_usage_watts"]) == 7
    lines = [r for r in caplog.records if getattr(r, "function", "") == "nvmlDeviceGetPowerUsage"]
    assert len(lines) == 1 and lines[0].gpu == 1
    assert "gpufleet_exporter_nvml_errors_total" not in m  # NotSupported is not an error


def test_other_nvml_errors_are_counted_by_function(make, sim_state):
    sim_state.gpu(2, errors={"nvmlDeviceGetTemperature": "UNKNOWN"})
    c = make()
    scrape_collector(c)
    m = scrape_collector(c)
    assert value(m, "gpufleet_exporter_nvml_errors_total", function="nvmlDeviceGetTemperature",
                 error="Unknown") == 2
    assert len(m["gpu_temperature_celsius"]) == 7


def test_missing_nvml_library_fails_the_collector_clearly():
    # This machine has no libnvidia-ml.so.1: the real pynvml backend must explain that.
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("a real NVML library is present on this machine")
    except pynvml.NVMLError_LibraryNotFound:
        pass
    c = GpuCollector(pynvml)
    with pytest.raises(Exception, match="libnvidia-ml.so.1 not found"):
        c.collect()
    c.close()


def test_driver_unload_and_reload_reinitialises_nvml(make, sim_state):
    c = make()
    assert len(scrape_collector(c)["gpu_up"]) == 8
    wait_for(lambda: c._event_ok)
    sim_state.set(driver_loaded=False)
    with pytest.raises(Exception, match="NVML is not available"):
        c.collect()
    with pytest.raises(Exception, match="driver not loaded"):
        c.collect()
    sim_state.set(driver_loaded=True)
    m = scrape_collector(c)
    assert len(m["gpu_up"]) == 8 and all(v == 1 for _, v in m["gpu_up"])
    assert c._generation == 2
    # The Xid watcher re-registered on the new session.
    wait_for(lambda: c._event_ok and c.nvml._event_sets
             and all(es["generation"] == c.nvml._generation for es in c.nvml._event_sets.values()))
    sim_state.gpu(0, xid={"48": 1})
    wait_for(lambda: c.xids.snapshot()[0].get((0, 48)) == 1)


def test_unimplemented_functions_raise_function_not_found_like_old_drivers():
    sim = SimulatedNVML(gpus=1)
    sim.nvmlInit()
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        sim.nvmlDeviceGetBAR1MemoryInfo(sim.nvmlDeviceGetHandleByIndex(0))
    assert sim.NVML_ERROR_GPU_IS_LOST == 15
    assert sim.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert isinstance(sim.nvmlDeviceGetMemoryInfo(sim.nvmlDeviceGetHandleByIndex(0)), pynvml.c_nvmlMemory_t)


def test_hung_nvml_call_is_bounded_by_the_collector_timeout(make, sim_state):
    from exporters.collector import Agent, CollectorRunner
    from tests.conftest import parse

    c = make()
    runner = CollectorRunner(c, interval=1.0, timeout=0.3)
    agent = Agent([runner])
    runner.run_once()
    assert runner.state().success
    sim_state.gpu(2, hang=True)
    runner.run_once()  # returns after 0.3 s although GPU 2's call is still blocked
    st = runner.state()
    assert not st.success and "timed out" in st.last_error
    m = parse(agent.exposition())
    assert value(m, "gpufleet_exporter_collector_success", collector="gpu") == 0
    sim_state.gpu(2, hang=False)
    wait_for(lambda: not runner._worker.is_alive())
    runner.run_once()
    assert runner.state().success
    assert value(parse(agent.exposition()), "gpu_up", gpu="2") == 1


def test_every_gpm_family_matches_the_nvml_value_in_our_units(make, sim_state):
    from exporters.gpu_gpm import GPM_METRICS

    sim_state.gpu(7, utilization=0.6)
    c = make()
    scrape_collector(c)
    m = wait_for(lambda: (s := scrape_collector(c)) and "gpu_sm_active_ratio" in s and s)
    profile = c.nvml.gpm_profile(0.6)
    for metric_id, (name, _dcgm, scale, _help) in GPM_METRICS.items():
        assert value(m, name, gpu="7") == pytest.approx(profile[metric_id] * scale), name
        if name.endswith("_ratio"):
            assert 0 <= value(m, name, gpu="7") <= 1
