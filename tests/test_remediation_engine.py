"""The remediation engine against the in-memory scheduler (remediation/memory.py).

Each guardrail, ownership, idempotency, dry-run, persistence across restarts,
reconciliation of a crash, the admin calls, the metrics, and concurrency. The same
engine meets real Slurm in the integration tests; here every scheduler state can be
set up exactly and every call the engine makes is visible.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from remediation.actuators.base import REASON_PREFIX, ActuatorError
from remediation.engine import GUARDRAILS, AdminError, Alert, Engine, normalize_timestamp, run_exec
from remediation.memory import MemoryActuator
from remediation.policy import ExecSpec, parse_policy
from remediation.store import Store
from tests.conftest import parse, value

# ---- helpers (also used by tests/test_remediation_properties.py) ----------------------------


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_policy(rules: Iterable[dict] | None = None, **top: Any):
    if rules is None:
        rules = [
            {"name": "drain", "match": {"remediation": "drain"}, "action": "drain", "cooldown": "0"},
            {"name": "reboot", "match": {"remediation": "reboot"}, "action": "reboot", "cooldown": "0"},
        ]
    doc: dict[str, Any] = {
        "caps": {"max_unavailable_ratio": 0.5, "max_unavailable_nodes": 100},
        "rate_limit": {"actions_per_hour": 3600, "burst": 1000},
        "breaker": {"failures_to_trip": 3, "cap_hits_to_trip": 1, "failure_window": "1h"},
        "flap": {"max_drains": 100, "window": "1d"},
        "rules": list(rules),
    }
    for key, val in top.items():
        if isinstance(val, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **val}
        else:
            doc[key] = val
    return parse_policy(doc, "test-policy")


def alert(
    node: str = "n1",
    *,
    name: str = "GpuXidHardwareInspection",
    remediation: str | None = "drain",
    status: str = "firing",
    starts: str = "2024-05-01T10:00:00Z",
    fingerprint: str | None = None,
    **labels: str,
) -> dict:
    lab = {"alertname": name, "severity": "critical", **labels}
    if node:
        lab["node"] = node
    if remediation:
        lab["remediation"] = remediation
    return {
        "status": status,
        "labels": lab,
        "annotations": {"summary": f"{name} summary"},
        "startsAt": starts,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-01T11:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint or f"fp-{name}-{node}",
    }


def payload(*alerts: dict, receiver: str = "gpufleet-remediation") -> dict:
    return {
        "version": "4",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        "status": "resolved" if all(a["status"] == "resolved" for a in alerts) else "firing",
        "receiver": receiver,
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
        "alerts": list(alerts),
    }


class Rig:
    """An engine, its store file, a memory scheduler and a clock."""

    def __init__(self, tmp_path: Path, policy=None, *, nodes=None, dry_run: bool = False, **engine_kw: Any):
        self.db = tmp_path / "remediation.db"
        self.clock = Clock()
        self.act = MemoryActuator(nodes if nodes is not None else {f"n{i}": ("gpu",) for i in range(1, 11)})
        self.policy = policy or make_policy()
        self.dry_run = dry_run
        self.engine_kw = engine_kw
        self.store = Store(self.db)
        self.engine = Engine(self.policy, self.store, self.act, dry_run=dry_run, clock=self.clock, **engine_kw)

    def send(self, *alerts: dict) -> dict:
        return self.engine.handle(payload(*alerts))

    def decisions(self, *alerts: dict) -> list[str]:
        return [d["decision"] for d in self.send(*alerts)["decisions"]]

    def restart(self, policy=None) -> Engine:
        self.store.close()
        self.store = Store(self.db)
        self.engine = Engine(policy or self.policy, self.store, self.act, dry_run=self.dry_run, clock=self.clock,
                             **self.engine_kw)  # fmt: skip
        return self.engine

    def metrics(self) -> dict:
        return parse(generate_latest(self.engine.registry))


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.store.close()


def only(result: dict) -> dict:
    assert len(result["decisions"]) == 1, result
    return result["decisions"][0]


# ---- deliveries ---------------------------------------------------------------------------------


def test_delivery_is_recorded_with_its_payload(rig):
    body = payload(alert("n1"))
    result = rig.engine.handle(body)
    stored = rig.store.delivery(result["delivery_id"])
    assert stored["payload"] == body
    assert stored["status"] == "processed" and stored["receiver"] == "gpufleet-remediation"


def test_delivery_is_recorded_even_when_deciding_crashes(tmp_path):
    class Broken(MemoryActuator):
        def nodes(self):
            raise RuntimeError("bug in an actuator")

    r = Rig(tmp_path)
    r.engine.actuator = Broken(["n1"])
    with pytest.raises(RuntimeError):
        r.send(alert("n1"))
    rows = r.store.query("SELECT status, error, payload FROM deliveries")
    assert len(rows) == 1 and rows[0]["status"] == "failed" and "bug in an actuator" in rows[0]["error"]
    assert json.loads(rows[0]["payload"])["alerts"][0]["labels"]["node"] == "n1"
    # the alert was not consumed: Alertmanager's retry is judged again
    r.engine.actuator = r.act
    assert r.decisions(alert("n1")) == ["acted"]


def test_empty_delivery(rig):
    assert rig.engine.handle(payload()) | {"decisions": []} == {
        "delivery_id": 1, "alerts": 0, "counts": {}, "retry": False, "decisions": [],
    }  # fmt: skip


def test_unmatched_alert_is_recorded_not_acted_on(rig):
    d = only(rig.send(alert("n1", name="GpuTemperatureHigh", remediation=None)))
    assert d["decision"] == "unmatched" and d["rule"] is None
    assert rig.act.mutations == []
    assert rig.store.alert(Alert.parse(alert("n1", name="GpuTemperatureHigh", remediation=None)).key)


def test_drain_acts_with_the_prefixed_reason(rig):
    d = only(rig.send(alert("n3")))
    assert d["decision"] == "acted" and d["action"] == "drain"
    st = rig.act.status_of("n3")
    assert st.unavailable and st.ours and st.reason.startswith(REASON_PREFIX)
    assert "GpuXidHardwareInspection on n3" in st.reason
    action = rig.store.action(d["action_id"])
    assert action["state"] == "done" and action["reason"] == st.reason
    assert json.loads(action["readback"])["state"] == "IDLE+DRAIN"
    assert rig.store.ownership("n3")["action_id"] == d["action_id"]


def test_reboot_acts(rig):
    d = only(rig.send(alert("n2", name="GpuLost", remediation="reboot")))
    assert d["decision"] == "acted" and d["action"] == "reboot"
    assert rig.act.mutations == [("reboot", "n2", rig.act.status_of("n2").reason)]


def test_notify_records_only(tmp_path):
    r = Rig(tmp_path, make_policy([{"name": "tell", "match": {"severity": "critical"}, "action": "notify"}]))
    d = only(r.send(alert("n1")))
    assert (d["decision"], d["action"]) == ("acted", "notify")
    assert r.act.mutations == []


def test_alert_without_node_label_is_declined(rig):
    d = only(rig.send(alert("")))
    assert d["decision"] == "declined" and "no node label" in d["reason"]


# ---- idempotency ------------------------------------------------------------------------------


def test_duplicate_in_one_delivery_and_resend_act_once(rig):
    a = alert("n1")
    assert rig.decisions(a, a) == ["acted", "duplicate"]
    assert rig.decisions(a) == ["duplicate"]  # repeat_interval resend
    assert len(rig.act.mutations) == 1
    assert rig.store.scalar("SELECT COUNT(*) FROM decisions WHERE decision = 'duplicate'") == 2


def test_ha_pair_with_differently_spelled_starts_at_acts_once(rig):
    first = alert("n1", starts="2024-05-01T10:00:00Z")
    peer = alert("n1", starts="2024-05-01T12:00:00.000000000+02:00")
    assert rig.decisions(first) == ["acted"]
    assert rig.decisions(peer) == ["duplicate"]
    assert len(rig.act.mutations) == 1


def test_normalized_timestamps():
    assert normalize_timestamp("2024-05-01T10:00:00.5Z") == "2024-05-01T10:00:00.500000000Z"
    assert normalize_timestamp("2024-05-01T12:00:00+02:00") == "2024-05-01T10:00:00.000000000Z"
    assert normalize_timestamp("not a time") == "not a time"


def test_new_firing_of_the_same_alert_is_a_new_key(rig):
    rig.send(alert("n1"))
    rig.act.admin_resume("n1")  # a human resumed it
    assert rig.decisions(alert("n1", starts="2024-05-02T10:00:00Z")) == ["acted"]
    assert len(rig.act.mutations) == 2


def test_stale_firing_after_resolution_is_a_duplicate(rig):
    a = alert("n1")
    rig.send(a)
    rig.send({**a, "status": "resolved"})
    rig.act.admin_resume("n1")
    assert rig.decisions(a) == ["duplicate"]
    assert rig.decisions({**a, "status": "resolved"}) == ["duplicate"]
    assert len(rig.act.mutations) == 1


def test_missing_fingerprint_is_derived_from_labels(rig):
    a = alert("n1")
    a["fingerprint"] = ""
    assert rig.decisions(a, a) == ["acted", "duplicate"]


# ---- guardrails in order ------------------------------------------------------------------------


def test_guardrail_order_is_documented():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "remediation.md").read_text()
    section = doc[doc.index("## Guardrails, in order") :]
    section = section[: section.index("\n## ")]
    positions = [section.index(f"{i}. `{g}`") for i, g in enumerate(GUARDRAILS, 1)]
    assert positions == sorted(positions)


def test_paused_declines_and_a_resend_after_unpause_acts(rig):
    rig.engine.pause("alice")
    d = only(rig.send(alert("n1")))
    assert d["decision"] == "declined" and "paused by alice" in d["reason"]
    assert rig.act.mutations == []
    rig.engine.unpause("alice")
    assert rig.decisions(alert("n1")) == ["acted"]


def test_paused_wins_over_dry_run(tmp_path):
    r = Rig(tmp_path, dry_run=True)
    r.engine.pause("bob")
    assert only(r.send(alert("n1")))["decision"] == "declined"


@pytest.mark.parametrize("where", ["engine", "policy", "rule"])
def test_dry_run_is_truly_dry(tmp_path, where):
    rules = [{"name": "drain", "match": {"remediation": "drain"}, "action": "drain", "dry_run": where == "rule"}]
    policy = make_policy(rules, dry_run=where == "policy")
    r = Rig(tmp_path, policy, dry_run=where == "engine")
    d = only(r.send(alert("n1")))
    assert d["decision"] == "dry_run"
    assert "would drain n1 with reason 'gpufleet: GpuXidHardwareInspection on n1'" in d["reason"]
    assert r.act.mutations == []
    assert all(op in ("nodes", "node") for op, _ in r.act.calls)
    assert r.store.actions() == [] and r.store.owned_nodes() == []
    assert r.store.bucket() is None  # no token taken
    # once audited, a resend is a duplicate (one audit per firing)
    assert r.decisions(alert("n1")) == ["duplicate"]


def test_dry_run_reports_what_a_guardrail_would_decline(tmp_path):
    r = Rig(tmp_path, make_policy(caps={"max_unavailable_nodes": 1}), dry_run=True)
    r.act.admin_drain("n2")
    d = only(r.send(alert("n1")))
    assert d["decision"] == "dry_run" and "would decline: cap:" in d["reason"]
    assert not r.store.breaker()["open"]  # nothing counted in dry-run
    assert r.store.query("SELECT * FROM breaker_events") == []
    d = only(r.send(alert("n2", name="Other")))
    assert "would decline: already unavailable" in d["reason"]


def test_dry_run_never_creates_pending_approvals(tmp_path):
    rules = [{"name": "ask", "match": {"remediation": "drain"}, "action": "drain", "requires_approval": True}]
    r = Rig(tmp_path, make_policy(rules), dry_run=True)
    d = only(r.send(alert("n1")))
    assert d["decision"] == "dry_run" and "would wait for approval" in d["reason"]
    assert r.store.actions() == []


def test_dry_run_resolution_schedules_nothing_and_resume_is_dry(tmp_path):
    rules = [{"name": "soft", "match": {"remediation": "drain"}, "action": "drain", "auto_resume": True}]
    r = Rig(tmp_path, make_policy(rules))
    r.send(alert("n1"))
    r.restart()
    r.engine._dry_run = True
    d = only(r.send({**alert("n1"), "status": "resolved"}))
    assert "dry-run" in d["reason"] and r.store.actions(state="scheduled") == []
    out = r.engine.resume("n1", "alice")
    assert out["decision"] == "dry_run"
    assert r.act.status_of("n1").ours  # still drained
    assert [m[0] for m in r.act.mutations] == ["drain"]


def test_unknown_node_is_declined(rig):
    d = only(rig.send(alert("ghost")))
    assert d["decision"] == "declined" and "unknown to the scheduler" in d["reason"]


def test_foreign_drain_is_recorded_and_never_overwritten(rig):
    rig.act.admin_drain("n1", "hw: DIMM replacement (ticket 42)")
    d = only(rig.send(alert("n1")))
    assert d["decision"] == "declined"
    assert "already unavailable" in d["reason"] and "someone else" in d["reason"]
    assert rig.act.status_of("n1").reason == "hw: DIMM replacement (ticket 42)"
    assert not any(op in ("drain", "reboot") for op, _ in rig.act.calls)
    # and the resolution never resumes it
    only(rig.send({**alert("n1"), "status": "resolved"}))
    rig.clock.advance(86400)
    rig.engine.tick()
    assert rig.act.status_of("n1").reason == "hw: DIMM replacement (ticket 42)"
    assert rig.act.mutations == []


def test_down_node_counts_as_unavailable(rig):
    rig.act.set_down("n1")
    assert "already unavailable: DOWN" in only(rig.send(alert("n1")))["reason"]


def test_second_alert_on_our_node_is_already_unavailable(rig):
    rig.send(alert("n1"))
    d = only(rig.send(alert("n1", name="GpuRowRemapFailed")))
    assert d["decision"] == "declined" and "taken out by gpufleet" in d["reason"]
    assert len(rig.act.mutations) == 1


def test_cooldown_spaces_actions_on_a_node(tmp_path):
    rules = [{"name": "drain", "match": {"remediation": "drain"}, "action": "drain", "cooldown": "1h"}]
    r = Rig(tmp_path, make_policy(rules))
    r.send(alert("n1"))
    r.act.admin_resume("n1")
    r.clock.advance(1800)
    d = only(r.send(alert("n1", starts="2024-05-01T11:00:00Z")))
    assert d["decision"] == "declined" and d["reason"].startswith("cooldown: the last action on n1 was 30m ago")
    r.clock.advance(1801)
    # a declined firing is judged again on the next resend
    assert r.decisions(alert("n1", starts="2024-05-01T11:00:00Z")) == ["acted"]


def test_cooldown_is_per_node(tmp_path):
    rules = [{"name": "drain", "match": {"remediation": "drain"}, "action": "drain", "cooldown": "1h"}]
    r = Rig(tmp_path, make_policy(rules))
    assert r.decisions(alert("n1"), alert("n2")) == ["acted", "acted"]


def test_rate_limit_token_bucket(tmp_path):
    r = Rig(tmp_path, make_policy(rate_limit={"actions_per_hour": 2, "burst": 2}))
    assert r.decisions(alert("n1"), alert("n2"), alert("n3")) == ["acted", "acted", "declined"]
    d = r.engine.history(limit=1)[0]
    assert d["reason"].startswith("rate limit: 2 actions/hour (burst 2) used up; next token in 30m")
    r.clock.advance(1800)
    assert r.decisions(alert("n3")) == ["acted"]
    assert r.decisions(alert("n4")) == ["declined"]
    r.clock.advance(7200)  # refills to the burst, not beyond
    assert r.decisions(alert("n4"), alert("n5"), alert("n6")) == ["acted", "acted", "declined"]


def test_rate_limit_survives_a_restart(tmp_path):
    r = Rig(tmp_path, make_policy(rate_limit={"actions_per_hour": 1, "burst": 1}))
    assert r.decisions(alert("n1")) == ["acted"]
    r.restart()
    assert r.decisions(alert("n2")) == ["declined"]


def test_partition_ratio_cap_counts_every_unavailable_node(tmp_path):
    r = Rig(tmp_path, make_policy(caps={"max_unavailable_ratio": 0.2}, breaker={"cap_hits_to_trip": 0}))
    r.act.admin_drain("n9")  # someone else's drain counts too
    assert r.decisions(alert("n1"), alert("n2"), alert("n3")) == ["acted", "declined", "declined"]
    d = r.engine.history(limit=1)[0]
    assert "cap: partition gpu: 3 of 10 nodes would be unavailable, at most 2 allowed (20%)" in d["reason"]
    assert r.act.unavailable_count("gpu") == 2


def test_absolute_cap_across_partitions(tmp_path):
    nodes = {f"a{i}": ("a",) for i in range(10)} | {f"b{i}": ("b",) for i in range(10)}
    r = Rig(tmp_path, make_policy(caps={"max_unavailable_ratio": 1.0, "max_unavailable_nodes": 3},
                                  breaker={"cap_hits_to_trip": 0}), nodes=nodes)  # fmt: skip
    r.act.set_down("b9")
    assert r.decisions(alert("a1"), alert("b1"), alert("a2")) == ["acted", "acted", "declined"]
    assert "max_unavailable_nodes is 3" in r.engine.history(limit=1)[0]["reason"]


def test_partition_override_and_multi_partition_nodes(tmp_path):
    nodes = {f"g{i}": ("gpu",) for i in range(10)} | {"d0": ("debug", "gpu"), "d1": ("debug",)}
    r = Rig(tmp_path, make_policy(caps={"max_unavailable_ratio": 0.1, "partition_overrides": {"debug": 0.5}},
                                  breaker={"cap_hits_to_trip": 0}), nodes=nodes)  # fmt: skip
    # d0 counts in both partitions: gpu has 11 nodes (limit 1), debug 2 (limit 1)
    assert r.decisions(alert("d0")) == ["acted"]
    assert r.decisions(alert("d1"), alert("g1")) == ["declined", "declined"]


def test_cap_hit_trips_the_breaker(tmp_path):
    r = Rig(tmp_path, make_policy(caps={"max_unavailable_nodes": 1}))
    assert r.decisions(alert("n1"), alert("n2")) == ["acted", "declined"]
    assert r.store.breaker()["open"]
    assert r.engine.status()["breaker"]["cap_hits_in_window"] == 1
    r.act.admin_resume("n1")  # capacity is back, but the breaker holds until a human resets it
    d = only(r.send(alert("n3")))
    assert d["decision"] == "declined" and "circuit breaker open" in d["reason"]
    r.engine.reset_breaker("carol")
    assert r.decisions(alert("n3")) == ["acted"]


def test_failures_trip_the_breaker_which_blocks_new_drains_only(tmp_path):
    rules = [{"name": "soft", "match": {"remediation": "drain"}, "action": "drain", "auto_resume": True,
              "resume_hold_down": "5m", "cooldown": "0"}]  # fmt: skip
    r = Rig(tmp_path, make_policy(rules))
    r.send(alert("n9"))  # ours, to be auto-resumed later
    r.send({**alert("n9"), "status": "resolved"})
    r.act.fail("drain", 3)
    assert r.decisions(alert("n1"), alert("n2"), alert("n3")) == ["failed"] * 3
    status = r.engine.status()["breaker"]
    assert status["open"] and status["failures_in_window"] == 3 and "3 action failures within 1h" in status["reason"]
    assert r.decisions(alert("n4")) == ["declined"]
    # recording goes on and resumes go on while the breaker is open
    r.clock.advance(301)
    tick = r.engine.tick()
    assert [d["decision"] for d in tick["decisions"]] == ["acted"]
    assert not r.act.status_of("n9").unavailable


def test_breaker_and_its_window_counts_survive_restarts(tmp_path):
    r = Rig(tmp_path)
    r.act.fail("drain", 2)
    assert r.decisions(alert("n1"), alert("n2")) == ["failed", "failed"]
    r.restart()
    assert not r.store.breaker()["open"]
    r.act.fail("drain", 1)
    assert r.decisions(alert("n3")) == ["failed"]  # the third failure in the window, across a restart
    r.restart()
    assert r.engine.status()["breaker"]["open"]
    assert r.decisions(alert("n4")) == ["declined"]
    assert value(r.metrics(), "gpufleet_remediation_breaker_open") == 1


def test_breaker_window_expires_and_reset_forgets_old_events(tmp_path):
    r = Rig(tmp_path)
    r.act.fail("drain", 2)
    r.send(alert("n1"), alert("n2"))
    r.clock.advance(3601)  # outside the window
    r.act.fail("drain", 2)
    r.send(alert("n3"), alert("n4"))
    assert not r.store.breaker()["open"]
    r.act.fail("drain", 1)
    r.send(alert("n5"))
    assert r.store.breaker()["open"]
    r.engine.reset_breaker("dave")
    r.act.fail("drain", 1)
    r.send(alert("n6"))  # events before the reset no longer count
    assert not r.store.breaker()["open"]
    assert r.engine.status()["breaker"]["failures_in_window"] == 1


def test_transient_failure_is_judged_again_on_resend(rig):
    rig.act.fail("drain", 1, transient=True)
    d = only(rig.send(alert("n1")))
    assert d["decision"] == "failed" and "a resend is judged again" in d["reason"]
    assert rig.decisions(alert("n1")) == ["acted"]


def test_permanent_failure_is_final(rig):
    rig.act.fail("drain", 1, transient=False)
    assert rig.decisions(alert("n1")) == ["failed"]
    assert rig.decisions(alert("n1")) == ["duplicate"]


def test_unreadable_scheduler_asks_for_a_retry(rig):
    rig.act.reachable = False
    result = rig.send(alert("n1"), alert("n2"))
    assert result["retry"] is True and [d["decision"] for d in result["decisions"]] == ["failed", "failed"]
    assert [op for op, _ in rig.act.calls] == ["nodes"]  # one try per delivery, not one timeout per alert
    rig.act.reachable = True
    assert rig.decisions(alert("n1"), alert("n2")) == ["acted", "acted"]


def test_readback_that_does_not_show_our_drain_is_a_failure(tmp_path):
    class Liar(MemoryActuator):
        def drain(self, node, reason):
            super().drain(node, reason)
            self.admin_resume(node)
            return self.status_of(node)

    r = Rig(tmp_path)
    r.engine.actuator = Liar(["n1", "n2", "n3"])
    d = only(r.send(alert("n1")))
    assert d["decision"] == "failed" and "read-back does not show our drain" in d["reason"]
    assert r.store.ownership("n1") is None


def test_race_with_a_foreign_drain_is_refused_by_the_actuator(tmp_path):
    class Racy(MemoryActuator):
        def nodes(self):
            view = super().nodes()
            if len([c for c in self.calls if c[0] == "nodes"]) == 2:  # right before acting
                self.admin_drain("n1", "admin got there first")
            return view

    r = Rig(tmp_path)
    r.engine.actuator = act = Racy(["n1", "n2", "n3"])
    d = only(r.send(alert("n1")))
    assert d["decision"] == "failed" and "not overwritten" in d["reason"]
    assert act.status_of("n1").reason == "admin got there first"


# ---- flap detection -------------------------------------------------------------------------


def soft_rule(**over) -> dict:
    return {"name": "soft", "match": {"remediation": "drain"}, "action": "drain", "auto_resume": True,
            "resume_hold_down": "10m", "cooldown": "0", **over}  # fmt: skip


def cycle(r: Rig, n: int) -> None:
    """Fire, resolve and let the hold-down pass, as a flapping fault does."""
    starts = f"2024-05-01T{10 + n:02d}:00:00Z"
    r.send(alert("n1", starts=starts))
    r.send({**alert("n1", starts=starts), "status": "resolved"})
    r.clock.advance(601)
    r.engine.tick()


def test_flapping_node_is_not_auto_resumed_again(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()], flap={"max_drains": 3, "window": "1d"}))
    cycle(r, 0)
    cycle(r, 1)
    assert not r.act.status_of("n1").unavailable  # resumed twice
    cycle(r, 2)
    st = r.act.status_of("n1")
    assert st.unavailable and st.ours  # the third drain stays: a human looks at it
    assert r.engine.status()["flapping"][0]["node"] == "n1"
    last = r.engine.history(limit=3, node="n1")
    assert any("flapping" in h["reason"] for h in last)
    r.engine.resume("n1", "erin")  # a human clears it
    assert r.engine.status()["flapping"] == []


def test_flap_window_forgets_old_drains(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()], flap={"max_drains": 2, "window": "1h"}))
    cycle(r, 0)
    r.clock.advance(3600)
    cycle(r, 1)
    assert not r.act.status_of("n1").unavailable


def test_flapping_reboot_becomes_a_drain(tmp_path):
    r = Rig(tmp_path, make_policy(flap={"max_drains": 2, "window": "1d"}))
    a1 = alert("n1", name="GpuLost", remediation="reboot")
    r.send(a1)
    r.act.finish_reboot("n1")
    a2 = alert("n1", name="GpuLost", remediation="reboot", starts="2024-05-01T12:00:00Z")
    d = only(r.send(a2))
    assert d["action"] == "drain" and "drained instead of rebooted" in d["reason"]
    assert r.act.status_of("n1").state == "IDLE+DRAIN"
    assert r.store.ownership("n1")["auto_resume"] == 0


# ---- auto-resume and ownership ------------------------------------------------------------------


def test_auto_resume_after_the_hold_down(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()]))
    r.send(alert("n1"))
    d = only(r.send({**alert("n1"), "status": "resolved"}))
    assert d["decision"] == "resolved" and "scheduled" in d["reason"]
    r.clock.advance(599)
    assert r.engine.tick()["decisions"] == []
    assert r.act.status_of("n1").unavailable
    r.clock.advance(2)
    assert [x["decision"] for x in r.engine.tick()["decisions"]] == ["acted"]
    assert not r.act.status_of("n1").unavailable
    assert r.store.ownership("n1") is None
    assert r.engine.tick() == {"due": 0, "decisions": []}


def test_refire_during_the_hold_down_cancels_the_resume(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()]))
    r.send(alert("n1"))
    r.send({**alert("n1"), "status": "resolved"})
    r.clock.advance(300)
    d = only(r.send(alert("n1", starts="2024-05-01T11:00:00Z")))
    assert "already unavailable" in d["reason"]
    assert r.store.actions(action="resume")[0]["state"] == "cancelled"
    r.clock.advance(3600)
    r.engine.tick()
    assert r.act.status_of("n1").unavailable


def test_no_resume_while_another_alert_still_fires_on_the_node(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()]))
    r.send(alert("n1"), alert("n1", name="GpuRowRemapFailed"))
    d = only(r.send({**alert("n1"), "status": "resolved"}))
    assert "still firing" in d["reason"] and "GpuRowRemapFailed" in d["reason"]
    d = only(r.send({**alert("n1", name="GpuRowRemapFailed"), "status": "resolved"}))
    assert "scheduled" in d["reason"]


def test_a_hardware_rule_on_our_node_keeps_it_for_a_human(tmp_path):
    rules = [soft_rule(match={"remediation": "drain", "kind": "soft"}),
             {"name": "hw", "match": {"remediation": "drain"}, "action": "drain", "cooldown": "0"}]  # fmt: skip
    r = Rig(tmp_path, make_policy(rules))
    r.send(alert("n1", kind="soft"))
    r.send(alert("n1", name="GpuRowRemapFailed"))
    r.send({**alert("n1", name="GpuRowRemapFailed"), "status": "resolved"})
    d = only(r.send({**alert("n1", kind="soft"), "status": "resolved"}))
    assert "not auto-resumed" in d["reason"]


def test_non_auto_resume_rule_stays_drained(rig):
    rig.send(alert("n1"))
    d = only(rig.send({**alert("n1"), "status": "resolved"}))
    assert "not auto-resumed; a human resumes it" in d["reason"]
    rig.clock.advance(86400)
    rig.engine.tick()
    assert rig.act.status_of("n1").unavailable


def test_scheduled_resume_is_dropped_when_someone_else_took_the_node(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()]))
    r.send(alert("n1"))
    r.send({**alert("n1"), "status": "resolved"})
    r.act.admin_drain("n1", "admin: keep it out")  # an admin re-drains with their own reason
    r.clock.advance(601)
    r.engine.tick()
    assert r.store.actions(action="resume")[0]["state"] == "cancelled"
    d = r.engine.history(limit=1)[0]
    assert d["decision"] == "declined" and "cancelled: node is no longer ours" in d["reason"]
    assert r.act.status_of("n1").reason == "admin: keep it out"
    assert not any(op == "resume" for op, _ in r.act.calls)


def test_scheduled_resume_waits_while_paused_and_while_the_scheduler_is_down(tmp_path):
    r = Rig(tmp_path, make_policy([soft_rule()]))
    r.send(alert("n1"))
    r.send({**alert("n1"), "status": "resolved"})
    r.clock.advance(601)
    r.engine.pause("frank")
    assert r.engine.tick()["paused"] is True
    r.engine.unpause("frank")
    r.act.fail("node", 1)
    assert r.engine.tick()["decisions"] == []
    assert r.store.actions(state="scheduled")
    assert [d["decision"] for d in r.engine.tick()["decisions"]] == ["acted"]


def test_admin_resume_refuses_a_foreign_drain(rig):
    rig.act.admin_drain("n1", "admin: firmware update")
    with pytest.raises(AdminError) as err:
        rig.engine.resume("n1", "alice")
    assert err.value.code == "conflict" and "not taken out by gpufleet" in str(err.value)
    assert rig.act.status_of("n1").reason == "admin: firmware update"
    with pytest.raises(AdminError) as err:
        rig.engine.resume("n5", "alice")  # available: nothing of ours either
    with pytest.raises(AdminError) as err:
        rig.engine.resume("ghost", "alice")
    assert err.value.code == "not_found"
    assert [a["what"] for a in rig.engine.audit()] == ["resume-refused"] * 3


def test_admin_resume_of_our_drain(rig):
    rig.send(alert("n1"))
    out = rig.engine.resume("n1", "alice")
    assert out["decision"] == "acted" and out["action"] == "resume"
    assert not rig.act.status_of("n1").unavailable
    assert rig.store.ownership("n1") is None
    assert rig.engine.audit(1)[0]["who"] == "alice"
    h = rig.engine.history(limit=1)[0]
    assert h["who"] == "alice" and h["action_requested_by"] == "alice" and h["action_state"] == "done"


def test_ownership_is_released_when_someone_else_resumes(rig):
    rig.send(alert("n1"))
    assert value(rig.metrics(), "gpufleet_remediation_nodes_drained") == 1
    rig.act.admin_resume("n1")
    rig.send(alert("n2", name="Other"))  # a delivery that reads the scheduler notices
    assert rig.store.ownership("n1") is None
    assert [o["node"] for o in rig.engine.status()["owned_nodes"]] == ["n2"]


def test_tick_notices_released_nodes_without_alerts(rig):
    rig.send(alert("n1"))
    rig.act.admin_resume("n1")
    rig.engine.tick()
    assert value(rig.metrics(), "gpufleet_remediation_nodes_drained") == 0


# ---- approvals ----------------------------------------------------------------------------------


def approval_rig(tmp_path, **top) -> Rig:
    rules = [{"name": "ask", "match": {"remediation": "drain"}, "action": "drain", "requires_approval": True,
              "cooldown": "0"}]  # fmt: skip
    return Rig(tmp_path, make_policy(rules, **top))


def test_approval_flow(tmp_path):
    r = approval_rig(tmp_path)
    d = only(r.send(alert("n1")))
    assert d["decision"] == "pending_approval" and r.act.mutations == []
    assert r.engine.status()["pending_approvals"][0]["id"] == d["action_id"]
    assert value(r.metrics(), "gpufleet_remediation_pending_approvals") == 1
    assert r.decisions(alert("n1")) == ["duplicate"]
    out = r.engine.approve(d["action_id"], "grace")
    assert out["decision"] == "acted" and out["state"] == "done" and out["action_id"] == d["action_id"]
    assert r.act.status_of("n1").ours
    assert r.store.query("SELECT verdict, who FROM approvals") == [{"verdict": "approved", "who": "grace"}]
    with pytest.raises(AdminError, match="is done, not pending"):
        r.engine.approve(d["action_id"], "grace")
    with pytest.raises(AdminError) as err:
        r.engine.approve(999, "grace")
    assert err.value.code == "not_found"


def test_deny(tmp_path):
    r = approval_rig(tmp_path)
    d = only(r.send(alert("n1")))
    out = r.engine.deny(d["action_id"], "heidi")
    assert out["state"] == "cancelled" and "denied by heidi" in out["reason"]
    assert r.act.mutations == [] and r.engine.status()["pending_approvals"] == []


def test_approval_rechecks_caps(tmp_path):
    r = approval_rig(tmp_path, caps={"max_unavailable_nodes": 1})
    d = only(r.send(alert("n1")))
    r.act.admin_drain("n2")  # capacity used up while the approval waited
    out = r.engine.approve(d["action_id"], "ivan")
    assert out["decision"] == "declined" and "cap:" in out["reason"] and out["state"] == "cancelled"
    assert r.act.mutations == []


def test_approval_refused_while_paused(tmp_path):
    r = approval_rig(tmp_path)
    d = only(r.send(alert("n1")))
    r.engine.pause("judy")
    with pytest.raises(AdminError, match="paused"):
        r.engine.approve(d["action_id"], "judy")
    assert r.store.action(d["action_id"])["state"] == "pending"


def test_resolution_cancels_a_pending_approval(tmp_path):
    r = approval_rig(tmp_path)
    d = only(r.send(alert("n1")))
    r.send({**alert("n1"), "status": "resolved"})
    assert r.store.action(d["action_id"])["state"] == "cancelled"
    with pytest.raises(AdminError, match="cancelled, not pending"):
        r.engine.approve(d["action_id"], "ken")


# ---- reconcile after a crash ------------------------------------------------------------------


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs (not an Exception, so nothing catches it)."""


