"""The node agent as users run it: HTTP, flags, promtool, DCGM names, shutdown."""

from __future__ import annotations

import gc
import gzip
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
import requests

from exporters.agent import Exporter, build_parser
from tests.conftest import need_binary, parse, value, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run_exporter(sim_state):
    started: list[Exporter] = []

    def _run(*flags: str) -> tuple[Exporter, str]:
        args = build_parser().parse_args(
            ["--gpu.backend=sim", f"--sim.state-file={sim_state.path}", "--web.listen-address=127.0.0.1:0",
             "--collector.interval=0.2s", *flags]
        )
        exp = Exporter(args)
        exp.start()
        started.append(exp)
        host, port = exp.server.server_address[:2]
        base = f"http://{host}:{port}"
        wait_for(lambda: b"gpu_up{" in requests.get(base + "/metrics", timeout=5).content)
        return exp, base

    yield _run
    for exp in started:
        exp.stop()


def test_metrics_landing_page_health_and_gzip(run_exporter):
    _, base = run_exporter()
    r = requests.get(base + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    m = parse(r.text)
    assert len(m["gpu_up"]) == 8
    assert value(m, "gpufleet_exporter_collector_success", collector="gpu") == 1
    page = requests.get(base + "/", timeout=5).text
    assert "<td>gpu</td><td>ok</td>" in page and 'href="/metrics"' in page
    assert requests.get(base + "/healthz", timeout=5).text.strip() == "ok"
    assert requests.get(base + "/nope", timeout=5).status_code == 404
    raw = requests.get(base + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=5, stream=True).raw
    assert raw.headers["Content-Encoding"] == "gzip"
    assert b"gpu_up{" in gzip.decompress(raw.read())


def test_promtool_check_metrics_is_clean(run_exporter, sim_state):
    promtool = need_binary("promtool")
    sim_state.gpu(3, xid={"79": 1}, clock_events=["hw_slowdown"])
    _, base = run_exporter("--gpu.expected-count=8")
    text = wait_for(lambda: (t := requests.get(base + "/metrics", timeout=5).content)
                    and b"gpu_sm_active_ratio" in t and t)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"" and proc.stderr == b"", (proc.stdout + proc.stderr).decode()


def test_dcgm_compat_names_units_and_labels(run_exporter, sim_state):
    sim_state.gpu(1, utilization=0.5, memory_used_bytes=2 * 1024**3, temperature_celsius=60, power_watts=300)
    exp, base = run_exporter("--gpu.dcgm-compat", "--gpu.dcgm-hostname=node-7")
    m = wait_for(lambda: (s := parse(requests.get(base + "/metrics", timeout=5).text))
                 and "DCGM_FI_PROF_SM_ACTIVE" in s and s)
    lab = {"gpu": "1", "device": "nvidia1", "Hostname": "node-7", "modelName": "NVIDIA H100 80GB HBM3",
           "pci_bus_id": "00000000:2A:00.0"}
    assert value(m, "DCGM_FI_DEV_GPU_UTIL", **lab) == 50
    assert value(m, "DCGM_FI_DEV_FB_USED", **lab) == 2048  # MiB
    assert value(m, "DCGM_FI_DEV_GPU_TEMP", **lab) == 60
    assert value(m, "DCGM_FI_DEV_POWER_USAGE", **lab) == 300
    assert value(m, "DCGM_FI_DEV_SM_CLOCK", **lab) == 1980  # MHz
    assert value(m, "DCGM_FI_DEV_MEM_CLOCK", **lab) == 2619
    assert value(m, "DCGM_FI_PROF_SM_ACTIVE", **lab) == pytest.approx(0.45)  # ratio, not percent
    assert value(m, "DCGM_FI_DEV_XID_ERRORS", err_code="0", **lab) == 0
    native_uuid = value(m, "gpu_up", gpu="1") and next(x["uuid"] for x, _ in m["gpu_up"] if x["gpu"] == "1")
    assert value(m, "DCGM_FI_DEV_GPU_UTIL", UUID=native_uuid) == 50
    energy_j = value(m, "gpu_energy_consumption_joules_total", gpu="1")
    # (prometheus_client's parser appends _total to counter samples; the wire text has none, see below)
    assert value(m, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total", gpu="1") == pytest.approx(energy_j * 1000, rel=0.01)
    text = requests.get(base + "/metrics", timeout=5).text
    # dcgm-exporter's counter names have no _total suffix; the TYPE line must say counter.
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total" not in text
    sim_state.gpu(1, xid={"79": 1})
    m = wait_for(lambda: (s := parse(requests.get(base + "/metrics", timeout=5).text))
                 and value(s, "DCGM_FI_DEV_XID_ERRORS", gpu="1") == 79 and s)
    assert value(m, "DCGM_FI_DEV_XID_ERRORS", gpu="1", err_code="79") == 79


def test_basic_auth_from_web_config(run_exporter, tmp_path: Path):
    cfg = tmp_path / "web.yml"
    pw_hash = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    cfg.write_text(f"basic_auth_users:\n  prom: {pw_hash}\n")
    args = build_parser().parse_args(["--gpu.backend=sim", "--web.listen-address=127.0.0.1:0",
                                      f"--web.config.file={cfg}", "--collector.interval=0.2s"])
    exp = Exporter(args)
    exp.start()
    try:
        host, port = exp.server.server_address[:2]
        url = f"http://{host}:{port}/metrics"
        assert requests.get(url, timeout=5).status_code == 401
        assert requests.get(url, auth=("prom", "wrong"), timeout=5).status_code == 401
        ok = wait_for(lambda: (r := requests.get(url, auth=("prom", "s3cret"), timeout=5)) and b"gpu_up" in r.content)
        assert ok
    finally:
        exp.stop()


def test_collector_disabled_by_flag_is_absent(run_exporter):
    args = build_parser().parse_args(["--no-collector.gpu", "--web.listen-address=127.0.0.1:0"])
    exp = Exporter(args)
    exp.start()
    try:
        host, port = exp.server.server_address[:2]
        m = parse(requests.get(f"http://{host}:{port}/metrics", timeout=5).text)
        assert "gpu_up" not in m
        assert not [lab for lab, _ in m.get("gpufleet_exporter_collector_success", []) if lab["collector"] == "gpu"]
        assert "gpufleet_exporter_build_info" in m
    finally:
        exp.stop()


def _spawn(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "exporters.agent", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_real_nvml_backend_without_driver_still_serves_and_explains():
    """This machine has no NVIDIA driver: the agent serves, gpu success 0, one clear log line."""
    port = free_port()
    proc = _spawn(f"--web.listen-address=127.0.0.1:{port}", "--collector.interval=0.2s")
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped():
            try:
                return parse(requests.get(url, timeout=2).text)
            except requests.ConnectionError:
                return None

        m = wait_for(lambda: (s := scraped()) and "gpufleet_exporter_collector_success" in s and s)
        if value(m, "gpufleet_exporter_collector_success", collector="gpu") == 1:
            pytest.skip("this machine has a working NVIDIA driver")
        time.sleep(1.0)  # several failed collections: still one log line
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    failures = [line for line in err.splitlines() if 'msg="collector failed" collector=gpu ' in line]
    assert len(failures) == 1, err
    assert "libnvidia-ml.so.1 not found" in failures[0]


def test_sigterm_shuts_down_cleanly():
    port = free_port()
    proc = _spawn("--gpu.backend=sim", f"--web.listen-address=127.0.0.1:{port}", "--log.format=json")
    try:
        wait_for(lambda: _up(port))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert '"msg": "stopped"' in err


def _up(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "exporters.agent", "--help"], capture_output=True, text=True,
                         timeout=30).stdout
    for flag in ("--web.listen-address", "--web.telemetry-path", "--web.config.file", "--collector.interval",
                 "--collector.timeout", "--collector.gpu", "--no-collector.gpu", "--path.sysfs", "--path.procfs",
                 "--path.rootfs", "--log.level", "--log.format", "--gpu.backend", "--gpu.expected-count",
                 "--gpu.dcgm-compat", "--gpu.xid-source", "--sim.gpus", "--sim.model", "--sim.seed",
                 "--sim.state-file"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--web.listen-address=nonsense"], "is not HOST:PORT"),
        (["--web.config.file=/nonexistent/web.yml"], "/nonexistent/web.yml"),
    ],
)
def test_bad_configuration_exits_with_a_clear_error(flags, message):
    proc = subprocess.run([sys.executable, "-m", "exporters.agent", "--gpu.backend=sim", *flags],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bad_duration_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--collector.interval=fast"])


def test_tune_gc_freezes_start_up_objects_and_spaces_young_passes():
    from exporters import cli

    before = gc.get_threshold()
    try:
        cli.tune_gc()
        assert gc.get_threshold() == (cli.GC_GEN0_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 1000  # modules, classes, the test session: out of every later pass
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
