"""Command-line helpers shared by gpufleet's programs."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import threading
import time
from typing import Any, Protocol


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


def non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


# Young-generation GC passes before a collection pass is due, instead of CPython's 700.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Tune the cyclic garbage collector for an exporter that builds thousands of series per interval.

    Start-up leaves tens of thousands of long-lived objects (modules, the service), and
    every full collection walks them all: on the bench node (8 HCAs, 30 mounts) one took
    about 17 ms, every few dozen collections, and set the p99 (bench/collectors.py:
    p99 ~30-35 ms and max ~45 ms without this, ~24 and ~27 with it, same host and hour).
    Freezing what start-up created takes it out of every later pass; a young pass every
    50,000 net allocations instead of 700 stops re-walking the half-built snapshot. Our
    garbage is freed by reference counting; cycles are still collected, only later.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_until_signalled(service: Service, log: logging.Logger, **listening: Any) -> int:
    """Start a service, log where it listens, and stop it cleanly on SIGTERM or SIGINT."""
    stop = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    service.start()
    tune_gc()
    log.info("listening", extra=listening)
    while not stop.wait(3600):
        pass
    t0 = time.monotonic()
    service.stop()
    log.info("stopped", extra={"seconds": round(time.monotonic() - t0, 3)})
    return 0


def add_web_arguments(p: argparse.ArgumentParser, default_listen: str) -> None:
    """The exporter-toolkit style ``--web.*`` flags every gpufleet exporter takes."""
    port = default_listen.rpartition(":")[2]
    web = p.add_argument_group("web")
    web.add_argument("--web.listen-address", dest="listen", default=default_listen, metavar="HOST:PORT",
                     help=f"Address to serve metrics on. ':{port}' listens on every interface; use "
                          f"127.0.0.1:{port} for loopback only.")
    web.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                     help="Path under which to expose metrics.")
    web.add_argument("--web.config.file", dest="web_config", default="", metavar="FILE",
                     help="exporter-toolkit web config (YAML): tls_server_config (cert_file, key_file, "
                          "client_auth_type, client_ca_file) and basic_auth_users (bcrypt hashes).")


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    from exporters.logsetup import LEVELS

    logs = p.add_argument_group("logging")
    logs.add_argument("--log.level", dest="log_level", choices=LEVELS, default="info", help="Minimum level logged.")
    logs.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt",
                      help="Log line format (to stderr).")
