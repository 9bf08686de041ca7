"""gpufleet-exporter: the per-node agent (GPU, and later fabric, storage and job collectors).

Flags follow node_exporter: ``--collector.<name>`` / ``--no-collector.<name>``,
``--path.*``, ``--web.*``, ``--log.*``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
import time
from importlib import metadata
from typing import Any

from exporters.collector import Agent, Collector, CollectorRunner
from exporters.logsetup import LEVELS, setup_logging
from exporters.web import ExporterServer, landing_page, parse_listen_address
from exporters.webconfig import WebConfigError, load_web_config

DEFAULT_LISTEN = ":9845"
log = logging.getLogger("gpufleet.exporter")


def version() -> str:
    try:
        return metadata.version("gpufleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def duration(text: str) -> float:
    """Parse a Prometheus-style duration (``500ms``, ``5s``, ``1m``) or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip()
    try:
        for suffix in ("ms", "s", "m", "h"):
            if t.endswith(suffix):
                value = float(t[: -len(suffix)]) * units[suffix]
                break
        else:
            value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 500ms, 5s, 1m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from exporters.gpu_sim import DEFAULT_MODEL, MODELS

    p = argparse.ArgumentParser(
        prog="gpufleet-exporter",
        description=(
            "Node agent of gpufleet: publishes per-GPU metrics from NVML (and, as later collectors land, "
            "InfiniBand, storage and job metrics) for Prometheus. Collectors sample in the background every "
            "--collector.interval; a scrape serves the latest snapshot, so scrapes stay fast even when NVML "
            "or a filesystem hangs. Each collector reports gpufleet_exporter_collector_success."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    web = p.add_argument_group("web")
    web.add_argument("--web.listen-address", dest="listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                     help="Address to serve metrics on. ':9845' listens on every interface; use "
                          "127.0.0.1:9845 for loopback only.")
    web.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                     help="Path under which to expose metrics.")
    web.add_argument("--web.config.file", dest="web_config", default="", metavar="FILE",
                     help="exporter-toolkit web config (YAML): tls_server_config (cert_file, key_file, "
                          "client_auth_type, client_ca_file) and basic_auth_users (bcrypt hashes).")
    col = p.add_argument_group("collectors")
    col.add_argument("--collector.interval", dest="interval", type=duration, default=duration("5s"),
                     metavar="DURATION", help="How often collectors sample in the background.")
    col.add_argument("--collector.timeout", dest="timeout", type=duration, default=None, metavar="DURATION",
                     help="A collection that takes longer is abandoned and reported as failed "
                          "(default: the interval, at least 2s).")
    col.add_argument("--collector.gpu", dest="collector_gpu", action=argparse.BooleanOptionalAction, default=True,
                     help="GPU metrics from NVML (--no-collector.gpu disables).")
    paths = p.add_argument_group("paths")
    paths.add_argument("--path.sysfs", dest="sysfs", default="/sys", help="sysfs mount point.")
    paths.add_argument("--path.procfs", dest="procfs", default="/proc", help="procfs mount point.")
    paths.add_argument("--path.rootfs", dest="rootfs", default="/",
                       help="Host root filesystem (the kernel log is read from <rootfs>/dev/kmsg).")
    gpu = p.add_argument_group("gpu collector")
    gpu.add_argument("--gpu.backend", dest="gpu_backend", choices=("nvml", "sim"), default="nvml",
                     help="nvml: the real NVML library (libnvidia-ml.so.1). sim: simulated GPUs, for demos and "
                          "tests (see --sim.*).")
    gpu.add_argument("--gpu.expected-count", dest="gpu_expected", type=_positive_int, default=None, metavar="N",
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
    sim.add_argument("--sim.gpus", dest="sim_gpus", type=_positive_int, default=8, help="Simulated GPUs.")
    sim.add_argument("--sim.model", dest="sim_model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                     help="GPU profile (name, memory, power limit, NVLinks, GPM support).")
    sim.add_argument("--sim.seed", dest="sim_seed", type=int, default=0,
                     help="Seed for UUIDs, serials and load patterns; use one per simulated node.")
    sim.add_argument("--sim.state-file", dest="sim_state", default="", metavar="FILE",
                     help="YAML/JSON fault-injection file, re-read when it changes (docs/simulator.md).")
    logs = p.add_argument_group("logging")
    logs.add_argument("--log.level", dest="log_level", choices=LEVELS, default="info", help="Minimum level logged.")
    logs.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt",
                      help="Log line format (to stderr).")
    p.add_argument("--version", action="version", version=f"gpufleet-exporter {version()}")
    return p


def make_nvml(args: argparse.Namespace) -> Any:
    if args.gpu_backend == "sim":
        from exporters.gpu_sim import SimulatedNVML

        return SimulatedNVML(gpus=args.sim_gpus, model=args.sim_model, seed=args.sim_seed,
                             state_file=args.sim_state or None)
    import pynvml

    return pynvml


def build_collectors(args: argparse.Namespace) -> list[Collector]:
    collectors: list[Collector] = []
    if args.collector_gpu:
        from exporters.gpu import GpuCollector

        sources = ("nvml", "kmsg") if args.xid_source == "both" else (args.xid_source,)
        collectors.append(
            GpuCollector(
                make_nvml(args),
                expected_count=args.gpu_expected,
                dcgm_compat=args.dcgm_compat,
                dcgm_hostname=args.dcgm_hostname,
                xid_sources=sources,
                kmsg_path=args.kmsg_path or os.path.join(args.rootfs, "dev/kmsg"),
                gpm=args.gpm,
            )
        )
    return collectors


class Exporter:
    """Collectors + HTTP server, started and stopped together (also used by tests)."""

    def __init__(self, args: argparse.Namespace, collectors: list[Collector] | None = None):
        self.args = args
        web_config = load_web_config(args.web_config or None)
        timeout = args.timeout or max(args.interval, 2.0)
        collectors = build_collectors(args) if collectors is None else collectors
        self.agent = Agent(
            [CollectorRunner(c, args.interval, timeout) for c in collectors],
            version=version(),
            python_version=platform.python_version(),
        )
        self.server = ExporterServer(
            parse_listen_address(args.listen),
            metrics=self.agent.exposition,
            landing=self._landing,
            health=self._health,
            telemetry_path=args.telemetry_path,
            web_config=web_config,
        )

    def _landing(self) -> str:
        rows = []
        for r in self.agent.runners:
            st = r.state()
            state = "ok" if st.success else "failing"
            detail = r.collector.status()
            if st.last_error:
                detail = f"{st.last_error}; {detail}" if detail else st.last_error
            rows.append((r.collector.name, state, detail))
        return landing_page(f"gpufleet-exporter {version()}", self.args.telemetry_path, rows)

    def _health(self) -> tuple[bool, str]:
        # Healthy means the process serves; collector failures are data, not ill health.
        return True, "ok"

    def start(self) -> None:
        self.agent.start()
        self.server.serve_in_background()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.agent.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        exporter = Exporter(args)
    except (WebConfigError, ValueError, OSError) as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        return 2
    stop = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    exporter.start()
    log.info(
        "listening",
        extra={"address": exporter.server.url, "collectors": ",".join(r.collector.name for r in exporter.agent.runners),
               "interval": args.interval},
    )
    while not stop.wait(3600):
        pass
    t0 = time.monotonic()
    exporter.stop()
    log.info("stopped", extra={"seconds": round(time.monotonic() - t0, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
