"""The collector runner: failures, hangs and garbage are data, never a broken scrape."""

from __future__ import annotations

import logging
import math
import threading

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from exporters.collector import Agent, Collector, CollectorRunner, MetricSpec, SampleBuilder, render
from tests.conftest import parse, value

SPEC = MetricSpec("test_value", "gauge", "A test value.", ("k",))


class Fixed(Collector):
    name = "fixed"
    specs = (SPEC,)

    def collect(self):
        b = self.builder()
        b.add("test_value", ("a",), 1.5)
        return b.families()


class Scripted(Collector):
    """Does what the test tells it to on each collection."""

    name = "scripted"
    specs = (SPEC,)

    def __init__(self):
        self.mode = "ok"
        self.release = threading.Event()
        self.entered = 0

    def collect(self):
        self.entered += 1
        if self.mode == "raise":
            raise RuntimeError("sysfs exploded")
        if self.mode == "hang":
            self.release.wait(30)
        if self.mode == "garbage":
            return {"not": "a list"}
        if self.mode == "garbage-item":
            return ["test_value 1"]
        b = self.builder()
        b.add("test_value", ("b",), 2)
        return b.families()


def make_agent(*collectors, timeout=0.3):
    runners = [CollectorRunner(c, interval=1.0, timeout=timeout) for c in collectors]
    return Agent(runners, version="test", python_version="3"), runners


def test_failing_collector_reports_zero_and_others_still_report(caplog):
    bad = Scripted()
    bad.mode = "raise"
    agent, runners = make_agent(Fixed(), bad)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            for r in runners:
                r.run_once()
    m = parse(agent.exposition())
    assert value(m, "gpufleet_exporter_collector_success", collector="fixed") == 1
    assert value(m, "gpufleet_exporter_collector_success", collector="scripted") == 0
    assert value(m, "gpufleet_exporter_collector_errors_total", collector="scripted") == 3
    assert value(m, "test_value", k="a") == 1.5
    assert not [lab for lab, _ in m["test_value"] if lab["k"] == "b"]
    failures = [r for r in caplog.records if r.getMessage() == "collector failed"]
    assert len(failures) == 1  # logged once per state change, not every interval
    assert failures[0].reason == "RuntimeError: sysfs exploded"


def test_recovery_is_logged_and_series_return(caplog):
    c = Scripted()
    agent, (r,) = make_agent(c)
    c.mode = "raise"
    r.run_once()
    c.mode = "ok"
    with caplog.at_level(logging.INFO):
        r.run_once()
    assert any(rec.getMessage() == "collector recovered" for rec in caplog.records)
    m = parse(agent.exposition())
    assert value(m, "gpufleet_exporter_collector_success", collector="scripted") == 1
    assert value(m, "test_value", k="b") == 2
    assert value(m, "gpufleet_exporter_collector_last_success_timestamp_seconds", collector="scripted") > 0


def test_hung_collection_is_abandoned_without_piling_up_threads():
    c = Scripted()
    agent, (r,) = make_agent(c, timeout=0.2)
    r.run_once()
    c.mode = "hang"
    r.run_once()  # returns after the timeout although collect() is still blocked
    st = r.state()
    assert not st.success and "timed out after 0.2s" in st.last_error
    for _ in range(3):
        r.run_once()
    assert c.entered == 2  # no second worker while the first is blocked
    assert "still blocked" in r.state().last_error
    m = parse(agent.exposition())  # the scrape is served at once
    assert value(m, "gpufleet_exporter_collector_success", collector="scripted") == 0
    assert "test_value" not in m
    c.mode = "ok"
    c.release.set()
    r._worker.join(5)
    r.run_once()
    assert r.state().success


@pytest.mark.parametrize("mode", ["garbage", "garbage-item"])
def test_garbage_is_rejected(mode):
    c = Scripted()
    c.mode = mode
    agent, (r,) = make_agent(c)
    r.run_once()
    st = r.state()
    assert not st.success and "returned" in st.last_error
    assert value(parse(agent.exposition()), "gpufleet_exporter_collector_success", collector="scripted") == 0