def test_crash_after_the_scheduler_acted_is_reconciled_as_done(tmp_path):
    class DiesAfter(MemoryActuator):
        def drain(self, node, reason):
            super().drain(node, reason)
            raise Crash

    r = Rig(tmp_path)
    r.engine.actuator = act = DiesAfter(["n1", "n2", "n3"])
    with pytest.raises(Crash):
        r.send(alert("n1"))
    assert r.store.actions()[0]["state"] == "intent"  # committed before acting
    r.act = act
    r.restart()
    summary = r.engine.reconcile()
    assert summary["done"] == [1] and summary["interrupted_deliveries"] == 1
    assert r.store.actions()[0]["state"] == "done"
    assert r.store.ownership("n1")["action_id"] == 1
    assert len(act.mutations) == 1
    # Alertmanager's retry of the same delivery does not act again
    assert r.decisions(alert("n1")) == ["duplicate"]
    assert len(act.mutations) == 1
    assert r.store.query("SELECT status FROM deliveries ORDER BY id")[0]["status"] == "interrupted"


def test_crash_before_the_scheduler_acted_is_reconciled_as_failed_and_not_repeated(tmp_path):
    class DiesBefore(MemoryActuator):
        def drain(self, node, reason):
            raise Crash

    r = Rig(tmp_path)
    r.engine.actuator = DiesBefore(["n1", "n2", "n3"])
    with pytest.raises(Crash):
        r.send(alert("n1"))
    act = MemoryActuator(["n1", "n2", "n3"])
    r.act = act
    r.restart()
    summary = r.engine.reconcile()
    assert summary["failed"] == [1]
    assert act.mutations == []  # reconcile never repeats an action
    action = r.store.actions()[0]
    assert action["state"] == "failed" and "not repeated" in action["outcome"]
    # a resend is judged again through every guardrail (here: it acts)
    assert r.decisions(alert("n1")) == ["acted"]


