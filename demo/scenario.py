"""The demo's scripted scenario: faults in, and what the loop must do about each.

Steps (node numbers for the default 4 nodes):

1. Xid 79 on GPU 5 of gpu-node-3: ``GpuXidRebootRequired`` fires, Alertmanager calls
   the remediation service, which drains gpu-node-3 in Slurm (the reason is read back
   from ``sinfo``).
2. An InfiniBand link flap on gpu-node-2 (mlx5_0 goes DOWN/Polling and back,
   ``link_downed`` + 1): ``RdmaPortLinkDowned`` fires as a warning (a ticket), and
   nothing drains gpu-node-2: fabric alerts carry no ``remediation`` label.
3. A storm: a failed row remap on GPU 0 of every other node at once
   (``GpuRowRemapFailed``, pending, then firing): the caps let at most
   ``max_unavailable_nodes`` be out, the first cap hit opens the circuit breaker and
   ``GpufleetRemediationBreakerOpen`` fires.
4. Faults cleared (GPUs healthy; gpu-node-3's agent restarts as after a GPU reset):
   the alerts resolve, and only gpu-node-3 returns to service, resumed by the service
   because its rule allows auto-resume. The storm's drains (hardware inspection) stay
   for a human, and so does the open breaker.

Each step has an expectation; a missed one is reported (and makes ``--once`` fail).
Expectations are about outcomes, with generous deadlines, never about speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from demo import config
from demo.fleet import Fleet
from demo.stack import poll
from demo.timeline import Timeline, seconds, table

WAIT = 120.0  # seconds any one expectation may take on a slow, busy machine
OWN = "gpufleet:"


@dataclass
class StepResult:
    fault: str
    expectation: str
    detected: float | None = None
    acted: float | None = None
    action: str = "-"
    outcome: str = ""
    ok: bool | None = None  # None: skipped (a prerequisite is missing)
    detail: str = ""  # the long story, for the timeline (the table keeps ``outcome`` short)

    def row(self) -> list[str]:
        status = "ok" if self.ok else ("SKIPPED" if self.ok is None else "MISSED")
        return [self.fault, seconds(self.detected), seconds(self.acted), self.action, f"{status}: {self.outcome}"]


@dataclass
class Observed:
    """What the watcher saw, with monotonic times: first time each thing was seen."""

    alerts: dict[tuple[str, str, str], float] = field(default_factory=dict)   # (alertname, node, state) -> t
    resolved: dict[tuple[str, str], float] = field(default_factory=dict)      # (alertname, node) -> t
    active: dict[tuple[str, str], str] = field(default_factory=dict)          # (alertname, node) -> state
    states: dict[str, tuple[str, str]] = field(default_factory=dict)          # node -> (state, reason)
    changes: list[tuple[float, str, str, str]] = field(default_factory=list)  # (t, node, state, reason)
    decisions: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    notifications: int = 0


class Watcher(threading.Thread):
    """Polls Prometheus, the pager, the service and Slurm; prints and records changes."""

    def __init__(self, fleet: Fleet, tl: Timeline, interval: float = 0.5):
        super().__init__(name="demo-watcher", daemon=True)
        self.fleet, self.tl, self.interval = fleet, tl, interval
        self.seen = Observed()
        self.lock = threading.Lock()
        self._halt = threading.Event()
        self._last_decision = 0

    def run(self) -> None:
        while not self._halt.is_set():
            for watch in (self._alerts, self._slurm, self._decisions, self._pager):
                try:
                    watch()
                except (requests.RequestException, RuntimeError, OSError, ValueError):
                    pass  # a component restarting; the next round sees it
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _alerts(self) -> None:
        if self.fleet.prom is None:
            return
        now = time.monotonic()
        current = {}
        for a in self.fleet.prom.alerts():
            lab = a["labels"]
            key = (lab["alertname"], lab.get("node", ""))
            if current.get(key) != "firing":
                current[key] = a["state"]
            extra = lab.get("gpu") and f" GPU {lab['gpu']}" or lab.get("device") and f" {lab['device']}" or ""
            current.setdefault(("_detail",) + key, extra)  # type: ignore[arg-type]
        with self.lock:
            for key, state in current.items():
                if key[0] == "_detail":
                    continue
                if self.seen.active.get(key) != state:
                    self.seen.active[key] = state
                    self.seen.alerts.setdefault((*key, state), now)
                    where = f" on {key[1]}" if key[1] else ""
                    sev = self._severity(key)
                    self.tl.event(state, f"{key[0]}{where}{current.get(('_detail',) + key, '')} {state}{sev}")
            for key in [k for k in self.seen.active if k not in current]:
                del self.seen.active[key]
                self.seen.resolved[key] = now
                where = f" on {key[1]}" if key[1] else ""
                self.tl.event("resolved", f"{key[0]}{where} resolved")

    def _severity(self, key: tuple[str, str]) -> str:
        for rule in self._rules():
            if rule.get("alert") == key[0]:
                lab = rule.get("labels") or {}
                rem = f", remediation={lab['remediation']}" if lab.get("remediation") else ""
                return f" ({lab.get('severity', '?')}{rem})"
        return ""

    _rule_cache: list[dict[str, Any]] | None = None

    def _rules(self) -> list[dict[str, Any]]:
        if self._rule_cache is None:
            import yaml

            rules = []
            for path in sorted(config.RULES_DIR.glob("*.yml")):
                for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
                    rules += group.get("rules", [])
            self._rule_cache = rules
        return self._rule_cache

    def _slurm(self) -> None:
        rows = self.fleet.sinfo()
        now = time.monotonic()
        with self.lock:
            for node, (state, reason) in rows.items():
                if self.seen.states.get(node) != (state, reason):
                    before = self.seen.states.get(node)
                    self.seen.states[node] = (state, reason)
                    self.seen.changes.append((now, node, state, reason))
                    if before is not None and before[0] != state:
                        why = f', reason "{reason}"' if reason and "drain" in state else ""
                        self.tl.event("slurm", f"sinfo: {node} {before[0]} -> {state}{why}")

    def _decisions(self) -> None:
        if self.fleet.service is None:
            return
        rows = sorted(self.fleet.history(), key=lambda h: h["id"])
        now = time.monotonic()
        for h in rows:
            if h["id"] <= self._last_decision:
                continue
            self._last_decision = h["id"]
            with self.lock:
                self.seen.decisions.append((now, h))
            if h["decision"] == "duplicate":
                continue
            what = f"{h['alertname']} on {h['node']}" if h.get("alertname") else h["node"]
            self.tl.event("decision", f"remediation: {h['decision']} {what}: {h['reason']}")

    def _pager(self) -> None:
        if self.fleet.pager is None:
            return
        got = self.fleet.pager.received()
        for n in got[self.seen.notifications:]:
            body = n.body
            names = sorted({a["labels"].get("alertname", "?") for a in body.get("alerts", [])})
            node = body.get("groupLabels", {}).get("node") or body.get("commonLabels", {}).get("node", "")
            self.tl.event("notify", f"Alertmanager -> {n.path.strip('/')}: {body.get('status')} "
                                    f"{', '.join(names)}{' on ' + node if node else ''}")
        self.seen.notifications = len(got)

    # -- queries for the steps -------------------------------------------------------------
    def first_alert(self, name: str, node: str | None, state: str = "firing", since: float = 0) -> float | None:
        with self.lock:
            times = [t for (a, n, s), t in self.seen.alerts.items()
                     if a == name and s == state and (node is None or n == node) and t >= since]
        return min(times) if times else None

    def firing(self, name: str, node: str | None = None) -> bool:
        with self.lock:
            return any(a == name and s == "firing" and (node is None or n == node)
                       for (a, n), s in self.seen.active.items())

    def active_on(self, node: str) -> list[str]:
        with self.lock:
            return [a for (a, n) in self.seen.active if n == node]

    def state(self, node: str) -> tuple[str, str]:
        with self.lock:
            return self.seen.states.get(node, ("", ""))

    def drained_since(self, node: str, since: float) -> float | None:
        with self.lock:
            hits = [t for t, n, s, r in self.seen.changes if n == node and t >= since and "drain" in s
                    and r.startswith(OWN)]
        return min(hits) if hits else None

    def decisions_on(self, node: str, since: float = 0) -> list[dict[str, Any]]:
        with self.lock:
            return [h for t, h in self.seen.decisions if h["node"] == node and t >= since]


def wait(pred: Callable[[], Any], timeout: float = WAIT, interval: float = 0.25) -> Any:
    """The predicate's first truthy result, or None when ``timeout`` passes (a missed step)."""
    try:
        return poll(pred, timeout, interval)
    except TimeoutError:
        return None