def test_render_matches_prometheus_client():
    g = GaugeMetricFamily("a_ratio", 'Help with "quotes" and \\ backslash\nnewline.', labels=["x", "y"])
    g.add_metric(['va"l', "line\nbreak"], 0.25)
    g.add_metric(["plain", "\\"], math.inf)
    c = CounterMetricFamily("b_things", "Things.", labels=["x"])
    c.add_metric(["1"], 3)
    n = GaugeMetricFamily("c_nan", "No labels.")
    n.add_metric([], math.nan)
    fams = [g, c, n]

    class Reg:
        def collect(self):
            return fams

    ours, theirs = parse(render(fams)), parse(generate_latest(Reg()))
    assert ours.keys() == theirs.keys()
    for name in ours:
        key = lambda s: sorted(s[0].items())  # noqa: E731
        a, b = sorted(ours[name], key=key), sorted(theirs[name], key=key)
        assert [x[0] for x in a] == [x[0] for x in b]
        assert all((math.isnan(x[1]) and math.isnan(y[1])) or x[1] == y[1] for x, y in zip(a, b, strict=True))
    assert b"# TYPE b_things_total counter" in render(fams)


def test_render_of_built_families_matches_prometheus_client_on_every_call():
    """The fast path (cached series heads, values rendered column-wise) writes what
    prometheus_client writes for the same samples: escapes, non-finite values, a family
    without labels, and series that appear, change value and vanish between calls."""
    specs = {s.name: s for s in (
        MetricSpec("t_ratio", "gauge", "Ratio.", ("a", "b")),
        MetricSpec("t_events_total", "counter", 'Events with "quotes".', ("x",)),
        MetricSpec("t_plain", "gauge", "No labels."))}
    rounds = [
        [("t_ratio", ('q"uote', "back\\slash"), 0.25), ("t_ratio", ("new\nline", ""), math.nan),
         ("t_ratio", ("p", "q"), -math.inf), ("t_events_total", ("1",), 3), ("t_plain", (), 1e21)],
        [("t_ratio", ("p", "q"), 7), ("t_ratio", ("fresh", "one"), 1e-7), ("t_events_total", ("1",), 4),
         ("t_events_total", ("2",), math.inf), ("t_plain", (), -0.0)],
    ]
    for samples in rounds:
        b = SampleBuilder(specs)
        for name, labels, v in samples:
            b.add(name, labels, v)
        fams = b.families()
        plain = []
        for f in fams:
            m = Metric(f.name, f.documentation, f.type)
            m.samples = f.samples
            plain.append(m)

        class Reg:
            def collect(self, plain=plain):
                return plain

        ours, theirs = parse(render(fams)), parse(generate_latest(Reg()))
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert [x[0] for x in ours[name]] == [x[0] for x in theirs[name]]
            assert all((math.isnan(x[1]) and math.isnan(y[1])) or x[1] == y[1]
                       for x, y in zip(ours[name], theirs[name], strict=True))
        assert sum(len(v) for v in ours.values()) == len(samples)


def test_scaled_rows_are_written_exactly_and_sampled_as_the_divided_value():
    """Integer milliseconds of a _seconds family are written as ``{n}e-3``: parsed back, the
    value is n / 1000 correctly rounded (n * 0.001 is not, for 1 in 6 values), and ``samples``
    give the same; a scaled family takes no samples of another scale."""
    spec = MetricSpec("t_wait_seconds_total", "counter", "Wait.", ("op",))
    b = SampleBuilder({spec.name: spec})
    ms = [0, 1, 7, 999, 1000, 12345, 596853, 2**63 + 1]
    b.scaled_rows(spec.name, -3).extend(((str(i),), n) for i, n in enumerate(ms))
    (fam,) = b.families()
    text = render([fam]).decode()
    assert 't_wait_seconds_total{op="5"} 12345e-3\n' in text
    got = {lab["op"]: v for lab, v in parse(text)["t_wait_seconds_total"]}
    assert got == {str(i): n / 1000 for i, n in enumerate(ms)}
    assert {s.labels["op"]: s.value for s in fam.samples} == got
    assert any(n / 1000 != n * 0.001 for n in ms)  # what the exact form avoids
    with pytest.raises(ValueError, match="scaled"):
        b.add(spec.name, ("x",), 1.0)
    with pytest.raises(ValueError, match="scale"):
        b.scaled_rows(spec.name, -6)
    with pytest.raises(ValueError, match="scaled"):
        b.rows(spec.name)


def test_specs_enforce_label_arity_and_counter_names():
    b = Fixed().builder()
    with pytest.raises(ValueError, match="expected labels"):
        b.add("test_value", ("a", "b"), 1)
    with pytest.raises(ValueError, match="_total"):
        MetricSpec("bad_counter", "counter", "x")