def test_reconcile_leaves_intents_it_cannot_check(tmp_path):
    r = Rig(tmp_path)
    r.store.add_action(node="n1", action="drain", reason="gpufleet: x", state="intent", created_at=1.0)
    r.act.fail("node", 1)
    assert r.engine.reconcile()["unresolved"] == [1]
    assert r.engine.reconcile()["failed"] == [1]


def test_reconcile_of_an_interrupted_resume(tmp_path):
    r = Rig(tmp_path)
    r.send(alert("n1"), alert("n2"))
    r.store.add_action(node="n1", action="resume", reason="", state="intent", created_at=1.0)
    r.store.add_action(node="n2", action="resume", reason="", state="intent", created_at=1.0)
    r.act.admin_resume("n2")  # this one reached the scheduler
    summary = r.engine.reconcile()
    assert summary["failed"] == [3] and summary["done"] == [4]
    assert r.act.status_of("n1").ours  # not repeated


def test_reconcile_adopts_our_drains_without_a_record(tmp_path):
    r = Rig(tmp_path)
    r.act.drain("n4", "gpufleet: from a lost database")
    summary = r.engine.reconcile()
    assert summary["adopted"] == ["n4"]
    own = r.store.ownership("n4")
    assert own["auto_resume"] == 0
    r.engine.resume("n4", "leo")
    assert not r.act.status_of("n4").unavailable


