"""The collector framework of the node agent.

Every collector samples in the background on its own thread; a scrape only
concatenates the exposition text each collector rendered after its last sample,
so scrape latency never depends on NVML, sysfs or a hung mount. A collector that
raises, hangs past its timeout or returns garbage is reported through
``gpufleet_exporter_collector_*`` and logged once per state change; its series
are withdrawn (stale numbers that look healthy are worse than none) and the
other collectors keep reporting.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

# histogram: only for documenting services whose metrics live in a prometheus_client registry.
METRIC_TYPES = ("gauge", "counter", "histogram")


@dataclass(frozen=True)
class MetricSpec:
    """Descriptor of one metric family: the single source for emission and docs."""

    name: str
    type: str
    help: str
    labels: tuple[str, ...] = ()
    # Which flag or condition enables it (for docs), e.g. "--gpu.dcgm-compat".
    condition: str = ""

    def __post_init__(self) -> None:
        if self.type not in METRIC_TYPES:
            raise ValueError(f"{self.name}: unknown metric type {self.type!r}")
        if self.type == "counter" and not self.name.endswith("_total") and not self.condition:
            raise ValueError(f"{self.name}: counters end in _total")


class SampleBuilder:
    """Collects samples for the families of a spec table and builds them.

    Emitting a name that has no spec is a programming error: every series the
    agent publishes is documented in docs/metrics.md from the same table.
    """

    def __init__(self, specs: Mapping[str, MetricSpec]):
        self._specs = specs
        self._rows: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        self._exponents: dict[str, int] = {}  # families filled by scaled_rows()

    def add(self, name: str, labels: Sequence[object], value: float) -> None:
        spec = self._specs[name]
        if len(labels) != len(spec.labels):
            raise ValueError(f"{name}: expected labels {spec.labels}, got {tuple(labels)}")
        rows = self._rows.get(name)
        if rows is None:
            rows = self._rows[name] = []
        elif name in self._exponents:
            raise ValueError(f"{name}: a family of scaled integers (scaled_rows) takes no other samples")
        # Integers stay integers: a counter renders exactly, and faster than a float's repr.
        rows.append((tuple(map(str, labels)), value if type(value) is int else float(value)))

    def rows(self, name: str) -> list[tuple[tuple[str, ...], float]]:
        """The family's row list, for hot loops that append ``(labels, value)``
        themselves: labels must be a tuple of ``str`` of the spec's arity, the
        value an ``int`` or a ``float`` (the checks ``add`` makes per sample are
        the caller's here)."""
        self._specs[name]  # noqa: B018 - an unknown name is a programming error, raise KeyError now
        rows = self._rows.get(name)
        if rows is None:
            rows = self._rows[name] = []
        elif name in self._exponents:
            raise ValueError(f"{name}: a family of scaled integers (scaled_rows) takes no other samples")
        return rows

    def scaled_rows(self, name: str, exponent: int) -> list[tuple[tuple[str, ...], int]]:
        """Like ``rows``, for a family whose values are integers in units of ``10**exponent``
        of the metric's unit (milliseconds of a ``_seconds`` metric: -3). They are written
        exactly, ``12345e-3``, where a float's repr (12.345) costs ten times as much, and the
        samples are the divided values. Every value of the family must come this way."""
        self._specs[name]  # noqa: B018 - an unknown name is a programming error, raise KeyError now
        rows = self._rows.get(name)
        if rows is None:
            rows = self._rows[name] = []
            self._exponents[name] = exponent
        elif self._exponents.get(name) != exponent:
            raise ValueError(f"{name}: samples with another scale than 10**{exponent}")
        return rows

    def families(self) -> list[Metric]:
        return [BuiltFamily(self._specs[name], rows, self._exponents.get(name, 0))
                for name, rows in self._rows.items() if rows]


class BuiltFamily(Metric):
    """A metric family from a SampleBuilder: rows of (label values, float).

    It is a prometheus_client ``Metric`` (``samples`` are produced on demand)
    whose rows render() writes directly, skipping a Sample and a dict per
    series: a node with NFS mounts and IB ports emits thousands of series
    every interval. dcgm-exporter-style counters without ``_total`` keep their
    name on the samples.
    """

    def __init__(self, spec: MetricSpec, rows: list[tuple[tuple[str, ...], float]], exponent: int = 0):
        counter = spec.type == "counter"
        suffixed = counter and spec.name.endswith("_total")
        super().__init__(spec.name.removesuffix("_total") if suffixed else spec.name, spec.help, spec.type)
        self.sample_name = spec.name
        self.labelnames = spec.labels
        self.rows = rows
        self.exponent = exponent  # values are integers times 10**exponent (SampleBuilder.scaled_rows)

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        e = self.exponent
        return [Sample(self.sample_name, dict(zip(self.labelnames, lv, strict=True)),
                       v if not e else v / 10**-e if e < 0 else v * 10**e) for lv, v in self.rows]

    @samples.setter
    def samples(self, _value: list[Sample]) -> None:
        """Metric.__init__ assigns an empty list; the rows are the samples."""


class Collector(ABC):
    """One source of metrics (node_exporter's collector interface, in Python).

    ``collect`` is called on a background thread every interval and returns
    metric families built from one consistent snapshot. It may raise: the runner
    turns that into ``collector_success 0``. Collectors that keep background
    threads or handles release them in ``close``.
    """

    name: str = ""
    specs: tuple[MetricSpec, ...] = ()

    @abstractmethod
    def collect(self) -> list[Metric]:
        """Sample the source and return the metric families."""

    def status(self) -> str:
        """A short human description for the landing page."""
        return ""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def builder(self) -> SampleBuilder:
        return SampleBuilder({s.name: s for s in self.specs})


class CollectorError(Exception):
    """A collector failed in a way it already explains in its message."""


def _escape_label(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


def _format_value(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


class _SeriesHeads(dict):
    """Label values -> ``\\nname{labels} `` of one sample name: the label part of a series is the
    same every interval, so it is escaped and formatted once, on the first lookup."""

    def __init__(self, sample_name: str, labelnames: Sequence[str]):
        super().__init__()
        self.sample_name, self.labelnames = sample_name, labelnames

    def __missing__(self, values: tuple[str, ...]) -> str:
        if not values:
            head = f"\n{self.sample_name} "
        else:
            lab = ",".join(f'{k}="{_escape_label(lv)}"' for k, lv in zip(self.labelnames, values, strict=True))
            head = f"\n{self.sample_name}{{{lab}}} "
        self[values] = head
        return head


_SERIES: dict[str, _SeriesHeads] = {}
_SERIES_PER_FAMILY = 50_000


def render(families: Iterable[Metric]) -> bytes:
    """Render families in the Prometheus text format (version 0.0.4).

    Equivalent to prometheus_client's generate_latest for gauges and counters
    (tests compare the two) at a fraction of its cost, which matters when an
    8-GPU node emits over a thousand series every interval.
    """
    # Each series is "\n" + head + value: the newline that ends a line is written before the next,
    # so a family's series are two lists (heads, values) interleaved without a string per line.
    out: list[str] = []
    for fam in families:
        built = isinstance(fam, BuiltFamily)
        sample_name = fam.sample_name if built else (fam.samples[0].name if fam.samples else fam.name)
        name = fam.name + "_total" if fam.type == "counter" and sample_name != fam.name else fam.name
        mtype = fam.type if fam.type in ("counter", "gauge", "histogram", "summary") else "untyped"
        doc = fam.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}")
        if not built:
            for s in fam.samples:
                lab = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels.items())
                out.append(f"\n{s.name}{{{lab}}} {_format_value(float(s.value))}" if lab
                           else f"\n{s.name} {_format_value(float(s.value))}")
            out.append("\n")
            continue
        heads = _SERIES.get(sample_name)
        if heads is None or len(heads) > _SERIES_PER_FAMILY:
            # Series come and go (jobs, mounts): a bounded cache per family, rebuilt when it fills.
            heads = _SERIES[sample_name] = _SeriesHeads(sample_name, fam.labelnames)
        if fam.rows:
            # Column by column, so that the per-series work is C loops (zip, map, slice assignment).
            keys, values = zip(*fam.rows, strict=True)
            if fam.exponent:  # integers in units of 10**exponent: "12345e-3"
                lines: list[str] = [""] * (3 * len(keys))
                lines[0::3] = map(heads.__getitem__, keys)
                lines[1::3] = map(repr, values)
                lines[2::3] = [f"e{fam.exponent}"] * len(keys)
            else:
                lines = [""] * (2 * len(keys))
                lines[0::2] = map(heads.__getitem__, keys)
                # repr() of an int or a finite float is what prometheus_client writes; NaN and the
                # infinities are spelled the exposition format's way.
                lines[1::2] = map(repr if all(map(math.isfinite, values)) else _format_value, values)
            out += lines
        out.append("\n")
    return "".join(out).encode()


def _check_families(result: object) -> list[Metric]:
    """Reject garbage before it reaches the exposition."""
    if not isinstance(result, list):
        raise CollectorError(f"returned {type(result).__name__}, not a list of metric families")
    for fam in result:
        if not isinstance(fam, Metric):
            raise CollectorError(f"returned {type(fam).__name__} among its metric families")
        if isinstance(fam, BuiltFamily):
            if fam.type == "counter" and any(math.isinf(v) for _, v in fam.rows):
                raise CollectorError(f"{fam.sample_name}: infinite counter")
            continue  # values were made floats when added
        for sample in fam.samples:
            if not isinstance(sample.value, int | float) or isinstance(sample.value, bool):
                raise CollectorError(f"{sample.name}: value {sample.value!r} is not a number")
            if math.isinf(sample.value) and fam.type == "counter":
                raise CollectorError(f"{sample.name}: infinite counter")
    return result


@dataclass
class CollectorState:
    success: bool = False
    duration: float = 0.0
    last_success: float = 0.0
    last_error: str | None = "not collected yet"
    errors_total: int = 0
    payload: bytes = b""
    started: float = field(default_factory=time.time)


class CollectorRunner:
    """Runs one collector on a schedule with a timeout; keeps its last snapshot.

    The collection itself runs on a worker thread so that a call that hangs
    (an NVML ioctl on a wedged GPU, statfs on a dead NFS server) is abandoned
    after ``timeout`` without blocking the schedule. While that call is still
    blocked no second worker is started, so threads never pile up.
    """

    def __init__(
        self,
        collector: Collector,
        interval: float,
        timeout: float,
        logger: logging.Logger | None = None,
        clock=time.time,
    ):
        self.collector = collector
        self.interval = interval
        self.timeout = timeout
        self.log = logger or logging.getLogger(f"gpufleet.collector.{collector.name}")
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CollectorState()
        self._worker: threading.Thread | None = None
        self._worker_started = 0.0
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_error: str | None = None
        self._ever_logged = False
        self.collections = 0

    # -- schedule ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name=f"collector-{self.collector.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        worker = self._worker
        if worker is None or not worker.is_alive():
            try:
                self.collector.close()
            except Exception:  # noqa: BLE001 - shutting down, log and go on
                self.log.exception("closing collector failed", extra={"collector": self.collector.name})

    def _loop(self) -> None:
        next_run = time.monotonic()
        while not self._stop.is_set():
            self.run_once()
            next_run += self.interval
            delay = next_run - time.monotonic()
            if delay < 0:  # fell behind (slow collection): do not burst to catch up
                next_run = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def run_once(self) -> None:
        """One collection, bounded by the timeout. Safe to call from tests."""
        if self._worker is not None and self._worker.is_alive():
            blocked = time.monotonic() - self._worker_started
            self._fail(f"previous collection still blocked after {blocked:.1f}s", count=False)
            return
        self._done.clear()
        self._worker_started = time.monotonic()
        self._worker = threading.Thread(
            target=self._collect_once, name=f"collect-{self.collector.name}", daemon=True
        )
        self._worker.start()
        if not self._done.wait(self.timeout):
            self._fail(f"collection timed out after {self.timeout:g}s")

    def _collect_once(self) -> None:
        t0 = time.monotonic()
        try:
            families = _check_families(self.collector.collect())
            payload = render(families)
        except Exception as exc:  # noqa: BLE001 - any failure is data, never a crash
            duration = time.monotonic() - t0
            msg = str(exc) if isinstance(exc, CollectorError) else f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._state.duration = duration
            self._fail(msg or type(exc).__name__)
            if not isinstance(exc, CollectorError):
                self.log.debug("collector traceback", exc_info=True, extra={"collector": self.collector.name})
        else:
            duration = time.monotonic() - t0
            with self._lock:
                st = self._state
                st.success = True
                st.duration = duration
                st.last_success = self._clock()
                st.last_error = None
                st.payload = payload
            self.collections += 1
            if self._logged_error is not None or not self._ever_logged:
                if self._logged_error is not None:
                    self.log.info(
                        "collector recovered", extra={"collector": self.collector.name}
                    )
                self._logged_error = None
                self._ever_logged = True
        finally:
            self._done.set()

    def _fail(self, reason: str, count: bool = True) -> None:
        with self._lock:
            st = self._state
            st.success = False
            st.last_error = reason
            st.payload = b""
            if count:
                st.errors_total += 1
        # Log once per state change: the same reason every interval is noise.
        if reason != self._logged_error and not reason.startswith("previous collection still blocked"):
            self.log.error(
                "collector failed", extra={"collector": self.collector.name, "reason": reason}
            )
            self._logged_error = reason
            self._ever_logged = True

    # -- scrape side ------------------------------------------------------
    def state(self) -> CollectorState:
        with self._lock:
            st = self._state
            return CollectorState(
                st.success, st.duration, st.last_success, st.last_error, st.errors_total, st.payload, st.started
            )


SELF_SPECS = (
    MetricSpec(
        "gpufleet_exporter_collector_success",
        "gauge",
        "1 if the collector's last collection succeeded within its timeout, 0 otherwise.",
        ("collector",),
    ),
    MetricSpec(
        "gpufleet_exporter_collector_duration_seconds",
        "gauge",
        "Duration of the collector's last completed collection.",
        ("collector",),
    ),
    MetricSpec(
        "gpufleet_exporter_collector_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the collector's last successful collection (0 if never).",
        ("collector",),
    ),
    MetricSpec(
        "gpufleet_exporter_collector_errors_total",
        "counter",
        "Collections that failed, timed out or returned garbage.",
        ("collector",),
    ),
    MetricSpec(
        "gpufleet_exporter_build_info",
        "gauge",
        "Version of the node agent, value 1.",
        ("version", "python_version"),
    ),
)


class Agent:
    """The set of running collectors, rendered together on scrape."""

    def __init__(self, runners: Sequence[CollectorRunner], version: str = "", python_version: str = ""):
        self.runners = list(runners)
        self.version = version
        self.python_version = python_version
        self._self_specs = {s.name: s for s in SELF_SPECS}

    def start(self) -> None:
        for r in self.runners:
            r.start()

    def stop(self) -> None:
        for r in self.runners:
            r.stop()

    def self_families(self) -> list[Metric]:
        b = SampleBuilder(self._self_specs)
        for r in self.runners:
            st = r.state()
            name = r.collector.name
            b.add("gpufleet_exporter_collector_success", (name,), 1 if st.success else 0)
            b.add("gpufleet_exporter_collector_duration_seconds", (name,), st.duration)
            b.add("gpufleet_exporter_collector_last_success_timestamp_seconds", (name,), st.last_success)
            b.add("gpufleet_exporter_collector_errors_total", (name,), st.errors_total)
        b.add("gpufleet_exporter_build_info", (self.version, self.python_version), 1)
        return b.families()

    def exposition(self) -> bytes:
        parts = [r.state().payload for r in self.runners]
        parts.append(render(self.self_families()))
        return b"".join(parts)
