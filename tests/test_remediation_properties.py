"""Property tests: random interleavings never break the remediation guarantees.

Hypothesis drives the engine with random sequences of firing, resolved and duplicate
alerts (alone and in batches), drains and resumes by "someone else", nodes going
down, injected actuator failures, clock advances, ticks, approvals, admin calls and
restarts (with reconcile) against the in-memory scheduler. A watching actuator checks,
at the moment the engine calls it, that:

* no engine drain or reboot ever leaves more nodes unavailable than a cap allows
  (per partition and absolute, counting every cause);
* the engine never resumes a node that is not ours and never drains over another
  owner's reason;
* in dry-run (global or per rule) the engine changes nothing at all.

Example counts are bounded so the file runs in well under 30 s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remediation.actuators.base import REASON_PREFIX
from remediation.engine import AdminError, Engine
from remediation.memory import MemoryActuator
from remediation.store import Store
from tests.test_remediation_engine import Clock, alert, make_policy, payload

NODES = {
    **{f"a{i}": ("pa",) for i in range(4)},
    **{f"b{i}": ("pb",) for i in range(4)},
    "x0": ("pa", "pb"),  # a node in two partitions counts in both
}
NAMES = ("Soft", "Hard", "Boot", "Ask", "Other")


class Watch(MemoryActuator):
    """Checks every engine call against the invariants, at the moment it is made."""

    def __init__(self, policy, *, dry: bool):
        super().__init__(NODES)
        self.policy = policy
        self.dry = dry
        self.violations: list[str] = []

    def _take_out(self, operation, name, reason, state):
        with self._lock:
            node = self._nodes.get(name)
            if node is not None and node.unavailable and not node.reason.startswith(REASON_PREFIX):
                self.violations.append(f"{operation} {name} over a foreign reason {node.reason!r}")
        st_ = super()._take_out(operation, name, reason, state)
        if self.dry:
            self.violations.append(f"{operation} {name} in dry-run")
        with self._lock:
            caps = self.policy.caps
            down = [n for n in self._nodes.values() if n.unavailable]
            if len(down) > caps.max_unavailable_nodes:
                self.violations.append(f"{operation} {name}: {len(down)} unavailable > {caps.max_unavailable_nodes}")
            for part in st_.partitions:
                members = [n for n in self._nodes.values() if part in n.partitions]
                out = sum(1 for n in members if n.unavailable)
                if out > caps.partition_limit(part, len(members)):
                    self.violations.append(f"{operation} {name}: partition {part} has {out} of {len(members)} out")
        return st_

    def resume(self, node):
        with self._lock:
            n = self._nodes.get(node)
            if n is not None and not (n.unavailable and n.reason.startswith(REASON_PREFIX)):
                self.violations.append(f"resume {node} which is not ours ({n.state}, {n.reason!r})")
        st_ = super().resume(node)
        if self.dry:
            self.violations.append(f"resume {node} in dry-run")
        return st_


def rules(*, rule_dry: bool) -> list[dict]:
    common = {"dry_run": rule_dry}
    return [
        {"name": "soft", "match": {"alertname": "Soft"}, "action": "drain", "auto_resume": True,
         "resume_hold_down": "5m", "cooldown": "0", **common},
        {"name": "hard", "match": {"alertname": "Hard"}, "action": "drain", "cooldown": "10m", **common},
        {"name": "boot", "match": {"alertname": "Boot"}, "action": "reboot", "cooldown": "10m", **common},
        {"name": "ask", "match": {"alertname": "Ask"}, "action": "drain", "requires_approval": True,
         "auto_resume": True, "resume_hold_down": "1m", "cooldown": "0", **common},
    ]  # fmt: skip


node_st = st.sampled_from(sorted(NODES) + ["ghost"])
epoch_st = st.integers(0, 2)
alert_st = st.tuples(st.sampled_from(["fire", "resolve"]), node_st, st.sampled_from(NAMES), epoch_st)
op_st = st.one_of(
    # alerts (weighted: most of what the service sees), alone and in deliveries of several
    alert_st,
    alert_st,
    st.tuples(st.just("batch"), st.lists(alert_st, min_size=1, max_size=6)),
    # a soft fault that clears: fire, resolve, wait out the hold-down, tick (an auto-resume),
    # optionally with someone else taking the node in between
    st.tuples(st.just("cycle"), node_st, epoch_st, st.booleans()),
    # someone else, the hardware, and the actuator
    st.tuples(st.sampled_from(["admin_drain", "admin_resume", "down", "finish_reboot", "engine_resume"]), node_st),
    st.tuples(st.just("fail"), st.sampled_from(["drain", "reboot", "resume", "nodes", "node"]), st.booleans()),
    # time, and the admin API
    st.tuples(st.just("advance"), st.sampled_from([0, 30, 61, 301, 601, 3601])),
    st.tuples(st.sampled_from(["approve", "deny"]), st.integers(0, 3)),
    st.sampled_from([("tick",), ("pause",), ("unpause",), ("reset",), ("restart",)]),
)
policy_st = st.fixed_dictionaries(
    {
        "ratio": st.sampled_from([0.25, 0.5, 1.0]),
        "absolute": st.sampled_from([0, 1, 2, 3, 5]),
        "cap_hits": st.sampled_from([0, 0, 1, 3]),
        "failures": st.sampled_from([1, 3, 10]),
        "burst": st.sampled_from([1, 3, 100]),
        "max_drains": st.sampled_from([1, 2, 3, 5]),
    }
)


def build_policy(p: dict, *, global_dry: bool = False, rule_dry: bool = False):
    return make_policy(
        rules(rule_dry=rule_dry),
        dry_run=global_dry,
        caps={"max_unavailable_ratio": p["ratio"], "max_unavailable_nodes": p["absolute"]},
        breaker={"cap_hits_to_trip": p["cap_hits"], "failures_to_trip": p["failures"]},
        rate_limit={"actions_per_hour": 60, "burst": p["burst"]},
        flap={"max_drains": p["max_drains"], "window": "1h"},
    )


def to_alert(spec: tuple) -> dict:
    kind, node, name, epoch = spec
    return alert(node, name=name, remediation=None, status="firing" if kind == "fire" else "resolved",
                 starts=f"2024-05-01T1{epoch}:00:00Z")  # fmt: skip


def run(ops: list[tuple], policy, *, engine_dry: bool, watch_dry: bool) -> Watch:
    act = Watch(policy, dry=watch_dry)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "r.db"
        store = Store(db, synchronous="NORMAL")
        engine = Engine(policy, store, act, dry_run=engine_dry, clock=clock)
        engine.reconcile()
        try:
            for op in ops:
                kind = op[0]
                if kind in ("fire", "resolve"):
                    engine.handle(payload(to_alert(op)))
                elif kind == "batch":
                    engine.handle(payload(*(to_alert(a) for a in op[1])))
                elif kind == "cycle":
                    _, node, epoch, steal = op
                    engine.handle(payload(to_alert(("fire", node, "Soft", epoch))))
                    engine.handle(payload(to_alert(("resolve", node, "Soft", epoch))))
                    if steal and node in NODES:
                        act.admin_drain(node, "admin: took it over")
                    clock.advance(301)
                    engine.tick()
                elif kind in ("admin_drain", "admin_resume", "down", "finish_reboot"):
                    if op[1] in NODES:
                        {"admin_drain": act.admin_drain, "admin_resume": act.admin_resume, "down": act.set_down,
                         "finish_reboot": act.finish_reboot}[kind](op[1])  # fmt: skip
                elif kind == "engine_resume":
                    try:
                        engine.resume(op[1], "someone")
                    except AdminError:
                        pass
                elif kind == "fail":
                    act.fail(op[1], transient=op[2])
                elif kind == "advance":
                    clock.advance(op[1])
                elif kind in ("approve", "deny"):
                    pending = store.actions(state="pending")
                    if pending:
                        action_id = pending[op[1] % len(pending)]["id"]
                        try:
                            getattr(engine, kind)(action_id, "someone")
                        except AdminError:
                            pass
                elif kind == "tick":
                    engine.tick()
                elif kind in ("pause", "unpause"):
                    getattr(engine, kind)("someone")
                elif kind == "reset":
                    engine.reset_breaker("someone")
                elif kind == "restart":
                    store.close()
                    store = Store(db, synchronous="NORMAL")
                    engine = Engine(policy, store, act, dry_run=engine_dry, clock=clock)
                    engine.reconcile()
                assert act.violations == [], (op, act.violations)
        finally:
            store.close()
    return act


SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@SETTINGS
@given(p=policy_st, ops=st.lists(op_st, min_size=3, max_size=30))
def test_random_interleavings_never_break_a_cap_or_resume_a_foreign_drain(p, ops):
    run(ops, build_policy(p), engine_dry=False, watch_dry=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(p=policy_st, ops=st.lists(op_st, min_size=3, max_size=25), where=st.sampled_from(["engine", "policy", "rules"]))
def test_dry_run_never_acts(p, ops, where):
    policy = build_policy(p, global_dry=where == "policy", rule_dry=where == "rules")
    act = run(ops, policy, engine_dry=where == "engine", watch_dry=True)
    assert act.mutations == []


def test_a_storm_with_foreign_drains_stays_within_the_caps():
    """A fixed worst case next to the random ones: every node fires at once, twice,
    while someone else drains nodes in between."""
    policy = build_policy({"ratio": 0.5, "absolute": 4, "cap_hits": 0, "failures": 3, "burst": 100, "max_drains": 5})
    storm = [("batch", [("fire", n, name, 0) for n in sorted(NODES) for name in ("Soft", "Hard", "Boot")])]
    ops = [("admin_drain", "b3"), *storm, ("admin_drain", "a3"), *storm, ("advance", 3601), *storm]
    act = run(ops, policy, engine_dry=False, watch_dry=False)  # run() checks every engine call
    assert 0 < len(act.mutations) <= 3  # b3 is someone else's: the engine may add at most 3 (absolute cap 4)