# ---- queries and metrics ------------------------------------------------------------------------


def test_history_is_newest_first_and_filters_by_node(rig):
    rig.send(alert("n1"), alert("n2"))
    rig.send(alert("n1"))
    h = rig.engine.history()
    assert [x["decision"] for x in h] == ["duplicate", "acted", "acted"]
    assert [x["node"] for x in rig.engine.history(node="n2")] == ["n2"]
    assert rig.engine.history(limit=1)[0]["id"] == 3
    acted = rig.engine.history(node="n1")[1]
    assert acted["action_state"] == "done" and acted["action_readback"]["ours"] is True


def test_status_shows_the_state_a_human_needs(rig):
    rig.act.admin_drain("n9")
    rig.send(alert("n1"))
    s = rig.engine.status()
    assert s["paused"] is False and s["dry_run"] is False and s["breaker"]["open"] is False
    assert s["unavailable"]["total"] == 2 and s["unavailable"]["ours"] == 1
    assert s["unavailable"]["partitions"]["gpu"] == {"nodes": 10, "unavailable": 2, "limit": 5, "ratio": 0.5}
    assert s["owned_nodes"][0]["node"] == "n1"
    assert s["rate_limit"]["tokens"] == 999
    rig.engine.pause("mallory")
    assert rig.engine.status()["paused_by"] == "mallory"


