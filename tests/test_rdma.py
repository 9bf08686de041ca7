"""The RDMA collector against real sysfs captures and hand-written trees: values, labels, failures."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporters import rdma
from exporters.collector import render
from exporters.rdma import HW_COUNTERS, PMA_COUNTERS, SPECS, RdmaCollector, parse_rate
from tests.conftest import SHARED_FIXTURES, need_binary, parse, value

REAL_SYSFS = SHARED_FIXTURES / "procfs" / "sys"
REAL_IB = REAL_SYSFS / "class" / "infiniband"
OURS_SYSFS = Path(__file__).resolve().parent / "fixtures" / "rdma" / "sys"
OURS_IB = OURS_SYSFS / "class" / "infiniband"

need_real = pytest.mark.skipif(
    not REAL_IB.is_dir(), reason=f"shared real-machine captures not found at {REAL_IB} (see /work/shared/fixtures)"
)


def scrape(sysfs: Path | str, **kw) -> dict:
    return parse(render(RdmaCollector(str(sysfs), **kw).collect()))


def read_int(path: Path) -> int:
    return int(path.read_text().strip())


def names_with(samples: dict, device: str) -> set[str]:
    return {name for name, rows in samples.items() if any(lab.get("device") == device for lab, _ in rows)}


def copy_tree(tmp_path: Path, src: Path = OURS_SYSFS) -> Path:
    dst = tmp_path / "sys"
    shutil.copytree(src, dst)
    return dst


# -- real captures (prometheus/procfs test data) ------------------------------------------------------


@need_real
def test_real_captures_device_info_labels_with_empty_label_for_missing_files():
    m = scrape(REAL_SYSFS)
    infos = {lab["device"]: lab for lab, v in m["rdma_device_info"] if v == 1}
    assert set(infos) == {"hfi1_0", "mlx4_0", "mlx5_0"}
    assert infos["mlx5_0"] == {
        "device": "mlx5_0", "board_id": "SM_2001000001034", "fw_ver": "14.28.2006", "hca_type": "MT4118",
        # the capture's node_guid carries a ttar artifact ("EOF"); the collector reports what the file says
        "node_guid": (REAL_IB / "mlx5_0" / "node_guid").read_text().strip(),
    }
    assert infos["mlx4_0"] == {"device": "mlx4_0", "board_id": "SM_1141000001000", "fw_ver": "2.31.5050",
                               "hca_type": "MT4099", "node_guid": ""}
    assert infos["hfi1_0"] == {
        "device": "hfi1_0",
        "board_id": "HPE 100Gb 1-port OP101 QSFP28 x16 PCIe Gen3 with Intel Omni-Path Adapter",
        "fw_ver": "1.27.0", "hca_type": "", "node_guid": "",
    }


@need_real
def test_real_captures_port_state_rate_and_link_layer():
    m = scrape(REAL_SYSFS)
    ports = {(lab["device"], lab["port"]) for lab, _ in m["rdma_port_info"]}
    assert ports == {("hfi1_0", "1"), ("mlx4_0", "1"), ("mlx4_0", "2"), ("mlx5_0", "1")}
    # mlx4_0 port 2's link_layer ends in a blank line
    for dev, port in ports:
        assert value(m, "rdma_port_info", device=dev, port=port, link_layer="InfiniBand", netdev="") == 1
        assert value(m, "rdma_port_state", device=dev, port=port) == 4
    assert value(m, "rdma_port_physical_state", device="mlx4_0", port="2") == 5
    assert value(m, "rdma_port_state_info", device="hfi1_0", port="1", state="ACTIVE", physical_state="LinkUp") == 1
    # this capture's mlx5 phys_state reads "4: ACTIVE": reported as written
    assert value(m, "rdma_port_physical_state", device="mlx5_0", port="1") == 4
    assert value(m, "rdma_port_state_info", device="mlx5_0", port="1", state="ACTIVE", physical_state="ACTIVE") == 1
    rate = {(lab["device"], lab["port"]): v for lab, v in m["rdma_port_rate_bytes_per_second"]}
    assert rate == {("hfi1_0", "1"): 12.5e9, ("mlx4_0", "1"): 5e9, ("mlx4_0", "2"): 5e9, ("mlx5_0", "1"): 3.125e9}
    assert {v for _, v in m["rdma_port_state_changes_total"]} == {0}
    assert {lab["device"]: v for lab, v in m["gpufleet_exporter_rdma_read_errors_total"]} == {
        "hfi1_0": 0, "mlx4_0": 0, "mlx5_0": 0}


@need_real
@pytest.mark.parametrize(("device", "port"), [("mlx5_0", "1"), ("mlx4_0", "1"), ("mlx4_0", "2"), ("hfi1_0", "1")])
def test_real_captures_pma_counters_exact(device, port):
    m = scrape(REAL_SYSFS)
    cdir = REAL_IB / device / "ports" / port / "counters"
    lab = {"device": device, "port": port}
    assert value(m, "rdma_port_transmit_bytes_total", **lab) == read_int(cdir / "port_xmit_data") * 4
    assert value(m, "rdma_port_receive_bytes_total", **lab) == read_int(cdir / "port_rcv_data") * 4
    assert value(m, "rdma_port_transmit_packets_total", **lab) == read_int(cdir / "port_xmit_packets")
    assert value(m, "rdma_port_receive_packets_total", **lab) == read_int(cdir / "port_rcv_packets")
    files = {p.name for p in cdir.iterdir()}
    for f, (metric, scale) in PMA_COUNTERS.items():
        if f in files:
            assert value(m, metric, **lab) == read_int(cdir / f) * scale, f
        else:
            assert not [v for lb, v in m.get(metric, []) if lb == lab], f"{metric} without {f}"


@need_real
def test_real_captures_known_numbers():
    m = scrape(REAL_SYSFS)
    assert value(m, "rdma_port_transmit_bytes_total", device="mlx5_0", port="1") == 2880761508848 * 4
    assert value(m, "rdma_port_receive_bytes_total", device="hfi1_0", port="1") == 345091702026 * 4
    assert value(m, "rdma_port_transmit_wait_ticks_total", device="mlx4_0", port="1") == 3599
    assert value(m, "rdma_port_transmit_wait_ticks_total", device="mlx4_0", port="2") == 3846
    assert value(m, "rdma_port_transmit_unicast_packets_total", device="mlx5_0", port="1") == 10907922116
    assert value(m, "rdma_port_receive_multicast_packets_total", device="mlx5_0", port="1") == 0
    assert "rdma_port_transmit_unicast_packets_total" not in names_with(m, "mlx4_0")


@need_real
def test_real_captures_hw_counters_named_and_generic():
    m = scrape(REAL_SYSFS)
    lab = {"device": "mlx5_0", "port": "1"}
    assert value(m, "rdma_port_retransmissions_total", **lab) == 99
    assert value(m, "rdma_port_local_ack_timeouts_total", **lab) == 131
    assert value(m, "rdma_port_out_of_sequence_packets_total", **lab) == 1
    assert value(m, "rdma_port_packet_sequence_errors_total", **lab) == 1
    assert value(m, "rdma_port_rnr_nak_retry_errors_total", **lab) == 0
    assert value(m, "rdma_port_out_of_buffer_drops_total", **lab) == 0
    hdir = REAL_IB / "mlx5_0" / "ports" / "1" / "hw_counters"
    expected = {p.name: read_int(p) for p in hdir.iterdir() if p.name not in HW_COUNTERS and p.name != "lifespan"}
    generic = {lb["counter"]: v for lb, v in m["rdma_port_hw_events_total"] if lb["device"] == "mlx5_0"}
    assert generic == expected
    assert generic["rx_read_requests"] == 175528982
    assert "lifespan" not in generic  # a cache setting, not a counter
    # mlx4 and OPA have no hw_counters: no named series invented
    assert "rdma_port_retransmissions_total" not in names_with(m, "hfi1_0")
    assert "rdma_port_hw_events_total" not in names_with(m, "mlx4_0")


# -- hand-written trees ---------------------------------------------------------------------------------


def test_roce_port_netdev_rate_and_congestion_counters():
    m = scrape(OURS_SYSFS)
    lab = {"device": "mlx5_4", "port": "1"}
    assert value(m, "rdma_port_info", link_layer="Ethernet", netdev="ens1f0np0", **lab) == 1
    assert value(m, "rdma_port_rate_bytes_per_second", **lab) == 25e9
    assert value(m, "rdma_port_cnp_sent_total", **lab) == 18342
    assert value(m, "rdma_port_cnp_handled_total", **lab) == 16230
    assert value(m, "rdma_port_ecn_marked_packets_total", **lab) == 20411
    assert value(m, "rdma_port_out_of_sequence_packets_total", **lab) == 12
    assert value(m, "rdma_port_packet_sequence_errors_total", **lab) == 7
    assert value(m, "rdma_port_local_ack_timeouts_total", **lab) == 3
    assert value(m, "rdma_port_rnr_nak_retry_errors_total", **lab) == 1
    assert value(m, "rdma_port_retransmissions_total", **lab) == 45
    assert value(m, "rdma_port_out_of_buffer_drops_total", **lab) == 88
    generic = {lb["counter"]: v for lb, v in m["rdma_port_hw_events_total"] if lb["device"] == "mlx5_4"}
    assert generic == {"rp_cnp_ignored": 5, "roce_adp_retrans_to": 2, "rx_icrc_encapsulated": 0,
                       "duplicate_request": 9}
    assert value(m, "rdma_port_transmit_bytes_total", **lab) == 52428800000 * 4
    assert value(m, "rdma_port_symbol_errors_total", **lab) == 3
    assert value(m, "rdma_port_link_downed_total", **lab) == 2
    assert value(m, "rdma_port_transmit_wait_ticks_total", **lab) == 777
    assert value(m, "rdma_port_transmit_multicast_packets_total", **lab) == 1000


def test_ndr_infiniband_port_rate_ipoib_netdev_and_64_bit_values():
    m = scrape(OURS_SYSFS)
    lab = {"device": "mlx5_8", "port": "1"}
    assert value(m, "rdma_device_info", device="mlx5_8", hca_type="MT4129", fw_ver="28.39.1002") == 1
    assert value(m, "rdma_port_info", link_layer="InfiniBand", netdev="ibp65s0", **lab) == 1
    assert value(m, "rdma_port_rate_bytes_per_second", **lab) == 50e9
    assert value(m, "rdma_port_transmit_bytes_total", **lab) == 1125899906842 * 4
    assert value(m, "rdma_port_receive_bytes_total", **lab) == 2251799813685 * 4
    assert value(m, "rdma_port_receive_packets_total", **lab) == 562949953421
    assert value(m, "rdma_port_transmit_wait_ticks_total", **lab) == 123456789012
    assert value(m, "rdma_port_receive_errors_total", **lab) == 17


def test_no_pma_counters_are_left_out_without_errors(caplog):
    caplog.set_level(logging.DEBUG, logger="gpufleet.collector.rdma")
    m = scrape(OURS_SYSFS)
    lab = {"device": "rxe0", "port": "1"}
    present = names_with(m, "rxe0")
    for metric, _ in PMA_COUNTERS.values():
        assert metric not in present, metric
    assert value(m, "rdma_port_info", link_layer="Ethernet", netdev="eth0", **lab) == 1
    assert value(m, "rdma_port_rate_bytes_per_second", **lab) == 312.5e6
    assert value(m, "rdma_port_state", **lab) == 4
    assert value(m, "rdma_port_hw_events_total", counter="sent_pkts", **lab) == 1200
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="rxe0") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_counters_ext_64_bit_values_win_over_saturated_32_bit_ones():
    m = scrape(OURS_SYSFS)
    p1 = {"device": "mlx4_1", "port": "1"}
    assert value(m, "rdma_port_transmit_bytes_total", **p1) == 1234567890123 * 4
    assert value(m, "rdma_port_receive_bytes_total", **p1) == 2345678901234 * 4
    assert value(m, "rdma_port_transmit_packets_total", **p1) == 98765432101
    # port_rcv_packets_64 reads N/A: the 32-bit counter is the best there is
    assert value(m, "rdma_port_receive_packets_total", **p1) == 3000000000
    assert value(m, "rdma_port_transmit_unicast_packets_total", **p1) == 98765432000
    assert value(m, "rdma_port_receive_unicast_packets_total", **p1) == 87654321000
    assert value(m, "rdma_port_transmit_multicast_packets_total", **p1) == 101
    assert value(m, "rdma_port_receive_multicast_packets_total", **p1) == 202
    # port 2 has no counters_ext: the (saturated) 32-bit values
    p2 = {"device": "mlx4_1", "port": "2"}
    assert value(m, "rdma_port_transmit_bytes_total", **p2) == 4294967295 * 4
    assert value(m, "rdma_port_transmit_packets_total", **p2) == 4294967295
    # one netdev per port, mapped by dev_port
    assert value(m, "rdma_port_info", link_layer="InfiniBand", netdev="ib0", **p1) == 1
    assert value(m, "rdma_port_info", link_layer="Ethernet", netdev="eth1", **p2) == 1
    assert value(m, "rdma_port_rate_bytes_per_second", **p1) == 7e9
    assert value(m, "rdma_port_rate_bytes_per_second", **p2) == 1.25e9
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx4_1") == 0


def test_device_without_ports_reports_only_its_identity():
    m = scrape(OURS_SYSFS)
    assert value(m, "rdma_device_info", device="mlx5_9", hca_type="MT4130") == 1
    assert names_with(m, "mlx5_9") == {"rdma_device_info", "gpufleet_exporter_rdma_read_errors_total"}
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_9") == 0


def test_iwarp_device_has_no_pma_counters_and_generic_hw_counters():
    m = scrape(OURS_SYSFS)
    lab = {"device": "cxgb4_0", "port": "1"}
    assert value(m, "rdma_device_info", device="cxgb4_0", board_id="", hca_type="T62100-LP-CR") == 1
    assert value(m, "rdma_port_info", link_layer="Ethernet", netdev="enp3s0f4", **lab) == 1
    assert value(m, "rdma_port_hw_events_total", counter="tcpRetransSegs", **lab) == 321
    assert value(m, "rdma_port_hw_events_total", counter="ip4InSegs", **lab) == 5551234
    assert "rdma_port_transmit_bytes_total" not in names_with(m, "cxgb4_0")
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="cxgb4_0") == 0


def test_gid_netdev_wins_over_device_net(tmp_path):
    sysfs = copy_tree(tmp_path)
    net = sysfs / "class/infiniband/mlx5_4/device/net"
    shutil.rmtree(net / "ens1f0np0")
    (net / "other0").mkdir()
    m = scrape(sysfs, device_include="mlx5_4")
    assert value(m, "rdma_port_info", device="mlx5_4", port="1", netdev="ens1f0np0") == 1
    shutil.rmtree(sysfs / "class/infiniband/mlx5_4/ports/1/gid_attrs")
    m = scrape(sysfs, device_include="mlx5_4")
    assert value(m, "rdma_port_info", device="mlx5_4", port="1", netdev="other0") == 1


def test_missing_infiniband_directory_is_no_devices_not_a_failure(tmp_path):
    assert RdmaCollector(str(tmp_path)).collect() == []


# -- unreadable and garbled files -----------------------------------------------------------------------


def test_unreadable_files_drop_only_their_series_are_counted_and_logged_once(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="gpufleet.collector.rdma")
    broken = {
        "mlx5_4/ports/1/counters/symbol_error": errno.EINVAL,
        "mlx5_4/ports/1/hw_counters/np_cnp_sent": errno.EPERM,
        "mlx5_4/ports/1/rate": errno.EIO,
        "mlx5_4/fw_ver": errno.EACCES,
        "mlx5_8/ports/1/state": errno.EINVAL,
    }
    real_read = rdma._read_file

    def flaky(path: str) -> str:
        for suffix, err in broken.items():
            if path.endswith(suffix):
                raise OSError(err, "simulated")
        return real_read(path)

    monkeypatch.setattr(rdma, "_read_file", flaky)
    c = RdmaCollector(str(OURS_SYSFS))
    m = parse(render(c.collect()))  # raises -> test fails
    lab = {"device": "mlx5_4", "port": "1"}
    assert "rdma_port_symbol_errors_total" not in names_with(m, "mlx5_4")
    assert "rdma_port_cnp_sent_total" not in names_with(m, "mlx5_4")
    assert "rdma_port_rate_bytes_per_second" not in names_with(m, "mlx5_4")
    assert value(m, "rdma_device_info", device="mlx5_4", fw_ver="", hca_type="MT4125") == 1
    # neighbours of the bad files still report
    assert value(m, "rdma_port_link_downed_total", **lab) == 2
    assert value(m, "rdma_port_cnp_handled_total", **lab) == 16230
    assert value(m, "rdma_port_state", **lab) == 4
    assert "rdma_port_state" not in names_with(m, "mlx5_8")
    assert value(m, "rdma_port_state_info", device="mlx5_8", port="1", state="", physical_state="LinkUp") == 1
    assert value(m, "rdma_port_rate_bytes_per_second", device="mlx5_8", port="1") == 50e9
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 4
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_8") == 1
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="rxe0") == 0

    m = parse(render(c.collect()))
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(broken)  # once per (file, error), not per collection
    assert {r.error for r in warnings} == {"EINVAL", "EPERM", "EIO", "EACCES"}


def test_directory_where_a_file_is_expected_and_garbage_values(tmp_path):
    sysfs = copy_tree(tmp_path)
    port = sysfs / "class/infiniband/mlx5_8/ports/1"
    (port / "counters/port_xmit_data").unlink()
    (port / "counters/port_xmit_data").mkdir()  # EISDIR on read
    (port / "hw_counters/req_cqe_error").unlink()
    (port / "hw_counters/req_cqe_error").mkdir()
    (port / "counters/port_rcv_errors").write_text("lots\n")
    (port / "phys_state").write_text("LinkUp\n")  # no id
    (port / "rate").write_text("fast\n")
    m = scrape(sysfs)
    lab = {"device": "mlx5_8", "port": "1"}
    present = names_with(m, "mlx5_8")
    for gone in ("rdma_port_transmit_bytes_total", "rdma_port_receive_errors_total",
                 "rdma_port_physical_state", "rdma_port_rate_bytes_per_second", "rdma_port_hw_events_total"):
        assert gone not in present, gone
    assert value(m, "rdma_port_receive_bytes_total", **lab) == 2251799813685 * 4
    assert value(m, "rdma_port_local_ack_timeouts_total", **lab) == 4
    assert value(m, "rdma_port_state_info", state="ACTIVE", physical_state="", **lab) == 1
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_8") == 5
    assert value(m, "rdma_port_cnp_sent_total", device="mlx5_4", port="1") == 18342


def test_unreadable_ports_directory_keeps_the_device(tmp_path):
    sysfs = copy_tree(tmp_path)
    ports = sysfs / "class/infiniband/mlx5_8/ports"
    shutil.rmtree(ports)
    ports.write_text("")  # ENOTDIR on listing
    m = scrape(sysfs)
    assert names_with(m, "mlx5_8") == {"rdma_device_info", "gpufleet_exporter_rdma_read_errors_total"}
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_8") == 1


# -- rate strings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "gbps"), [
    ("25 Gb/sec (1X EDR)", 25),
    ("100 Gb/sec (4X EDR)", 100),
    ("200 Gb/sec (4X HDR)", 200),
    ("400 Gb/sec (4X NDR)", 400),
    ("800 Gb/sec (4X XDR)", 800),
    ("10 Gb/sec (4X)", 10),
    ("2.5 Gb/sec (1X SDR)", 2.5),
    ("5 Gb/sec (1X DDR)", 5),
    ("20 Gb/sec (4X DDR)", 20),
    ("40 Gb/sec (4X QDR)", 40),
    ("14 Gb/sec (1X FDR)", 14),
    ("56 Gb/sec (4X FDR)", 56),
    ("168 Gb/sec (12X FDR)", 168),
    ("53.125 Gb/sec (1X HDR)", 53.125),
    ("106.25 Gb/sec (2X HDR)", 106.25),
    ("50 Gb/sec (1X HDR)", 50),
    ("100 Gb/sec (2X HDR)", 100),
    ("600 Gb/sec (12X HDR)", 600),
    ("1200 Gb/sec (12X NDR)", 1200),
    ("25.78125 Gb/sec (1X EDR)", 25.78125),
    ("100 Gb/sec (4X EDR)\n\n", 100),
])
def test_rate_strings_parse_to_bytes_per_second(text, gbps):
    assert parse_rate(text) == gbps * 1e9 / 8


def test_fractional_rates_are_exact():
    assert parse_rate("53.125 Gb/sec (1X HDR)") == 6640625000.0
    assert parse_rate("2.5 Gb/sec (1X SDR)") == 312500000.0


@pytest.mark.parametrize("text", ["", "N/A", "Gb/sec", "fast", "-25 Gb/sec (1X EDR)", "25 Mb/sec", "25Gb/secs",
                                  "1e3 Gb/sec", "inf Gb/sec", "٢٥ Gb/sec (1X EDR)", None, 25])
def test_rate_garbage_is_none(text):
    assert parse_rate(text) is None


@given(st.one_of(st.text(), st.from_regex(r"\s*[0-9.]{0,40}\s*Gb/sec.*", fullmatch=True),
                 st.builds(lambda n, x: f"{n} Gb/sec ({x})", st.floats(allow_nan=True), st.text())))
def test_rate_parser_never_raises(text):
    r = parse_rate(text)
    assert r is None or (isinstance(r, float) and r >= 0)


# -- link flaps -----------------------------------------------------------------------------------------


def test_state_changes_between_collections_count_link_flaps(tmp_path):
    sysfs = copy_tree(tmp_path)
    state = sysfs / "class/infiniband/mlx5_8/ports/1/state"
    c = RdmaCollector(str(sysfs))
    lab = {"device": "mlx5_8", "port": "1"}

    def changes() -> float:
        m = parse(render(c.collect()))
        return value(m, "rdma_port_state_changes_total", **lab)

    assert changes() == 0
    state.write_text("1: DOWN\n")
    m = parse(render(c.collect()))
    assert value(m, "rdma_port_state_changes_total", **lab) == 1
    assert value(m, "rdma_port_state", **lab) == 1
    assert value(m, "rdma_port_state_info", state="DOWN", **lab) == 1
    assert changes() == 1  # unchanged: no new flap
    state.write_text("2: INIT\n")
    assert changes() == 2
    state.write_text("4: ACTIVE\n")
    assert changes() == 3
    state.write_text("N/A\n")  # unreadable state is not a change
    assert changes() == 3
    state.write_text("4: ACTIVE\n")
    assert changes() == 3
    assert value(parse(render(c.collect())), "rdma_port_state_changes_total", device="mlx5_4", port="1") == 0


# -- layout cache: identity and file lists are rescanned, counters read every time ---------------------


def test_identity_and_counter_files_are_rescanned_per_interval_counters_every_collection(tmp_path, monkeypatch):
    sysfs = copy_tree(tmp_path)
    dev = sysfs / "class/infiniband/mlx5_4"
    clock = [1000.0]
    monkeypatch.setattr(rdma.time, "monotonic", lambda: clock[0])
    c = RdmaCollector(str(sysfs), rescan_interval=60.0)
    lab = {"device": "mlx5_4", "port": "1"}
    c.collect()
    (dev / "fw_ver").write_text("99.99.9999\n")
    (dev / "ports/1/hw_counters/brand_new_counter").write_text("7\n")
    (dev / "ports/1/counters/link_downed").write_text("5\n")
    (dev / "ports/1/state").write_text("1: DOWN\n")
    m = parse(render(c.collect()))
    # counters and state: read every collection
    assert value(m, "rdma_port_link_downed_total", **lab) == 5
    assert value(m, "rdma_port_state", **lab) == 1
    # identity and the file list: not before the rescan interval
    assert [lab_["fw_ver"] for lab_, _ in m["rdma_device_info"] if lab_["device"] == "mlx5_4"] != ["99.99.9999"]
    assert not [s for s in m["rdma_port_hw_events_total"] if s[0]["counter"] == "brand_new_counter"]
    clock[0] += 60.0
    m = parse(render(c.collect()))
    assert value(m, "rdma_device_info", device="mlx5_4", fw_ver="99.99.9999") == 1
    assert value(m, "rdma_port_hw_events_total", counter="brand_new_counter", **lab) == 7


def test_a_vanished_counter_file_is_counted_once_and_forces_a_rescan(tmp_path):
    sysfs = copy_tree(tmp_path)
    c = RdmaCollector(str(sysfs), rescan_interval=3600.0)
    lab = {"device": "mlx5_4", "port": "1"}
    assert value(parse(render(c.collect())), "rdma_port_link_downed_total", **lab) == 2
    (sysfs / "class/infiniband/mlx5_4/ports/1/counters/link_downed").unlink()
    m = parse(render(c.collect()))
    assert "rdma_port_link_downed_total" not in names_with(m, "mlx5_4")
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 1
    m = parse(render(c.collect()))  # rescanned: the file is no longer listed, so no new error
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 1
    assert value(m, "rdma_port_symbol_errors_total", **lab) >= 0


# -- include / exclude ----------------------------------------------------------------------------------


ALL_OURS = {"cxgb4_0", "mlx4_1", "mlx5_4", "mlx5_8", "mlx5_9", "rxe0"}


def devices(m: dict) -> set[str]:
    return {lab["device"] for lab, _ in m.get("rdma_device_info", [])}


@pytest.mark.parametrize(("include", "exclude", "expected"), [
    (None, None, ALL_OURS),
    ("mlx5_.*", None, {"mlx5_4", "mlx5_8", "mlx5_9"}),
    ("mlx5", None, set()),  # full match, not search
    (None, "rxe0|cxgb4_0", {"mlx4_1", "mlx5_4", "mlx5_8", "mlx5_9"}),
    (None, "mlx", ALL_OURS),
    ("mlx5_.*", "mlx5_9", {"mlx5_4", "mlx5_8"}),
])
def test_device_include_and_exclude_are_full_matches(include, exclude, expected):
    m = scrape(OURS_SYSFS, device_include=include, device_exclude=exclude)
    assert devices(m) == expected
    assert {lab["device"] for lab, _ in m.get("gpufleet_exporter_rdma_read_errors_total", [])} == expected
    for rows in m.values():
        assert {lab["device"] for lab, _ in rows} <= expected


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys")
    rdma.add_arguments(p)
    return p


def test_flags_build_the_collector():
    args = parser().parse_args([f"--path.sysfs={OURS_SYSFS}", "--collector.rdma.device-include=mlx.*",
                                "--collector.rdma.device-exclude=mlx4_1"])
    assert args.rdma_device_include.pattern == "mlx.*"
    c = rdma.create(args)
    assert isinstance(c, RdmaCollector) and c.name == rdma.COLLECTOR_NAME == "rdma"
    assert devices(parse(render(c.collect()))) == {"mlx5_4", "mlx5_8", "mlx5_9"}
    defaults = parser().parse_args([])
    assert defaults.rdma_device_include is None and defaults.rdma_device_exclude is None
    assert rdma.create(defaults).root == "/sys/class/infiniband"


def test_invalid_regex_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--collector.rdma.device-include=mlx5_[0-"])
    assert "invalid regular expression" in capsys.readouterr().err


def test_module_protocol_and_spec_table():
    assert rdma.DEFAULT_ENABLED is True and rdma.COLLECTOR_HELP
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))
    assert RdmaCollector.specs == SPECS
    for s in SPECS:
        assert s.name.startswith(("rdma_", "gpufleet_exporter_rdma_"))
        assert (s.type == "counter") == s.name.endswith("_total"), s.name
        assert s.help.endswith(".")
    assert any(g.title == "rdma collector (--collector.rdma)" for g in parser()._action_groups)


# -- exposition -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sysfs", [
    pytest.param(REAL_SYSFS, marks=need_real, id="real-captures"),
    pytest.param(OURS_SYSFS, id="hand-written"),
])
def test_promtool_check_metrics_is_clean(sysfs):
    promtool = need_binary("promtool")
    text = render(RdmaCollector(str(sysfs)).collect())
    assert b"rdma_port_transmit_bytes_total" in text or b"rdma_port_hw_events_total" in text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert proc.stdout == b"" and proc.stderr == b"", (proc.stdout + proc.stderr).decode()


# -- per-port directory fds -----------------------------------------------------------------------------


def fds_under(path: Path) -> list[str]:
    """Where this process's open fds point, for those under path (a deleted directory's ends in ' (deleted)')."""
    root = str(path.resolve()) + "/"
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # the fd listing /proc/self/fd itself, closed by now
            continue
        if target.startswith(root):
            out.append(target)
    return sorted(out)


def port_dirs(sysfs: Path) -> list[str]:
    """What the collector holds open: each port directory and each counter file it reads."""
    wanted = (("counters", lambda f: f in rdma.PMA_COUNTERS), ("counters_ext", lambda f: f in rdma.PMA_EXT_COUNTERS),
              ("hw_counters", lambda f: f not in rdma.HW_NOT_COUNTERS))
    out = []
    for port in (sysfs / "class/infiniband").glob("*/ports/*"):
        if port.is_dir():
            out.append(str(port.resolve()))
            out += [str((port / sub / f).resolve()) for sub, keep in wanted if (port / sub).is_dir()
                    for f in os.listdir(port / sub) if keep(f)]
    return sorted(out)


def test_port_directory_and_counter_fds_are_held_and_close_releases_them(tmp_path):
    sysfs = copy_tree(tmp_path)
    c = RdmaCollector(str(sysfs))
    first = render(c.collect())
    assert fds_under(sysfs) == port_dirs(sysfs)  # mlx5_9 has no ports: none for it
    c.collect()
    assert fds_under(sysfs) == port_dirs(sysfs)  # kept between collections, not opened again
    held = list(c._layouts.values())  # noqa: F841 - closing must not wait for the garbage collector
    c.close()
    assert fds_under(sysfs) == []
    assert render(c.collect()) == first  # usable after close(): scanned and opened anew
    c.close()
    assert fds_under(sysfs) == []


def test_directory_fds_of_a_vanished_device_are_closed_and_it_comes_back(tmp_path):
    sysfs = copy_tree(tmp_path)
    ib = sysfs / "class/infiniband"
    c = RdmaCollector(str(sysfs), rescan_interval=3600.0)
    c.collect()
    held = list(c._layouts.values())  # noqa: F841 - closing must not wait for the garbage collector
    shutil.rmtree(ib / "mlx5_4")
    m = parse(render(c.collect()))
    assert "mlx5_4" not in devices(m)
    assert fds_under(sysfs) == port_dirs(sysfs)  # no fd left on the deleted directory
    shutil.copytree(OURS_IB / "mlx5_4", ib / "mlx5_4")
    m = parse(render(c.collect()))
    assert value(m, "rdma_port_cnp_sent_total", device="mlx5_4", port="1") == 18342
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 0
    assert fds_under(sysfs) == port_dirs(sysfs)
    c.close()


def test_a_port_directory_replaced_between_collections_is_read_from_the_new_one(tmp_path, monkeypatch):
    # A driver reload removes the device's directories and creates new ones: reading by path would read
    # the new files at once, and so must the held fds; identity and file list wait for the rescan as ever.
    sysfs = copy_tree(tmp_path)
    dev = sysfs / "class/infiniband/mlx5_4"
    clock = [1000.0]
    monkeypatch.setattr(rdma.time, "monotonic", lambda: clock[0])
    c = RdmaCollector(str(sysfs), rescan_interval=3600.0)
    c.collect()
    shutil.rmtree(dev)
    shutil.copytree(OURS_IB / "mlx5_4", dev)
    (dev / "ports/1/counters/link_downed").write_text("9\n")
    (dev / "ports/1/hw_counters/np_cnp_sent").write_text("18400\n")
    (dev / "ports/1/state").write_text("1: DOWN\n")
    (dev / "fw_ver").write_text("22.99.1000\n")
    lab = {"device": "mlx5_4", "port": "1"}
    m = parse(render(c.collect()))
    assert value(m, "rdma_port_link_downed_total", **lab) == 9
    assert value(m, "rdma_port_cnp_sent_total", **lab) == 18400
    assert value(m, "rdma_port_state_changes_total", **lab) == 1
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 0
    assert value(m, "rdma_device_info", device="mlx5_4", fw_ver="22.36.1010") == 1  # until the rescan
    assert fds_under(sysfs) == port_dirs(sysfs)  # the new directory's fd, the old one closed
    clock[0] += 3600.0
    m = parse(render(c.collect()))
    assert value(m, "rdma_device_info", device="mlx5_4", fw_ver="22.99.1000") == 1
    c.close()


def test_devices_that_swap_names_report_what_their_paths_now_hold(tmp_path):
    # rdma dev set ... name: a held fd follows the renamed directory, the path names the other device.
    sysfs = copy_tree(tmp_path)
    ib = sysfs / "class/infiniband"
    shutil.copytree(ib / "mlx5_4", ib / "mlx5_5")
    (ib / "mlx5_5/ports/1/counters/link_downed").write_text("55\n")
    c = RdmaCollector(str(sysfs), device_include="mlx5_[45]", rescan_interval=3600.0)
    m = parse(render(c.collect()))
    assert value(m, "rdma_port_link_downed_total", device="mlx5_5", port="1") == 55
    (ib / "mlx5_4").rename(ib / "tmp")
    (ib / "mlx5_5").rename(ib / "mlx5_4")
    (ib / "tmp").rename(ib / "mlx5_5")
    m = parse(render(c.collect()))
    assert value(m, "rdma_port_link_downed_total", device="mlx5_4", port="1") == 55
    assert value(m, "rdma_port_link_downed_total", device="mlx5_5", port="1") == 2
    assert fds_under(sysfs) == [f for f in port_dirs(sysfs) if "/mlx5_4/" in f or "/mlx5_5/" in f]
    c.close()


def test_a_port_removed_under_its_device_counts_its_listed_files_once_and_is_dropped(tmp_path):
    sysfs = copy_tree(tmp_path)
    port = sysfs / "class/infiniband/mlx4_1/ports/2"
    listed = sum(f.name in PMA_COUNTERS for f in (port / "counters").iterdir())
    c = RdmaCollector(str(sysfs), rescan_interval=3600.0)
    c.collect()
    shutil.rmtree(port)
    m = parse(render(c.collect()))

    def port2(m: dict) -> set[str]:
        return {name for name, rows in m.items() for lab, _ in rows if (lab.get("device"), lab.get("port")) ==
                ("mlx4_1", "2")}

    # its layout still lists it (info, flap count); every listed counter file fails once, as without fds
    assert port2(m) == {"rdma_port_info", "rdma_port_state_changes_total"}
    assert value(m, "rdma_port_info", device="mlx4_1", port="1", netdev="ib0") == 1
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx4_1") == listed
    m = parse(render(c.collect()))  # rescanned: the port is gone, so are its fd and further errors
    assert port2(m) == {"rdma_port_state_changes_total"}  # the flap count lives as long as the device
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx4_1") == listed
    assert fds_under(sysfs) == port_dirs(sysfs)
    c.close()


def test_no_fd_leak_over_100_collections_with_a_device_coming_and_going(tmp_path):
    sysfs = copy_tree(tmp_path)
    ib = sysfs / "class/infiniband"
    before = len(list(Path("/proc/self/fd").iterdir()))
    c = RdmaCollector(str(sysfs), rescan_interval=0.0)
    held = []  # every layout ever made: closing must not wait for the garbage collector
    for i in range(100):
        if i % 3 == 0:
            (ib / "mlx5_8").rename(tmp_path / f"gone{i}")  # hot unplug (the directory lives on elsewhere)
        elif i % 3 == 1:
            shutil.copytree(OURS_IB / "mlx5_8", ib / "mlx5_8")  # a new device under the old name
        elif i % 6 == 2:
            c.rescan_interval = 3600.0 - c.rescan_interval  # with and without rescans in between
        c.collect()
        held += c._layouts.values()
        assert fds_under(sysfs) == port_dirs(sysfs), i
    assert len(list(Path("/proc/self/fd").iterdir())) == before + len(port_dirs(sysfs))
    assert fds_under(tmp_path) == port_dirs(sysfs)  # none left on the unplugged directories
    c.close()
    assert len(list(Path("/proc/self/fd").iterdir())) == before


def test_open_errors_through_the_directory_fd_count_once_and_stale_ones_read_by_path(monkeypatch):
    # ENODEV/ESTALE from an open relative to the held directory may only mean that it was replaced
    # since the collection began: the path decides, as without fds. Any other error is the file's own.
    # (Counter files are opened at each read when no fds are to spare.)
    monkeypatch.setattr(rdma, "_fds_to_spare", lambda n: False)
    real_open = rdma.os.open
    failing = {"counters/symbol_error": errno.ESTALE, "hw_counters/np_cnp_sent": errno.ENODEV,
               "rate": errno.ENOENT, "counters/link_downed": errno.EINVAL}
    relative: list[str] = []

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            relative.append(path)
            if path in failing:
                raise OSError(failing[path], "simulated")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    c = RdmaCollector(str(OURS_SYSFS), device_include="mlx5_4")
    c.collect()  # scanned: the directory fds are open
    monkeypatch.setattr(rdma.os, "open", fake_open)
    m = parse(render(c.collect()))
    monkeypatch.undo()
    c.close()
    assert set(failing) <= set(relative)
    lab = {"device": "mlx5_4", "port": "1"}
    assert value(m, "rdma_port_symbol_errors_total", **lab) == 3
    assert value(m, "rdma_port_cnp_sent_total", **lab) == 18342
    assert value(m, "rdma_port_rate_bytes_per_second", **lab) == 25e9
    assert "rdma_port_link_downed_total" not in names_with(m, "mlx5_4")
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 1


def test_pread_errors_on_held_counter_fds_count_once_and_vanished_ones_read_by_path(monkeypatch):
    # A held counter fd whose node went away reads ENODEV (sysfs) or ESTALE: the path decides, as
    # without held fds; any other error (EINVAL, EIO from the driver's show()) is the counter's own.
    failing = {"counters/symbol_error": errno.ESTALE, "hw_counters/np_cnp_sent": errno.ENODEV,
               "counters/link_downed": errno.EINVAL, "counters/port_rcv_errors": errno.EIO}
    c = RdmaCollector(str(OURS_SYSFS), device_include="mlx5_4")
    c.collect()
    (port,) = c._layouts["mlx5_4"].ports
    fds = {fd: name for (name, *_), fd in zip(port.counters, port.held, strict=True) if fd is not None}
    assert set(failing) <= set(fds.values())  # those files are read through held fds
    real_pread, preads = rdma.os.pread, []

    def fake_pread(fd, n, offset):
        preads.append(fds.get(fd))
        if fds.get(fd) in failing:
            raise OSError(failing[fds[fd]], "simulated")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(rdma.os, "pread", fake_pread)
    m = parse(render(c.collect()))
    monkeypatch.undo()
    c.close()
    assert set(preads) == set(fds.values())  # every counter by pread, none opened again
    lab = {"device": "mlx5_4", "port": "1"}
    assert value(m, "rdma_port_symbol_errors_total", **lab) == 3
    assert value(m, "rdma_port_cnp_sent_total", **lab) == 18342
    assert "rdma_port_link_downed_total" not in names_with(m, "mlx5_4")
    assert "rdma_port_receive_errors_total" not in names_with(m, "mlx5_4")
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 2


def test_a_counter_file_changed_under_a_held_fd_is_read_afresh_each_collection(tmp_path):
    """pread at offset 0 reads the file as it is now (sysfs runs show() again; a rewritten file
    gives its new contents), and a counter directory whose files change is opened again."""
    sysfs = copy_tree(tmp_path)
    port = sysfs / "class/infiniband/mlx5_4/ports/1"
    c = RdmaCollector(str(sysfs), rescan_interval=3600.0)
    lab = {"device": "mlx5_4", "port": "1"}
    try:
        for n in (5, 123456789012345678901234567890, 7):
            (port / "counters/link_downed").write_text(f"{n}\n")
            assert value(parse(render(c.collect())), "rdma_port_link_downed_total", **lab) == n
        (port / "counters/link_downed").unlink()  # a held fd would still read "7"
        m = parse(render(c.collect()))
        assert "rdma_port_link_downed_total" not in names_with(m, "mlx5_4")
        assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == 1
        assert fds_under(sysfs) == port_dirs(sysfs)
    finally:
        c.close()


def test_a_substituted_read_file_sees_every_read_and_no_fds_are_opened(tmp_path, monkeypatch):
    sysfs = copy_tree(tmp_path)
    seen: list[str] = []
    real_read = rdma._read_file

    def recording(path: str) -> str:
        seen.append(path)
        return real_read(path)

    monkeypatch.setattr(rdma, "_read_file", recording)
    c = RdmaCollector(str(sysfs), device_include="mlx5_4")
    c.collect()
    seen.clear()
    m = parse(render(c.collect()))
    port = sysfs / "class/infiniband/mlx5_4/ports/1"
    assert str(port / "counters/symbol_error") in seen and str(port / "hw_counters/np_cnp_sent") in seen
    assert str(port / "state") in seen and str(port / "rate") in seen
    assert value(m, "rdma_port_cnp_sent_total", device="mlx5_4", port="1") == 18342
    assert fds_under(sysfs) == []
    c.close()


@pytest.mark.parametrize("text", ["18446744073709551615", "1" * 63, "2" * 64, "3" * 65, "9" * 200])
def test_counter_values_are_exact_integers_of_any_length(tmp_path, text):
    sysfs = copy_tree(tmp_path)
    (sysfs / "class/infiniband/mlx5_4/ports/1/counters/link_downed").write_text(text + "\n")
    (sysfs / "class/infiniband/mlx5_4/ports/1/hw_counters/duplicate_request").write_text(text)
    fams = RdmaCollector(str(sysfs), device_include="mlx5_4").collect()
    body = render(fams).decode()
    assert f'rdma_port_link_downed_total{{device="mlx5_4",port="1"}} {text}\n' in body
    assert f'rdma_port_hw_events_total{{device="mlx5_4",port="1",counter="duplicate_request"}} {text}\n' in body
    for fam in fams:
        if fam.type == "counter":
            assert all(type(v) is int for _, v in fam.rows), fam.name


@pytest.mark.parametrize("text", ["12\x1c", "\xa05", "٢٥", "+3", "-3", "1_000", "", "12 x", "0x1f"])
def test_counters_that_only_look_numeric_are_parsed_as_before(tmp_path, text):
    # bytes are tested first (ASCII digits after ASCII whitespace); anything else takes the text path.
    sysfs = copy_tree(tmp_path)
    (sysfs / "class/infiniband/mlx5_4/ports/1/counters/link_downed").write_text(text + "\n")
    m = scrape(sysfs, device_include="mlx5_4")
    expected = int(text.strip()) if text.strip().isdigit() and text.strip().isascii() else None
    got = [v for lab, v in m.get("rdma_port_link_downed_total", [])]
    assert got == ([] if expected is None else [expected])
    assert value(m, "gpufleet_exporter_rdma_read_errors_total", device="mlx5_4") == (expected is None)


@given(st.one_of(st.text(), st.from_regex(r"\s*\d{0,4}\s*:.*", fullmatch=True),
                 st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x85\xa0:0123456789٢ACTIVEDOWN", max_size=20)))
def test_state_parser_agrees_with_its_regex(text):
    m = rdma._STATE_RE.fullmatch(text)
    assert rdma.parse_state(text) == (None if m is None else (int(m.group(1)), m.group(2)))


@given(st.integers(0, 10**12 - 1), st.text(alphabet="0123456789", min_size=1, max_size=12))
def test_fractional_rates_are_the_exact_rational_rounded_once(whole, frac):
    from fractions import Fraction

    assert parse_rate(f"{whole}.{frac} Gb/sec (4X HDR)") == float(Fraction(f"{whole}.{frac}") * 10**9 / 8)
    assert parse_rate(f"{whole} Gb/sec") == float(whole * 125_000_000)


def test_a_collector_dropped_without_close_leaves_no_fds(tmp_path):
    import gc

    sysfs = copy_tree(tmp_path)
    c = RdmaCollector(str(sysfs))
    c.collect()
    assert fds_under(sysfs) == port_dirs(sysfs)
    del c
    gc.collect()
    assert fds_under(sysfs) == []