class Scenario:
    def __init__(self, fleet: Fleet, tl: Timeline, *, wait_s: float = WAIT):
        self.f, self.tl, self.wait_s = fleet, tl, wait_s
        n = fleet.n
        self.xid_node = fleet.node_names[min(3, n) - 1]
        self.flap_node = fleet.node_names[1] if fleet.node_names[1] != self.xid_node else fleet.node_names[0]
        self.storm_nodes = [x for x in fleet.node_names if x != self.xid_node]
        self.watch = Watcher(fleet, tl)
        self.results: list[StepResult] = []

    def _wait(self, pred: Callable[[], Any]) -> Any:
        return wait(pred, self.wait_s)

    def run(self) -> list[StepResult]:
        self.tl.t0 = time.monotonic()
        self.watch.start()
        try:
            wait(lambda: self.watch.state(self.xid_node)[0] or self.f.slurm is None, 30)
            for step in (self.step_xid, self.step_flap, self.step_storm, self.step_clear):
                self.results.append(step())
        finally:
            time.sleep(1)
            self.watch.stop()
        return self.results

    def _result(self, r: StepResult) -> StepResult:
        kind = "ok" if r.ok else ("skip" if r.ok is None else "miss")
        self.tl.event(kind, f"{r.fault}: {r.detail or r.outcome}")
        return r

    # -- 1 ----------------------------------------------------------------------------------
    def step_xid(self) -> StepResult:
        node = self.xid_node
        r = StepResult(f"Xid 79 on {node} GPU 5", f"{node} drained by gpufleet with its reason in sinfo")
        self.tl.event("step", f"1. {r.fault}: expect {r.expectation}")
        t = time.monotonic()
        self.f.nodes[node].xid(5, 79)
        self.tl.event("fault", f"simulator: {node} GPU 5 reports Xid 79 (GPU has fallen off the bus, class reboot)")
        if self.f.prom is None:
            r.ok, r.outcome = None, "needs Prometheus and Alertmanager"
            return self._result(r)
        fired = self._wait(lambda: self.watch.first_alert("GpuXidRebootRequired", node, since=t))
        r.detected = fired - t if fired else None
        if self.f.slurm is None:
            r.ok, r.outcome = None, "alert fired; draining needs Slurm (see the missing prerequisites)"
            return self._result(r)
        drained = self._wait(lambda: self.watch.drained_since(node, t))
        if drained:
            r.acted = drained - t
            state, reason = self.watch.state(node)
            r.action, r.ok, r.outcome = "drain", True, f"{node} {state}, gpufleet's reason in sinfo"
            r.detail = f'{node} {state}, reason "{reason}"'
        else:
            r.ok, r.outcome = False, f"{node} not drained within {self.wait_s:g}s (sinfo: {self.watch.state(node)})"
        return self._result(r)

    # -- 2 ----------------------------------------------------------------------------------
    def step_flap(self) -> StepResult:
        node = self.flap_node
        r = StepResult(f"IB link flap on {node} mlx5_0", "a warning (ticket), no drain")
        self.tl.event("step", f"2. {r.fault}: expect {r.expectation}")
        sim = self.f.nodes[node]
        t = time.monotonic()
        sim.link_down()
        self.tl.event("fault", f"sysfs: {node} mlx5_0 port 1 DOWN/Polling, link_downed + 1")
        time.sleep(3)  # a few collections see the port down
        sim.link_up()
        self.tl.event("fault", f"sysfs: {node} mlx5_0 port 1 ACTIVE/LinkUp again")
        if self.f.prom is None:
            r.ok, r.outcome = None, "needs Prometheus and Alertmanager"
            return self._result(r)
        fired = self._wait(lambda: self.watch.first_alert("RdmaPortLinkDowned", node, since=t))
        r.detected = fired - t if fired else None
        if not fired:
            r.ok, r.outcome = False, f"RdmaPortLinkDowned did not fire for {node} within {self.wait_s:g}s"
            return self._result(r)
        # The warning reaches Alertmanager and its ticket receiver; give the remediation
        # route the same chance to (wrongly) act before judging.
        self._wait(lambda: any("RdmaPortLinkDowned" in str(n.body) for n in self.f.pager.received("/ticket")))
        time.sleep(4)
        acted = [h for h in self.watch.decisions_on(node, t) if h["decision"] == "acted"]
        state = self.watch.state(node)[0]
        if acted or "drain" in state:
            r.ok, r.action = False, "drain"
            r.outcome = f"{node} was acted on ({state}): {[h['reason'] for h in acted]}"
        else:
            r.ok, r.action = True, "ticket"
            r.outcome = f"warning only; {node} stays {state or 'in service'}"
        return self._result(r)

    # -- 3 ----------------------------------------------------------------------------------
    def step_storm(self) -> StepResult:
        nodes = self.storm_nodes
        cap = config.max_unavailable_nodes(self.f.n)
        r = StepResult(f"row-remap failure on {len(nodes)} nodes at once",
                       f"caps keep unavailable nodes <= {cap}, the breaker opens and its alert fires")
        self.tl.event("step", f"3. {r.fault} ({', '.join(nodes)}): expect {r.expectation}")
        t = time.monotonic()
        for node in nodes:
            self.f.nodes[node].gpu(0, remap_failed=True)
        self.tl.event("fault", f"simulator: GPU 0 of {', '.join(nodes)} reports a failed row remap")
        if self.f.prom is None:
            r.ok, r.outcome = None, "needs Prometheus and Alertmanager"
            return self._result(r)
        fired = self._wait(lambda: self.watch.first_alert("GpuRowRemapFailed", None, since=t))
        r.detected = fired - t if fired else None
        if self.f.slurm is None:
            r.ok, r.outcome = None, "alerts fired; caps and breaker need Slurm"
            return self._result(r)
        breaker = self._wait(lambda: self.watch.firing("GpufleetRemediationBreakerOpen")
                             and self.watch.first_alert("GpufleetRemediationBreakerOpen", None, since=t))
        # Every storm node has been judged (acted or declined) before we count.
        self._wait(lambda: all(any(h["decision"] in ("acted", "declined") and h.get("alertname") == "GpuRowRemapFailed"
                                   for h in self.watch.decisions_on(n, t)) for n in nodes))
        drained = [n for n in nodes if self.watch.drained_since(n, t)]
        states = self.f.sinfo()
        unavailable = [n for n, (s, _) in states.items() if any(x in s for x in ("drain", "down", "fail"))]
        declined = sorted({n for n in nodes for h in self.watch.decisions_on(n, t) if h["decision"] == "declined"})
        acted = [t2 for n in drained if (t2 := self.watch.drained_since(n, t))]
        r.acted = (min(acted) - t) if acted else ((breaker - t) if breaker else None)
        r.action = f"drained {len(drained)}, declined {len(declined)}"
        status = self.f.admin("GET", "status")
        ok = bool(breaker) and status["breaker"]["open"] and len(unavailable) <= cap and bool(declined)
        r.ok = ok
        r.outcome = (f"unavailable {len(unavailable)}/{cap}, breaker {'open' if status['breaker']['open'] else 'closed'}"
                     + ("" if breaker else ", no breaker alert"))
        r.detail = (f"breaker {'open' if status['breaker']['open'] else 'closed'} "
                     f"({status['breaker']['reason'] or 'no reason'}); unavailable {len(unavailable)}/{cap} "
                     f"({', '.join(unavailable) or 'none'}); drained {', '.join(drained) or 'none'}; "
                     f"declined {', '.join(declined) or 'none'}"
                     + ("" if breaker else "; GpufleetRemediationBreakerOpen did not fire"))
        self.storm_drained = drained
        return self._result(r)

    # -- 4 ----------------------------------------------------------------------------------
    def step_clear(self) -> StepResult:
        xid = self.xid_node
        kept = getattr(self, "storm_drained", [])
        r = StepResult("faults cleared", f"alerts resolve; only {xid} resumes (auto-resume); "
                       "hardware-inspection drains stay")
        self.tl.event("step", f"4. {r.fault}: expect {r.expectation}")
        t = time.monotonic()
        for node in self.f.nodes.values():
            node.clear_gpus()
        self.tl.event("fault", "simulator: every GPU healthy again")
        self.f.restart_agent(xid)
        self.tl.event("fault", f"{xid}: node agent restarted with a freshly reset GPU (its Xid counters start over)")
        if self.f.prom is None:
            r.ok, r.outcome = None, "needs Prometheus and Alertmanager"
            return self._result(r)
        names = ("GpuXidRebootRequired", "GpuRowRemapFailed")
        resolved = self._wait(lambda: not any(a in names for n in self.f.node_names for a in self.watch.active_on(n)))
        r.detected = (time.monotonic() - t) if resolved else None
        if self.f.slurm is None:
            r.ok, r.outcome = None, "alerts resolved; resuming needs Slurm"
            return self._result(r)
        back = self._wait(lambda: (s := self.watch.state(xid)[0]) and "drain" not in s
                          and not s.startswith(("down", "unknown")))
        r.acted = (time.monotonic() - t) if back else None
        time.sleep(2)
        states = self.f.sinfo()
        still = [n for n in kept if "drain" in states.get(n, ("", ""))[0] and states[n][1].startswith(OWN)]
        resumed = [n for n in self.f.node_names if n not in kept and "drain" not in states.get(n, ("", ""))[0]]
        r.action = f"resumed {xid}" if back else "-"
        r.ok = bool(resolved) and bool(back) and still == kept
        bits = [f"{xid} {states.get(xid, ('?', ''))[0]}" + (" (resumed by gpufleet)" if back else " (NOT resumed)")]
        if kept:
            bits.append(f"still drained for inspection: {', '.join(still) or 'none'}"
                        + ("" if still == kept else f" (expected {', '.join(kept)})"))
        if not resolved:
            left = {n: [a for a in self.watch.active_on(n) if a in names] for n in self.f.node_names}
            bits.append(f"alerts still active: { {n: a for n, a in left.items() if a} }")
        bits.append(f"in service: {', '.join(resumed)}")
        r.detail = "; ".join(bits)
        r.outcome = (f"{xid} resumed" if back else f"{xid} NOT resumed") + (
            f", {', '.join(still) or 'none'} kept drained" if kept else "")
        return self._result(r)


def summary(results: list[StepResult]) -> str:
    return table(["fault", "detected after", "acted after", "action", "outcome"], [r.row() for r in results])