def test_status_when_the_scheduler_is_down(rig):
    rig.act.reachable = False
    assert "error" in rig.engine.status()["unavailable"]


def test_readiness(rig):
    assert rig.engine.readiness() == {"store": "ok", "scheduler": "ok"}
    rig.act.reachable = False
    assert rig.engine.readiness()["scheduler"] == "ping: scheduler unreachable"


def test_every_admin_call_is_audited(tmp_path):
    r = approval_rig(tmp_path)
    a = only(r.send(alert("n1")))["action_id"]
    b = only(r.send(alert("n2")))["action_id"]
    r.engine.approve(a, "u1")
    r.engine.deny(b, "u2")
    r.engine.resume("n1", "u3")
    r.engine.pause("u4")
    r.engine.unpause("u5")
    r.engine.reset_breaker("u6")
    audit = [(x["who"], x["what"]) for x in reversed(r.engine.audit())]
    assert audit == [("u1", "approve"), ("u2", "deny"), ("u3", "resume"), ("u4", "pause"), ("u5", "unpause"),
                     ("u6", "reset-breaker")]  # fmt: skip


def test_metrics_come_from_the_store_and_survive_a_restart(rig):
    rig.send(alert("n1"), alert("n1"), alert("ghost"))
    rig.act.fail("drain", 1, transient=False)
    rig.send(alert("n2"))
    m = rig.metrics()
    assert value(m, "gpufleet_remediation_actions_total", action="drain", result="done") == 1
    assert value(m, "gpufleet_remediation_actions_total", action="drain", result="failed") == 1
    assert value(m, "gpufleet_remediation_actions_total", action="reboot", result="done") == 0
    assert value(m, "gpufleet_remediation_decisions_total", decision="acted") == 1
    assert value(m, "gpufleet_remediation_decisions_total", decision="duplicate") == 1
    assert value(m, "gpufleet_remediation_decisions_total", decision="declined") == 1
    assert value(m, "gpufleet_remediation_decisions_total", decision="failed") == 1
    assert value(m, "gpufleet_remediation_nodes_drained") == 1
    assert value(m, "gpufleet_remediation_paused") == 0
    assert value(m, "gpufleet_remediation_decision_duration_seconds_count") == 4
    assert value(m, "gpufleet_remediation_action_duration_seconds_count", action="drain") == 2
    rig.restart()
    m = rig.metrics()
    assert value(m, "gpufleet_remediation_actions_total", action="drain", result="done") == 1
    assert value(m, "gpufleet_remediation_decisions_total", decision="duplicate") == 1
    assert value(m, "gpufleet_remediation_nodes_drained") == 1


