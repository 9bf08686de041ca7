"""gpufleet-slurm-exporter: one per cluster; Slurm nodes, partitions and jobs for Prometheus.

It polls Slurm in the background every ``--slurm.poll-interval`` (``sinfo --json`` and
``squeue --json``, the formatted output where ``--json`` is missing, or slurmrestd with
``--slurm.rest-url``) and renders the metrics once per poll; a scrape only copies the
bytes of the last good snapshot and adds ``slurm_exporter_*`` figures about its age
and the errors since. A slow or dead slurmctld therefore never slows a scrape, and is
never asked more often than the poll interval (at least 5 s unless
``--slurm.allow-fast-poll``), each command bounded by ``--slurm.timeout``.

Cardinality: per node a fixed set of series; per running job four series
(``slurm_job_info``, ``slurm_job_start_timestamp_seconds``, ``slurm_job_gpus`` and one
``slurm_job_node_info`` per node); pending and finished jobs only count towards
aggregates (by partition, account, user and pending reason).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from typing import Protocol

from exporters.cli import add_log_arguments, add_web_arguments, duration, run_until_signalled
from exporters.collector import (
    Agent,
    Collector,
    CollectorError,
    CollectorRunner,
    MetricSpec,
    SampleBuilder,
    render,
)
from exporters.logsetup import setup_logging
from exporters.slurm_data import NODE_STATES, Snapshot, pending_reason, rfc3339
from exporters.slurm_source import CliSource, RestSource, SourceError
from exporters.web import ExporterServer, ServedAgent, landing_page, parse_listen_address
from exporters.webconfig import WebConfigError, load_web_config

DEFAULT_LISTEN = ":9846"
MIN_POLL_INTERVAL = 5.0
log = logging.getLogger("gpufleet.slurm")

SPECS: tuple[MetricSpec, ...] = (
    # -- nodes
    MetricSpec("slurm_node_state", "gauge",
               "Node state, one-hot over the normalised states idle, allocated, mixed, drained, draining, down, "
               "fail, maint, reserved, unknown (drain wins over idle/allocated, down over drain).",
               ("node", "state")),
    MetricSpec("slurm_node_not_responding", "gauge",
               "1 if slurmctld marks the node NOT_RESPONDING (sinfo's '*'), whatever its state.", ("node",)),
    MetricSpec("slurm_node_drain_info", "gauge",
               "Why a drained, draining, down or failed node is out of service: reason text, who set it, and when "
               "(RFC 3339, UTC). Value 1.", ("node", "reason", "reason_user", "reason_time")),
    MetricSpec("slurm_node_cpus", "gauge", "CPUs of the node as Slurm schedules them.", ("node",)),
    MetricSpec("slurm_node_cpus_allocated", "gauge", "CPUs of the node allocated to jobs.", ("node",)),
    MetricSpec("slurm_node_gpus", "gauge", "GPUs of the node (GRES gpu, all types).", ("node",)),
    MetricSpec("slurm_node_gpus_allocated", "gauge", "GPUs of the node allocated to jobs (GRES used).", ("node",)),
    MetricSpec("slurm_node_partition_info", "gauge", "Partition membership of a node, value 1.",
               ("node", "partition")),
    # -- partitions
    MetricSpec("slurm_partition_info", "gauge",
               "Partition availability (up, down, drain, inactive) and whether it is the default, value 1.",
               ("partition", "state", "default")),
    MetricSpec("slurm_partition_nodes", "gauge", "Nodes in the partition.", ("partition",)),
    MetricSpec("slurm_partition_nodes_state", "gauge",
               "Nodes of the partition per normalised node state (every state, zeros included).",
               ("partition", "state")),
    MetricSpec("slurm_partition_cpus", "gauge", "CPUs of the partition's nodes.", ("partition",)),
    MetricSpec("slurm_partition_cpus_allocated", "gauge", "Allocated CPUs of the partition's nodes.",
               ("partition",)),
    MetricSpec("slurm_partition_gpus", "gauge", "GPUs of the partition's nodes.", ("partition",)),
    MetricSpec("slurm_partition_gpus_allocated", "gauge",
               "Allocated GPUs of the partition's nodes (by any job, through any partition).", ("partition",)),
    # -- jobs
    MetricSpec("slurm_jobs", "gauge",
               "Jobs in the queue (not finished) by state and partition; pending and running are always present. "
               "A pending job array counts once.", ("state", "partition")),
    MetricSpec("slurm_account_jobs", "gauge", "Jobs in the queue by account and state.", ("account", "state")),
    MetricSpec("slurm_user_jobs", "gauge", "Jobs in the queue by user and state.", ("user", "state")),
    MetricSpec("slurm_jobs_pending_reason", "gauge",
               "Pending jobs by Slurm's reason code (Resources, Priority, Dependency, ReqNodeNotAvail...) and "
               "partition.", ("reason", "partition")),
    MetricSpec("slurm_job_gpus_allocated", "gauge",
               "GPUs allocated to running jobs, summed by account, user and partition (rate into GPU-hours with "
               "recording rules).", ("account", "user", "partition")),
    MetricSpec("slurm_job_info", "gauge",
               "A running job, value 1 (one series per running job, none once it ends).",
               ("job_id", "user", "account", "partition", "name")),
    MetricSpec("slurm_job_node_info", "gauge",
               "A node a running job holds, value 1: which jobs a drain of the node touches.", ("job_id", "node")),
    MetricSpec("slurm_job_start_timestamp_seconds", "gauge", "Unix time a running job started.", ("job_id",)),
    MetricSpec("slurm_job_gpus", "gauge", "GPUs allocated to a running job, over all its nodes.", ("job_id",)),
    # -- the exporter's own view of its polling
    MetricSpec("slurm_exporter_last_success_timestamp_seconds", "gauge",
               "Unix time of the last successful poll of Slurm (0 if none yet)."),
    MetricSpec("slurm_exporter_snapshot_age_seconds", "gauge",
               "Age of the snapshot served, at scrape time (absent until the first successful poll)."),
    MetricSpec("slurm_exporter_errors_total", "counter",
               "Failed polls by what failed: api_version (slurmrestd negotiation or auth), nodes, jobs, partitions "
               "(command failure, timeout, HTTP error or unreadable output), internal.", ("source",)),
    MetricSpec("slurm_exporter_collect_duration_seconds", "gauge",
               "Duration of the last poll, successful or not (commands or HTTP, parsing and rendering)."),
    MetricSpec("slurm_exporter_backend_info", "gauge",
               "How Slurm is read: backend (cli-json, cli-text, rest), the JSON data format or REST API version, "
               "and the Slurm release it reports. Value 1.", ("backend", "api_version", "slurm_version")),
)
_SPEC = {s.name: s for s in SPECS}
#: For the metric catalogue: what Slurm says, and what the exporter says about its polling.
SNAPSHOT_SPECS = tuple(s for s in SPECS if not s.name.startswith("slurm_exporter_"))
SELF_SPECS = tuple(s for s in SPECS if s.name.startswith("slurm_exporter_"))


def version() -> str:
    try:
        return metadata.version("gpufleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# -- rendering -------------------------------------------------------------------------
class _Builder(Protocol):
    def add(self, name: str, labels: Sequence[str], value: float) -> None: ...


def build_metrics(snap: Snapshot, b: _Builder) -> None:
    """Every snapshot series of ``snap`` into builder ``b`` (a SampleBuilder)."""
    add = b.add
    # Partitions in Slurm's order, then any only named on nodes.
    part_order: dict[str, None] = {p.name: None for p in snap.partitions}
    nodes_in: Counter[str] = Counter()
    cpus: Counter[str] = Counter()
    cpus_alloc: Counter[str] = Counter()
    gpus: Counter[str] = Counter()
    gpus_alloc: Counter[str] = Counter()
    states: Counter[tuple[str, str]] = Counter()
    out_of_service = ("drained", "draining", "down", "fail")

    for node in snap.nodes:
        n = node.name
        for st in NODE_STATES:
            add("slurm_node_state", (n, st), 1 if st == node.state else 0)
        add("slurm_node_not_responding", (n,), 1 if node.not_responding else 0)
        if node.state in out_of_service:
            add("slurm_node_drain_info", (n, node.reason, node.reason_user, rfc3339(node.reason_time)), 1)
        add("slurm_node_cpus", (n,), node.cpus)
        add("slurm_node_cpus_allocated", (n,), node.cpus_allocated)
        add("slurm_node_gpus", (n,), node.gpus)
        add("slurm_node_gpus_allocated", (n,), node.gpus_allocated)
        for p in node.partitions:
            add("slurm_node_partition_info", (n, p), 1)
            part_order.setdefault(p, None)
            nodes_in[p] += 1
            cpus[p] += node.cpus
            cpus_alloc[p] += node.cpus_allocated
            gpus[p] += node.gpus
            gpus_alloc[p] += node.gpus_allocated
            states[p, node.state] += 1

    info = {p.name: p for p in snap.partitions}
    for p in part_order:
        pi = info.get(p)
        add("slurm_partition_info", (p, pi.state if pi else "unknown", "true" if pi and pi.default else "false"), 1)
        add("slurm_partition_nodes", (p,), nodes_in[p])
        for st in NODE_STATES:
            add("slurm_partition_nodes_state", (p, st), states[p, st])
        add("slurm_partition_cpus", (p,), cpus[p])
        add("slurm_partition_cpus_allocated", (p,), cpus_alloc[p])
        add("slurm_partition_gpus", (p,), gpus[p])
        add("slurm_partition_gpus_allocated", (p,), gpus_alloc[p])

    by_part: Counter[tuple[str, str]] = Counter()
    by_account: Counter[tuple[str, str]] = Counter()
    by_user: Counter[tuple[str, str]] = Counter()
    pending: Counter[tuple[str, str]] = Counter()
    gpu_by: Counter[tuple[str, str, str]] = Counter()
    for p in part_order:
        by_part["pending", p] = 0
        by_part["running", p] = 0
    running = []
    for job in snap.jobs:
        st = job.state.lower()
        # A job submitted to several partitions lists them comma-separated while pending.
        part = job.partition
        by_part[st, part] += 1
        by_account[job.account, st] += 1
        by_user[job.user, st] += 1
        if st == "pending":
            pending[pending_reason(job.reason), part] += 1
        elif st == "running":
            gpu_by[job.account, job.user, part] += job.gpus
            running.append(job)
    for (st, p), v in by_part.items():
        add("slurm_jobs", (st, p), v)
    for (a, st), v in by_account.items():
        add("slurm_account_jobs", (a, st), v)
    for (u, st), v in by_user.items():
        add("slurm_user_jobs", (u, st), v)
    for (r, p), v in pending.items():
        add("slurm_jobs_pending_reason", (r, p), v)
    for (a, u, p), v in gpu_by.items():
        add("slurm_job_gpus_allocated", (a, u, p), v)
    for job in running:
        add("slurm_job_info", (job.job_id, job.user, job.account, job.partition, job.name), 1)
    for job in running:
        for n in job.nodes:
            add("slurm_job_node_info", (job.job_id, n), 1)
    for job in running:
        add("slurm_job_start_timestamp_seconds", (job.job_id,), job.start_time)
    for job in running:
        add("slurm_job_gpus", (job.job_id,), job.gpus)


def render_snapshot(snap: Snapshot) -> bytes:
    """The exposition text of a snapshot: rendered once per poll, served by every scrape."""
    b = SampleBuilder(_SPEC)
    build_metrics(snap, b)
    return render(b.families())


# -- the collector -------------------------------------------------------------------------
class Source(Protocol):
    SOURCES: tuple[str, ...]

    @property
    def backend(self) -> str: ...

    def fetch(self) -> Snapshot: ...


class SlurmCollector(Collector):
    """Polls a Source; keeps the rendering of the last good snapshot for scrapes.

    Run by a CollectorRunner, so ``gpufleet_exporter_collector_*{collector="slurm"}``
    say whether the last poll worked. ``collect`` returns no families: on failure the
    runner would withdraw them, but a scrape must keep serving the last good
    snapshot, whose age ``slurm_exporter_snapshot_age_seconds`` then shows.
    """

    name = "slurm"
    specs = SPECS

    def __init__(self, source: Source, clock=time.time):
        self.source = source
        self._clock = clock
        self._lock = threading.Lock()
        self._payload = b""
        self._last_success = 0.0
        self._duration = 0.0
        self._errors: Counter[str] = Counter({s: 0 for s in source.SOURCES})
        self._errors["internal"] += 0
        self._backend = (source.backend, "", "")
        self._last_error = ""
        self.polls = 0

    def collect(self) -> list:
        t0 = time.monotonic()
        try:
            snap = self.source.fetch()
            payload = render_snapshot(snap)
        except SourceError as exc:
            self._failed(exc.source, str(exc), t0)
            raise CollectorError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bug in parsing must not end polling
            self._failed("internal", f"{type(exc).__name__}: {exc}", t0)
            raise
        with self._lock:
            self._payload = payload
            self._last_success = self._clock()
            self._duration = time.monotonic() - t0
            self._backend = (snap.backend, snap.api_version, snap.slurm_version)
            self._last_error = ""
            self.polls += 1
        return []

    def _failed(self, source: str, message: str, t0: float) -> None:
        with self._lock:
            self._errors[source] += 1
            self._duration = time.monotonic() - t0
            self._last_error = message

    def self_families(self):
        now = self._clock()
        b = SampleBuilder(_SPEC)
        with self._lock:
            b.add("slurm_exporter_last_success_timestamp_seconds", (), self._last_success)
            if self._last_success:
                b.add("slurm_exporter_snapshot_age_seconds", (), max(0.0, now - self._last_success))
            for source, n in self._errors.items():
                b.add("slurm_exporter_errors_total", (source,), n)
            b.add("slurm_exporter_collect_duration_seconds", (), self._duration)
            b.add("slurm_exporter_backend_info", self._backend, 1)
        return b.families()

    def exposition(self) -> bytes:
        with self._lock:
            payload = self._payload
        return payload + render(self.self_families())

    def status(self) -> str:
        with self._lock:
            if not self._last_success:
                return f"{self.source.backend}: no successful poll yet"
            age = self._clock() - self._last_success
            return f"{self._backend[0]} {self._backend[1]} Slurm {self._backend[2]}; snapshot {age:.0f}s old".strip()

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close:
            close()


# -- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpufleet-slurm-exporter",
        description=(
            "Cluster-level Slurm exporter of gpufleet (run one per cluster): node states and drain reasons, CPUs "
            "and GPUs per node and partition, job counts, pending reasons, GPUs by account/user, and the running "
            "jobs with their nodes. Polls sinfo/squeue --json (or slurmrestd) in the background; scrapes serve "
            "the last good snapshot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_web_arguments(p, DEFAULT_LISTEN)
    s = p.add_argument_group("slurm")
    s.add_argument("--slurm.poll-interval", dest="poll_interval", type=duration, default=duration("30s"),
                   metavar="DURATION",
                   help=f"How often to poll Slurm (at least {MIN_POLL_INTERVAL:g}s, see --slurm.allow-fast-poll).")
    s.add_argument("--slurm.allow-fast-poll", dest="allow_fast_poll", action="store_true",
                   help=f"Allow --slurm.poll-interval below {MIN_POLL_INTERVAL:g}s (test and demo clusters only: "
                        "every poll costs slurmctld RPCs).")
    s.add_argument("--slurm.timeout", dest="timeout", type=duration, default=duration("10s"), metavar="DURATION",
                   help="Limit for each command or HTTP request; a poll that exceeds it fails and the last good "
                        "snapshot stays.")
    s.add_argument("--slurm.bin-dir", dest="bin_dir", default="", metavar="DIR",
                   help="Directory of sinfo and squeue (default: PATH).")
    s.add_argument("--slurm.conf", dest="conf", default="", metavar="FILE",
                   help="slurm.conf for the commands (sets SLURM_CONF).")
    s.add_argument("--slurm.cli-format", dest="cli_format", choices=("auto", "json", "text"), default="auto",
                   help="auto: --json, falling back to formatted output once if --json is unavailable.")
    s.add_argument("--slurm.rest-url", dest="rest_url", default="", metavar="URL",
                   help="Read slurmrestd instead of running commands: http(s)://HOST:PORT or unix:///PATH.")
    s.add_argument("--slurm.token-file", dest="token_file", default="", metavar="FILE",
                   help="File with the JWT for slurmrestd (X-SLURM-USER-TOKEN); re-read when it changes.")
    s.add_argument("--slurm.user", dest="user", default="", metavar="NAME",
                   help="User name for slurmrestd (X-SLURM-USER-NAME).")
    s.add_argument("--slurm.rest-ca-file", dest="ca_file", default="", metavar="FILE",
                   help="CA bundle to verify an https slurmrestd.")
    add_log_arguments(p)
    p.add_argument("--version", action="version", version=f"gpufleet-slurm-exporter {version()}")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.poll_interval < MIN_POLL_INTERVAL and not args.allow_fast_poll:
        parser.error(f"--slurm.poll-interval {args.poll_interval:g}s is below {MIN_POLL_INTERVAL:g}s; "
                     "add --slurm.allow-fast-poll for a test cluster")
    if args.token_file and not args.rest_url:
        parser.error("--slurm.token-file needs --slurm.rest-url")
    return args


def make_source(args: argparse.Namespace) -> Source:
    if args.rest_url:
        return RestSource(args.rest_url, token_file=args.token_file, user=args.user, timeout=args.timeout,
                          ca_file=args.ca_file)
    return CliSource(bin_dir=args.bin_dir, conf=args.conf, timeout=args.timeout, fmt=args.cli_format)


class SlurmExporter(ServedAgent):
    """The collector, its runner and the HTTP server, started and stopped together."""

    def __init__(self, args: argparse.Namespace, source: Source | None = None):
        self.args = args
        web_config = load_web_config(args.web_config or None)
        self.collector = SlurmCollector(source or make_source(args))
        calls = len(self.collector.source.SOURCES)
        self.runner = CollectorRunner(self.collector, args.poll_interval, args.timeout * calls + 1.0, logger=log)
        self.agent = Agent([self.runner], version=version(), python_version=platform.python_version())
        self.server = ExporterServer(
            parse_listen_address(args.listen),
            metrics=self.exposition,
            landing=self._landing,
            health=lambda: (True, "ok"),
            telemetry_path=args.telemetry_path,
            web_config=web_config,
        )

    def exposition(self) -> bytes:
        return self.collector.exposition() + self.agent.exposition()

    def _landing(self) -> str:
        st = self.runner.state()
        detail = self.collector.status()
        if st.last_error:
            detail = f"{st.last_error}; {detail}"
        return landing_page(f"gpufleet-slurm-exporter {version()}", self.args.telemetry_path,
                            [("slurm", "ok" if st.success else "failing", detail)])



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        exporter = SlurmExporter(args)
    except (WebConfigError, ValueError, OSError) as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        return 2
    return run_until_signalled(exporter, log, address=exporter.server.url,
                               backend=exporter.collector.source.backend, poll_interval=args.poll_interval)


def all_metric_names() -> set[str]:
    return {s.name for s in SPECS}


if __name__ == "__main__":
    sys.exit(main())
