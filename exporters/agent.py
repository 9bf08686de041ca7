"""gpufleet-exporter: the per-node agent (GPU, and later fabric, storage and job collectors).

Flags follow node_exporter: ``--collector.<name>`` / ``--no-collector.<name>``,
``--path.*``, ``--web.*``, ``--log.*``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
from importlib import metadata
from typing import Any

from exporters.cli import add_log_arguments, add_web_arguments, duration, run_until_signalled
from exporters.collector import Agent, Collector, CollectorRunner
from exporters.logsetup import setup_logging
from exporters.web import ExporterServer, ServedAgent, landing_page, parse_listen_address
from exporters.webconfig import WebConfigError, load_web_config

DEFAULT_LISTEN = ":9845"
log = logging.getLogger("gpufleet.exporter")


def version() -> str:
    try:
        return metadata.version("gpufleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# Each collector module provides COLLECTOR_NAME, COLLECTOR_HELP, DEFAULT_ENABLED,
# add_arguments(parser) for its own flag group, and create(args) -> Collector.
COLLECTOR_MODULES = (
    "exporters.gpu",
    "exporters.rdma",
    "exporters.storage",
    "exporters.jobs",
    "exporters.progress_collector",
)


def collector_modules() -> list[Any]:
    return [importlib.import_module(m) for m in COLLECTOR_MODULES]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpufleet-exporter",
        description=(
            "Node agent of gpufleet: publishes per-GPU metrics from NVML, InfiniBand/RoCE port metrics, "
            "filesystem, NFS, Lustre and disk metrics, which job holds each GPU, and training progress, for "
            "Prometheus. Collectors sample in the background every "
            "--collector.interval; a scrape serves the latest snapshot, so scrapes stay fast even when NVML "
            "or a filesystem hangs. Each collector reports gpufleet_exporter_collector_success."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_web_arguments(p, DEFAULT_LISTEN)
    col = p.add_argument_group("collectors")
    col.add_argument("--collector.interval", dest="interval", type=duration, default=duration("5s"),
                     metavar="DURATION", help="How often collectors sample in the background.")
    col.add_argument("--collector.timeout", dest="timeout", type=duration, default=None, metavar="DURATION",
                     help="A collection that takes longer is abandoned and reported as failed "
                          "(None: the interval, at least 2s).")
    for module in collector_modules():
        name = module.COLLECTOR_NAME
        col.add_argument(f"--collector.{name}", dest=f"collector_{name}", action=argparse.BooleanOptionalAction,
                         default=module.DEFAULT_ENABLED,
                         help=f"{module.COLLECTOR_HELP} (--no-collector.{name} disables).")
    paths = p.add_argument_group("paths")
    paths.add_argument("--path.sysfs", dest="sysfs", default="/sys", help="sysfs mount point.")
    paths.add_argument("--path.procfs", dest="procfs", default="/proc", help="procfs mount point.")
    paths.add_argument("--path.rootfs", dest="rootfs", default="/",
                       help="Host root filesystem, as mounted in a container: filesystems are measured under it and the "
                            "kernel log is read from <rootfs>/dev/kmsg.")
    for module in collector_modules():
        module.add_arguments(p)
    add_log_arguments(p)
    p.add_argument("--version", action="version", version=f"gpufleet-exporter {version()}")
    return p


def build_collectors(args: argparse.Namespace) -> list[Collector]:
    return [m.create(args) for m in collector_modules() if getattr(args, f"collector_{m.COLLECTOR_NAME}")]


class Exporter(ServedAgent):
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



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        exporter = Exporter(args)
    except (WebConfigError, ValueError, OSError) as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        return 2
    return run_until_signalled(
        exporter, log, address=exporter.server.url,
        collectors=",".join(r.collector.name for r in exporter.agent.runners), interval=args.interval,
    )


if __name__ == "__main__":
    sys.exit(main())