def test_metrics_pass_promtool_naming(rig):
    rig.send(alert("n1"))
    text = generate_latest(rig.engine.registry).decode()
    for line in text.splitlines():
        if line.startswith("# TYPE gpufleet_remediation_") and " counter" in line:
            assert line.split()[2].endswith("_total") or line.split()[2].endswith("_created")


def test_decisions_are_logged_as_structured_records(rig, caplog):
    with caplog.at_level(logging.INFO, logger="gpufleet.remediation"):
        rig.send(alert("n1"))
    records = [r for r in caplog.records if hasattr(r, "remediation")]
    assert records and records[-1].remediation["decision"] == "acted"
    assert json.loads(records[-1].getMessage().split(" ", 1)[1])["node"] == "n1"


# ---- exec ---------------------------------------------------------------------------------------


def test_exec_action_gets_the_node_and_the_alert(tmp_path):
    calls = []

    def runner(spec, node, alert_json, reason):
        calls.append((spec.command, node, alert_json["labels"]["alertname"], reason))
        return "ok"

    rules = [{"name": "site", "match": {"remediation": "drain"}, "action": "exec",
              "exec": {"command": ["fix", "{node}"], "timeout": "5s"}}]  # fmt: skip
    r = Rig(tmp_path, make_policy(rules), exec_runner=runner)
    d = only(r.send(alert("n1")))
    assert d["decision"] == "acted"
    assert calls == [(("fix", "{node}"), "n1", "GpuXidHardwareInspection", "gpufleet: GpuXidHardwareInspection on n1")]
    assert r.act.mutations == []  # exec is not a scheduler action: caps and ownership do not apply
    r.restart()
    r.engine._dry_run = True
    r.clock.advance(7200)
    assert only(r.send(alert("n2")))["decision"] == "dry_run"
    assert len(calls) == 1


def test_exec_failure_counts_toward_the_breaker(tmp_path):
    def runner(spec, node, alert_json, reason):
        raise ActuatorError("exit status 1", transient=False)

    rules = [{"name": "site", "match": {"remediation": "drain"}, "action": "exec", "exec": {"command": ["fix"]}}]
    r = Rig(tmp_path, make_policy(rules, breaker={"failures_to_trip": 1}), exec_runner=runner)
    assert r.decisions(alert("n1")) == ["failed"]
    assert r.store.breaker()["open"]


def test_run_exec_runs_argv_with_stdin_and_a_timeout(tmp_path):
    out = tmp_path / "out.txt"
    script = (
        "import sys, json; d = json.load(sys.stdin);"
        f" open({str(out)!r}, 'w').write(' '.join([sys.argv[1], d['action'], d['node'], d['reason'],"
        " d['alert']['labels']['node']]))"
    )
    done = run_exec(ExecSpec((sys.executable, "-c", script, "{node}"), 10), "n7", alert("n7"), "gpufleet: r")
    assert done.startswith("exit status 0")
    assert out.read_text() == "n7 exec n7 gpufleet: r n7"
    with pytest.raises(ActuatorError, match="exited 3") as err:
        run_exec(ExecSpec((sys.executable, "-c", "import sys; sys.exit(3)"), 10), "n7", {})
    assert err.value.transient is False
    with pytest.raises(ActuatorError, match="timed out after 1s") as err:
        run_exec(ExecSpec((sys.executable, "-c", "import time; time.sleep(30)"), 1), "n7", {})
    assert err.value.transient is True
    with pytest.raises(ActuatorError, match="cannot run"):
        run_exec(ExecSpec((str(tmp_path / "missing"),), 1), "n7", {})


# ---- concurrency ----------------------------------------------------------------------------------


class CapWatch(MemoryActuator):
    """Records the most unavailable nodes ever seen right after an engine action."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.peak = 0
        self.peak_partition: dict[str, int] = {}

    def _take_out(self, operation, name, reason, state):
        st = super()._take_out(operation, name, reason, state)
        with self._lock:
            self.peak = max(self.peak, sum(1 for n in self._nodes.values() if n.unavailable))
            for part in st.partitions:
                down = sum(1 for n in self._nodes.values() if n.unavailable and part in n.partitions)
                self.peak_partition[part] = max(self.peak_partition.get(part, 0), down)
        return st


def storm(engines: list[Engine], nodes: list[str], threads: int = 8, per_thread: int = 5) -> None:
    barrier = threading.Barrier(threads)
    errors = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            for k in range(per_thread):
                batch = [alert(nodes[(i * 7 + k * 3 + j) % len(nodes)], name=f"A{i}-{k}-{j}") for j in range(4)]
                engines[i % len(engines)].handle(payload(*batch))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []


def test_concurrent_deliveries_never_exceed_the_caps(tmp_path):
    nodes = {f"n{i}": ("gpu",) for i in range(40)}
    r = Rig(tmp_path, make_policy(caps={"max_unavailable_ratio": 0.1, "max_unavailable_nodes": 100},
                                  breaker={"cap_hits_to_trip": 0}), nodes=nodes)  # fmt: skip
    r.engine.actuator = act = CapWatch(nodes)
    storm([r.engine], list(nodes))
    assert act.peak_partition["gpu"] == 4 == act.unavailable_count()


def test_two_engines_on_one_database_never_exceed_the_caps_together(tmp_path):
    nodes = {f"n{i}": ("gpu",) for i in range(60)}
    policy = make_policy(caps={"max_unavailable_ratio": 1.0, "max_unavailable_nodes": 5},
                         breaker={"cap_hits_to_trip": 0})  # fmt: skip
    act = CapWatch(nodes)
    stores = [Store(tmp_path / "shared.db"), Store(tmp_path / "shared.db")]
    engines = [Engine(policy, s, act) for s in stores]
    try:
        storm(engines, list(nodes))
    finally:
        for s in stores:
            s.close()
    assert act.peak == 5 == act.unavailable_count()


def test_a_drain_of_ours_that_landed_after_reconcile_is_adopted_by_tick(rig):
    """kill -9 mid-action can leave an scontrol running that drains after the restart's
    reconcile already settled the intent: the periodic refresh adopts such a node
    (never auto-resumed) instead of leaving it drained and unaccounted for."""
    rig.engine.reconcile()
    rig.engine.tick()
    rig.act.admin_drain("n4", "gpufleet: GpuRowRemapFailed on n4 (late scontrol)")
    assert "n4" not in {o["node"] for o in rig.store.owned_nodes()}
    rig.clock.advance(61)
    rig.engine.tick()
    owned = {o["node"]: o for o in rig.store.owned_nodes()}
    assert "n4" in owned and not owned["n4"]["auto_resume"]
    assert any(a["what"] == "adopt" and a["target"] == "n4" for a in rig.engine.audit(20))
    # A foreign drain is never adopted.
    rig.act.admin_drain("n5", "admin: bad DIMM")
    rig.clock.advance(61)
    rig.engine.tick()
    assert "n5" not in {o["node"] for o in rig.store.owned_nodes()}
