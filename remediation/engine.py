"""The decision engine: Alertmanager deliveries in, guarded scheduler actions out.

The engine is the only place that decides. The HTTP service hands it schema-validated
webhook payloads and admin calls; actuators only carry out what it decided; the store
remembers everything. Peers' failures shape the rules here (see
docs/remediation.md and shared/REFERENCE.md, "Remediation lessons from peers"):

* every delivery is recorded durably before anything else, and every action's intent
  is committed before the scheduler is touched, its outcome after;
* one firing (alert fingerprint + startsAt) produces at most one action, whatever
  Alertmanager HA pairs and ``repeat_interval`` resends deliver;
* guardrails run in a fixed order (``GUARDRAILS``), caps are counted on the
  scheduler's live view (every unavailable node, not only ours) under a database
  write lock, so concurrent deliveries cannot together pass a cap;
* dry-run is truly dry: no actuator mutation, only an audit of what would happen;
* gpufleet resumes only nodes it drained itself (``NodeStatus.ours`` at the moment of
  acting) and never overwrites another owner's drain reason.

Call ``reconcile()`` once at start, ``tick()`` periodically (it performs due
auto-resumes), ``handle()`` per delivery, and the admin methods from the admin API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from remediation.actuators.base import Actuator, ActuatorError, NodeStatus
from remediation.policy import CAPACITY_ACTIONS, MUTATING_ACTIONS, ExecSpec, Policy, Rule, format_duration
from remediation.store import Store

log = logging.getLogger("gpufleet.remediation")

# Every decision the engine records (gpufleet_remediation_decisions_total{decision}).
DECISIONS = (
    "acted",  # the action ran (or notify recorded)
    "dry_run",  # dry-run: the reason says what would have happened
    "declined",  # a guardrail said no (the reason says which)
    "failed",  # the action or the scheduler read failed
    "pending_approval",  # waiting for a human (approve/deny)
    "duplicate",  # the same firing again (HA pair, resend, retry)
    "unmatched",  # no policy rule matches: recorded, not acted on
    "resolved",  # a resolution was recorded (and a resume scheduled or not)
)

# The order in which a firing alert meets the guardrails (docs/remediation.md).
GUARDRAILS = (
    "duplicate",
    "rule",
    "paused",
    "dry_run",
    "node_exists",
    "already_unavailable",
    "cooldown",
    "flap",
    "breaker",
    "rate_limit",
    "caps",
    "approval",
    "act",
)

# How often tick() re-reads the scheduler to release nodes that are no longer ours.
OWNERSHIP_REFRESH_SECONDS = 60.0

ACTION_STATES = ("pending", "scheduled", "intent", "done", "failed", "cancelled")
RESULTS = ("done", "failed", "dry_run", "cancelled")

_TS = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$")


class AdminError(Exception):
    """An admin call that cannot be done. ``code`` is ``not_found`` or ``conflict``
    (the HTTP service maps them to 404 and 409)."""

    def __init__(self, message: str, *, code: str = "conflict"):
        super().__init__(message)
        self.code = code


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def normalize_timestamp(value: str) -> str:
    """RFC 3339 -> one canonical UTC spelling with nanoseconds, so the idempotency
    key does not depend on how a sender formats startsAt."""
    text = str(value).strip()
    m = _TS.match(text)
    if not m:
        return text
    zone = "+00:00" if m[4] == "Z" else m[4]
    try:
        dt = datetime.fromisoformat(f"{m[1]}T{m[2]}{zone}").astimezone(UTC)
    except ValueError:
        return text
    frac = (m[3] or "")[:9].ljust(9, "0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac}Z"


@dataclass(frozen=True)
class Alert:
    """One alert of a webhook payload, with its idempotency key."""

    key: str
    fingerprint: str
    starts_at: str
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    raw: dict[str, Any]

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def node(self) -> str:
        return self.labels.get("node", "")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Alert:
        labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
        annotations = {str(k): str(v) for k, v in (raw.get("annotations") or {}).items()}
        fingerprint = str(raw.get("fingerprint") or "")
        if not fingerprint:  # Alertmanager always sends one; other senders may not
            fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
        starts_at = normalize_timestamp(str(raw.get("startsAt") or ""))
        status = "resolved" if str(raw.get("status", "firing")) == "resolved" else "firing"
        return cls(f"{fingerprint}@{starts_at}", fingerprint, starts_at, status, labels, annotations, dict(raw))


@dataclass
class Outcome:
    """What the engine decided for one alert (or one admin/tick step)."""

    decision: str
    reason: str
    rule: str | None = None
    action: str | None = None
    action_id: int | None = None
    # The firing is handled: resends are duplicates. False for temporary declines
    # (paused, breaker, rate limit, caps, cooldown, a transient failure), so a resend
    # after the condition clears is judged again.
    final: bool = True
    # The scheduler could not be read: worth Alertmanager's retry (the service may
    # answer 5xx). Never set after an action ran.
    retry: bool = False


class View:
    """One read of the scheduler (``actuator.nodes()``), indexed for the caps:
    unavailable nodes (every cause) and the members of each partition. The engine
    keeps it current with its own actions' read-backs."""

    def __init__(self, statuses: Mapping[str, NodeStatus]):
        self.statuses: dict[str, NodeStatus] = {}
        self.unavailable: set[str] = set()
        self.members: dict[str, set[str]] = {}
        for name, st in statuses.items():
            self.update(name, st)

    def get(self, name: str) -> NodeStatus | None:
        return self.statuses.get(name)

    def update(self, name: str, st: NodeStatus) -> None:
        old = self.statuses.get(name)
        if old is not None:
            for p in old.partitions:
                self.members.get(p, set()).discard(name)
        self.unavailable.discard(name)
        if not st.exists:
            self.statuses.pop(name, None)
            return
        self.statuses[name] = st
        if st.unavailable:
            self.unavailable.add(name)
        for p in st.partitions:
            self.members.setdefault(p, set()).add(name)


@dataclass
class _Delivery:
    """Per-delivery cache of the scheduler's view: read once for the early checks,
    read again right before every action (so a cap is checked on the live state)."""

    delivery_id: int | None
    view: View | None = None
    view_error: str | None = None
    released: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)


ExecRunner = Callable[[ExecSpec, str, Mapping[str, Any], str], str]


def run_exec(spec: ExecSpec, node: str, alert: Mapping[str, Any], reason: str = "") -> str:
    """The policy's ``exec`` action, with the exec actuator's conventions (one for all
    site commands, remediation/actuators/exec.py): argv without a shell, ``{node}``
    substituted (or the node appended), ``{"action": "exec", "node", "reason", "alert"}``
    as JSON on stdin, GPUFLEET_ACTION/NODE/REASON in the environment, its process
    group killed at the timeout; exit 75 is a transient failure, other non-zero exits
    permanent ones."""
    from remediation.actuators.exec import ExecActuator  # only when a rule runs a command

    result = ExecActuator(spec.command, spec.timeout).run(node, "exec", reason=reason, alert=alert)
    return "exit status 0: " + " ".join(result.stdout.split())[-300:]


def _status_dict(st: NodeStatus | None) -> str | None:
    if st is None:
        return None
    d = asdict(st)
    d["partitions"] = list(st.partitions)
    return json.dumps(d, sort_keys=True)


class Engine:
    """Policy + guardrails + store + actuator. Thread-safe; see the module docstring."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        actuator: Actuator,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.time,
        exec_runner: ExecRunner | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.policy = policy
        self.store = store
        self.actuator = actuator
        self.clock = clock
        self._dry_run = dry_run
        self._exec = exec_runner or run_exec
        self._lock = threading.RLock()
        self._last_refresh = float("-inf")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._decision_seconds = Histogram(
            "gpufleet_remediation_decision_duration_seconds",
            "Time to decide one alert (guardrails, store writes and the action if one runs).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self._action_seconds = Histogram(
            "gpufleet_remediation_action_duration_seconds",
            "Time the actuator took for one action, read-back included.",
            ["action"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(self))

    # ---- small helpers ------------------------------------------------------------------

    @property
    def dry_run(self) -> bool:
        """Global dry-run: the --dry-run flag or the policy's top-level dry_run."""
        return self._dry_run or self.policy.dry_run

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy (a reload); decisions in flight finish under the old one."""
        with self._lock:
            self.policy = policy

    def _paused(self) -> dict[str, Any] | None:
        row = self.store.flag("paused")
        return row if row and row["value"] else None

    def _log(self, fields: Mapping[str, Any]) -> None:
        level = logging.WARNING if fields.get("decision") == "failed" else logging.INFO
        log.log(level, "remediation %s", json.dumps(dict(fields), sort_keys=True, default=str), extra={"remediation": dict(fields)})

    def _record(
        self,
        out: Outcome,
        *,
        delivery_id: int | None = None,
        alert: Alert | None = None,
        node: str = "",
        alert_key: str | None = None,
        who: str = "engine",
        duration: float | None = None,
    ) -> dict[str, Any]:
        fields = {
            "at": self.clock(),
            "delivery_id": delivery_id,
            "alert_key": alert.key if alert else alert_key,
            "alertname": alert.alertname if alert else "",
            "node": (alert.node if alert else "") or node,
            "alert_status": alert.status if alert else "",
            "rule": out.rule,
            "action": out.action,
            "decision": out.decision,
            "reason": out.reason,
            "action_id": out.action_id,
            "who": who,
            "duration_seconds": duration,
        }
        decision_id = self.store.add_decision(**fields)
        self._log({"event": "decision", "id": decision_id, **fields})
        return {"id": decision_id, **{k: fields[k] for k in ("alert_key", "alertname", "node", "alert_status")},
                "rule": out.rule, "action": out.action, "decision": out.decision, "reason": out.reason,
                "action_id": out.action_id}  # fmt: skip

    def _audit(self, who: str, what: str, target: str = "", detail: str = "") -> None:
        self.store.add_audit(who, what, target, detail, at=self.clock())
        self._log({"event": "admin", "who": who, "what": what, "target": target, "detail": detail})

    # ---- the scheduler's view -----------------------------------------------------------

    def _snapshot(self, ctx: _Delivery) -> View | None:
        """The delivery's cached view (fetched once; a failure is remembered for the
        rest of the delivery so a dead scheduler does not cost a timeout per alert)."""
        if ctx.view is None and ctx.view_error is None:
            self._fetch(ctx)
        return ctx.view

    def _fetch(self, ctx: _Delivery) -> View | None:
        try:
            ctx.view = View(self.actuator.nodes())
            ctx.view_error = None
        except ActuatorError as exc:
            ctx.view, ctx.view_error = None, str(exc)
            return None
        ctx.released.extend(self._refresh_ownership(ctx.view))
        ctx.adopted.extend(self._adopt_unrecorded(ctx.view))
        return ctx.view

    def _refresh_ownership(self, view: View) -> list[str]:
        """Forget nodes the scheduler no longer shows as ours (resumed by a human,
        rebooted back into service, re-drained by someone else): they are not ours
        to resume any more, and their flap flag and scheduled resume go with them."""
        released = []
        for own in self.store.owned_nodes():
            st = view.get(own["node"])
            if st is not None and st.exists and st.ours:
                continue
            node = own["node"]
            released.append(node)
            self.store.release_ownership(node)
            self.store.clear_flapping(node)
            what = "gone from the scheduler" if st is None or not st.exists else f"{st.state or 'available'} ({st.reason!r})"
            self._cancel_scheduled(node, f"node is no longer ours: {what}")
            self._log({"event": "ownership_released", "node": node, "now": what})
        return released

    def _adopt_unrecorded(self, view: View) -> list[str]:
        """Take on nodes that carry our reason but have no ownership record: a drain
        that landed after a crash's reconcile (an orphaned scontrol finishing late),
        or one an operator made by hand with the ``gpufleet:`` prefix. They count as
        ours (so they may be resumed by a human through us) but are never auto-resumed."""
        owned = {o["node"] for o in self.store.owned_nodes()}
        adopted = []
        for name, st in sorted(view.statuses.items()):
            if not (st.exists and st.ours) or name in owned or self.store.actions(state="intent", node=name):
                continue
            self.store.set_ownership(name, action_id=None, since=self.clock(), reason=st.reason, alert_key=None,
                                     rule=None, auto_resume=0, hold_down=0)  # fmt: skip
            self.store.add_audit("engine", "adopt", name, json.dumps({"reason": st.reason, "state": st.state}),
                                 at=self.clock())  # fmt: skip
            self._log({"event": "ownership_adopted", "node": name, "reason": st.reason})
            adopted.append(name)
        return adopted

    def _cancel_scheduled(self, node: str, why: str) -> list[int]:
        """Cancel the scheduled auto-resumes of a node, each with a decision in the history."""
        scheduled = self.store.actions(state="scheduled", node=node)
        for a in scheduled:
            self.store.update_action(a["id"], state="cancelled", finished_at=self.clock(), outcome=f"cancelled: {why}")
            self.store.bump("actions", {"action": "resume", "result": "cancelled"})
            out = Outcome("declined", f"scheduled resume of {node} cancelled: {why}", rule=a["rule"], action="resume",
                          action_id=a["id"])  # fmt: skip
            self._record(out, node=node, alert_key=a["alert_key"])
        return [a["id"] for a in scheduled]

    # ---- webhook deliveries -------------------------------------------------------------

    def handle(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Decide every alert of one (schema-validated) webhook payload.

        The delivery is committed before any decision, so the service may answer 2xx
        once this returns. ``retry`` in the answer is true when the scheduler could not
        be read for some alert: the service may answer 5xx so Alertmanager retries
        (alerts already handled then come back as duplicates)."""
        with self._lock:
            delivery_id = self.store.record_delivery(payload, received_at=self.clock())
            ctx = _Delivery(delivery_id)
            results: list[dict[str, Any]] = []
            retry = False
            try:
                with self.store.transaction():
                    for raw in payload.get("alerts") or []:
                        started = time.perf_counter()
                        alert = Alert.parse(raw)
                        out = self._resolved(ctx, alert) if alert.status == "resolved" else self._firing(ctx, alert)
                        duration = time.perf_counter() - started
                        self._decision_seconds.observe(duration)
                        retry = retry or out.retry
                        results.append(self._record(out, delivery_id=delivery_id, alert=alert, duration=duration))
                    self.store.finish_delivery(delivery_id, "processed", at=self.clock())
            except Exception as exc:
                self.store.finish_delivery(delivery_id, "failed", at=self.clock(), error=repr(exc))
                log.exception("remediation delivery %s failed", delivery_id)
                raise
        counts: dict[str, int] = {}
        for r in results:
            counts[r["decision"]] = counts.get(r["decision"], 0) + 1
        return {"delivery_id": delivery_id, "alerts": len(results), "counts": counts, "retry": retry, "decisions": results}

    def _firing(self, ctx: _Delivery, alert: Alert) -> Outcome:
        now = self.clock()
        seen = self.store.alert(alert.key)
        reopened = ""
        if seen is not None and seen["status"] == "resolved" and self.store.resolved_by(alert.key) == "reconcile":
            # Reconcile found no Alertmanager holding this firing, yet one delivers it again:
            # reconcile was wrong (an Alertmanager that lost its alerts). Judge it afresh.
            self.store.upsert_alert(alert.key, status="firing", final=0, resolved_at=None, updated_at=now)
            self._log({"event": "alert_reopened", "alert_key": alert.key, "node": alert.node})
            reopened = "reopened: Alertmanager delivers this firing again after reconcile resolved it; "
            seen = self.store.alert(alert.key)
        if seen is not None and (seen["final"] or seen["status"] == "resolved"):
            self.store.upsert_alert(alert.key, last_delivery=ctx.delivery_id, updated_at=now)
            why = "already resolved (a stale resend)" if seen["status"] == "resolved" else "already handled"
            return Outcome(
                "duplicate",
                f"{why}: this firing was first received in delivery {seen['first_delivery']}",
                rule=seen["rule"],
                action=seen["action"],
            )
        rule = self.policy.match(alert.labels)
        fields: dict[str, Any] = {
            "status": "firing",
            "rule": rule.name if rule else None,
            "action": rule.action if rule else None,
            "last_delivery": ctx.delivery_id,
            "updated_at": now,
            "node": alert.node,
            "alertname": alert.alertname,
        }
        if seen is None:
            fields.update(
                fingerprint=alert.fingerprint, starts_at=alert.starts_at, first_delivery=ctx.delivery_id, first_seen=now
            )
        self.store.upsert_alert(alert.key, **fields)
        out = self._judge_firing(ctx, alert, rule)
        self.store.upsert_alert(alert.key, final=1 if out.final else 0)
        out.reason = reopened + out.reason
        return out

    def _judge_firing(self, ctx: _Delivery, alert: Alert, rule: Rule | None) -> Outcome:
        if rule is None:
            return Outcome("unmatched", "no policy rule matches this alert: recorded, not acted on")
        if rule.action == "notify":
            self.store.bump("actions", {"action": "notify", "result": "done"})
            return Outcome("acted", f"notify: recorded by rule {rule.name}", rule=rule.name, action="notify")
        node = alert.node
        if not node:
            return Outcome("declined", "the alert has no node label: nothing to act on", rule=rule.name, action=rule.action)
        if rule.action in CAPACITY_ACTIONS:
            # A bad-node signal, acted on or not: a scheduled resume of this node is off,
            # and if this rule wants a human, so does the node (whoever drained it first).
            self._cancel_scheduled(node, f"{alert.alertname or 'an alert'} fired again")
            own = self.store.ownership(node)
            if own and own["auto_resume"] and not (rule.action == "drain" and rule.auto_resume):
                self.store.update_ownership(node, auto_resume=0)
        return self._guard(ctx, alert, rule, node)

    def _guard(self, ctx: _Delivery, alert: Alert, rule: Rule, node: str, *, approved_by: str | None = None,
               pending_id: int | None = None) -> Outcome:  # fmt: skip
        """The guardrails, in GUARDRAILS order, for one firing alert (or one approval)."""
        now = self.clock()
        act = rule.action

        def out(decision: str, reason: str, **kw: Any) -> Outcome:
            return Outcome(decision, reason, rule=rule.name, action=act, **kw)

        # paused: nothing new happens, not even a dry-run audit of what would.
        paused = self._paused()
        if paused:
            return out("declined", f"paused by {paused['who']} since {iso(paused['at'])}: no new actions", final=False)

        # dry-run from here on: every check runs read-only, nothing is consumed or counted.
        dry = self.dry_run or rule.dry_run
        dry_scope = "global" if self.dry_run else f"rule {rule.name}"

        def decline(reason: str, *, final: bool) -> Outcome:
            if dry:
                return out("dry_run", f"dry-run ({dry_scope}): would decline: {reason}")
            return out("declined", reason, final=final)

        view = self._snapshot(ctx)
        if view is None:
            return out("failed", f"the scheduler could not be read: {ctx.view_error}", final=False, retry=True)

        # node exists
        st = view.get(node)
        if st is None or not st.exists:
            return decline(f"node {node} is unknown to the scheduler", final=True)

        # already unavailable: someone (maybe us) got there first; never overwrite.
        if act in CAPACITY_ACTIONS and st.unavailable:
            return decline(self._unavailable_reason(st), final=True)

        # per-node cooldown (an approval is a human's call: no cooldown)
        if approved_by is None and rule.cooldown > 0:
            last = self.store.scalar(
                "SELECT MAX(COALESCE(started_at, created_at)) FROM actions WHERE node = ?"
                " AND action IN ('drain', 'reboot', 'exec') AND state IN ('intent', 'done', 'failed')",
                (node,),
            )
            if last is not None and now - last < rule.cooldown:
                return decline(
                    f"cooldown: the last action on {node} was {format_duration(now - last)} ago,"
                    f" rule {rule.name} waits {format_duration(rule.cooldown)}",
                    final=False,
                )

        # flap: the Nth drain in the window stays out of service (a reboot becomes a drain).
        flapping = False
        flap_note = ""
        auto_resume = rule.auto_resume
        if act in CAPACITY_ACTIONS:
            count = int(
                self.store.scalar(
                    "SELECT COUNT(*) FROM actions WHERE node = ? AND action IN ('drain', 'reboot')"
                    " AND state = 'done' AND COALESCE(started_at, created_at) > ?",
                    (node, now - self.policy.flap.window),
                )
                or 0
            )
            if self.store.flapping(node) or count + 1 >= self.policy.flap.max_drains:
                flapping = True
                auto_resume = False
                flap_note = (
                    f" [flapping: {count + 1} drains within {format_duration(self.policy.flap.window)}"
                    f" (max_drains {self.policy.flap.max_drains}): not auto-resumed, a human resumes it"
                )
                if act == "reboot":
                    act = "drain"
                    flap_note += "; drained instead of rebooted so it cannot return by itself"
                flap_note += "]"

        # breaker: blocks new drains/reboots/exec only (resumes and recording go on).
        breaker = self.store.breaker()
        if breaker["open"]:
            return decline(
                f"circuit breaker open since {iso(breaker['opened_at'])} ({breaker['reason']}); a human resets it",
                final=False,
            )

        # rate limit (token bucket; an approval does not wait for a token)
        if approved_by is None:
            tokens = self._tokens(now)
            if tokens < 1:
                wait = (1 - tokens) / self.policy.rate_limit.per_second
                return decline(
                    f"rate limit: {self.policy.rate_limit.actions_per_hour:g} actions/hour"
                    f" (burst {self.policy.rate_limit.burst}) used up; next token in {format_duration(wait)}",
                    final=False,
                )

        # caps, counted on the scheduler's view (every unavailable node counts): first on
        # the delivery's snapshot (a storm is declined without re-reading the scheduler),
        # then, for an action that passes, on a fresh read right before acting.
        if act in CAPACITY_ACTIONS:
            problem = self._cap_problem(view, node)
            if problem is None:
                view = self._fetch(ctx)
                if view is None:
                    return out("failed", f"the scheduler could not be read: {ctx.view_error}", final=False, retry=True)
                st = view.get(node)
                if st is None or not st.exists:
                    return decline(f"node {node} is unknown to the scheduler", final=True)
                if st.unavailable:
                    return decline(self._unavailable_reason(st), final=True)
                problem = self._cap_problem(view, node)
            if problem:
                if not dry:
                    self._breaker_event("cap", f"{act} {node} declined: {problem}")
                return decline(f"cap: {problem}", final=False)

        reason = rule.render_reason(alert.raw)
        # approval
        if rule.requires_approval and approved_by is None:
            if dry:
                return out("dry_run", f"dry-run ({dry_scope}): would wait for approval to {act} {node}{flap_note}")
            action_id = self.store.add_action(
                node=node,
                action=act,
                reason=reason,
                state="pending",
                alert_key=alert.key,
                rule=rule.name,
                auto_resume=int(auto_resume),
                hold_down=rule.resume_hold_down,
                requested_by="engine",
                created_at=now,
                payload=json.dumps(alert.raw, sort_keys=True, default=str),
            )
            return out("pending_approval", f"waiting for approval: action {action_id} ({act} {node}){flap_note}",
                       action_id=action_id)  # fmt: skip

        if dry:
            return out("dry_run", f"dry-run ({dry_scope}): would {act} {node} with reason {reason!r}{flap_note}")

        if approved_by is None:
            self._take_token(now)
        if flapping:
            self.store.set_flapping(node, count + 1, flap_note.strip(" []"), now)
        return self._act(ctx, alert, rule, node, act, reason, auto_resume=auto_resume, note=flap_note,
                         pending_id=pending_id, requested_by=approved_by or "engine")  # fmt: skip

    @staticmethod
    def _unavailable_reason(st: NodeStatus) -> str:
        if st.ours:
            return f"already unavailable: taken out by gpufleet ({st.state}, {st.reason!r}); nothing to do"
        return (
            f"already unavailable: {st.state or 'unavailable'} for someone else ({st.reason!r});"
            " left as it is, reason not overwritten"
        )

    def _cap_problem(self, view: View, node: str) -> str | None:
        """Why taking ``node`` out would break a cap, counting every unavailable node
        in the view plus actions other engines have in flight (intents)."""
        caps = self.policy.caps
        in_flight = {a["node"] for a in self.store.actions(state="intent") if a["action"] in CAPACITY_ACTIONS}
        now = view.unavailable | in_flight
        after = now | {node}
        if len(after) > caps.max_unavailable_nodes:
            return (
                f"{len(after)} nodes would be unavailable (now {len(now)}),"
                f" max_unavailable_nodes is {caps.max_unavailable_nodes}"
            )
        target = view.get(node)
        for part in target.partitions if target else ():
            members = view.members.get(part, set())
            limit = caps.partition_limit(part, len(members))
            down = len(members & after)
            if down > limit:
                return (
                    f"partition {part}: {down} of {len(members)} nodes would be unavailable,"
                    f" at most {limit} allowed ({caps.ratio(part):.0%})"
                )
        return None

    def _tokens(self, now: float) -> float:
        rl = self.policy.rate_limit
        bucket = self.store.bucket()
        if bucket is None:
            return float(rl.burst)
        tokens, at = bucket
        return min(float(rl.burst), tokens + max(0.0, now - at) * rl.per_second)

    def _take_token(self, now: float) -> None:
        self.store.set_bucket(self._tokens(now) - 1, now)

    def _breaker_event(self, kind: str, detail: str) -> None:
        """Count a failure or a cap hit; trip the breaker at the threshold (persisted)."""
        now = self.clock()
        self.store.add_breaker_event(kind, detail, at=now)
        breaker = self.store.breaker()
        if breaker["open"]:
            return
        cfg = self.policy.breaker
        threshold = cfg.failures_to_trip if kind == "failure" else cfg.cap_hits_to_trip
        if threshold <= 0:
            return
        count = self.store.breaker_events(kind, since=now - cfg.failure_window, after_event=breaker["reset_after_event"])
        if count >= threshold:
            words = "action failures" if kind == "failure" else "cap hits"
            reason = f"{count} {words} within {format_duration(cfg.failure_window)}; last: {detail}"
            self.store.set_breaker(open=1, opened_at=now, reason=reason)
            self.store.add_audit("engine", "breaker-open", "", reason, at=now)
            log.warning("remediation circuit breaker open: %s", reason)

    # ---- acting -------------------------------------------------------------------------

    def _act(self, ctx: _Delivery, alert: Alert | None, rule: Rule, node: str, act: str, reason: str, *,
             auto_resume: bool, note: str = "", pending_id: int | None = None,
             requested_by: str = "engine") -> Outcome:  # fmt: skip
        """Intent (committed) -> actuator -> outcome (committed)."""
        now = self.clock()
        if pending_id is not None:
            action_id = pending_id
            self.store.update_action(action_id, state="intent", action=act, reason=reason, started_at=now,
                                     auto_resume=int(auto_resume), requested_by=requested_by)  # fmt: skip
        else:
            action_id = self.store.add_action(
                node=node,
                action=act,
                reason=reason,
                state="intent",
                alert_key=alert.key if alert else None,
                rule=rule.name,
                auto_resume=int(auto_resume),
                hold_down=rule.resume_hold_down,
                requested_by=requested_by,
                created_at=now,
                started_at=now,
                payload=json.dumps(alert.raw, sort_keys=True, default=str) if alert else None,
            )
        if alert is not None:
            self.store.upsert_alert(alert.key, final=1)
        started = time.perf_counter()
        readback: NodeStatus | None = None
        detail = ""
        error: str | None = None
        transient = False
        # The intent is committed (on disk) before the scheduler changes; the database
        # write lock is free while the actuator works (other engines count the intent).
        with self.store.outside_transaction():
            try:
                if act == "drain":
                    readback = self.actuator.drain(node, reason)
                elif act == "reboot":
                    readback = self.actuator.reboot(node, reason)
                elif act == "exec":
                    assert rule.exec is not None
                    detail = self._exec(rule.exec, node, alert.raw if alert else {"labels": {"node": node}}, reason)
                else:  # pragma: no cover - policy validation prevents it
                    raise ActuatorError(f"unknown action {act}", transient=False)
            except ActuatorError as exc:
                error, transient = str(exc), exc.transient
            except Exception as exc:  # a bug or an unexpected failure in an actuator
                error, transient = f"{type(exc).__name__}: {exc}", True
        elapsed = time.perf_counter() - started
        self._action_seconds.labels(act).observe(elapsed)

        if error is None and readback is not None and not (readback.unavailable and readback.ours):
            error = (
                f"read-back does not show our {act}: {readback.state or 'available'} ({readback.reason!r})"
            )
            transient = False
        finished = self.clock()
        if error is None:
            if readback is not None:
                detail = f"scheduler reports {readback.state} ({readback.reason!r})"
                if ctx.view is not None:
                    ctx.view.update(node, readback)
                self.store.set_ownership(
                    node,
                    action_id=action_id,
                    since=finished,
                    reason=reason,
                    alert_key=alert.key if alert else None,
                    rule=rule.name,
                    auto_resume=int(auto_resume),
                    hold_down=rule.resume_hold_down,
                )
            self.store.update_action(action_id, state="done", finished_at=finished, outcome=f"done: {detail}",
                                     readback=_status_dict(readback))  # fmt: skip
            self.store.bump("actions", {"action": act, "result": "done"})
            self.store.commit_now()
            return Outcome("acted", f"{act} {node}: {detail}{note}", rule=rule.name, action=act, action_id=action_id)

        self.store.update_action(action_id, state="failed", finished_at=finished, outcome=f"failed: {error}",
                                 readback=_status_dict(readback))  # fmt: skip
        self.store.bump("actions", {"action": act, "result": "failed"})
        ctx.view = None  # the scheduler may differ from what the snapshot says: read it again
        self._breaker_event("failure", f"{act} {node}: {error}")
        if alert is not None and transient:
            self.store.upsert_alert(alert.key, final=0)
        self.store.commit_now()
        later = "; a resend is judged again (after the cooldown)" if transient else ""
        return Outcome("failed", f"{act} {node} failed: {error}{later}", rule=rule.name, action=act,
                       action_id=action_id, final=not transient)  # fmt: skip

    # ---- resolution and auto-resume -----------------------------------------------------

    def _resolved(self, ctx: _Delivery, alert: Alert) -> Outcome:
        now = self.clock()
        seen = self.store.alert(alert.key)
        if seen is not None and seen["status"] == "resolved":
            self.store.upsert_alert(alert.key, last_delivery=ctx.delivery_id, updated_at=now)
            return Outcome("duplicate", f"resolution already recorded (delivery {seen['last_delivery']})",
                           rule=seen["rule"], action=seen["action"])  # fmt: skip
        rule = self.policy.match(alert.labels)
        rule_name = seen["rule"] if seen else (rule.name if rule else None)
        action = seen["action"] if seen else (rule.action if rule else None)
        fields: dict[str, Any] = {"status": "resolved", "final": 1, "resolved_at": now, "updated_at": now,
                                  "last_delivery": ctx.delivery_id, "rule": rule_name, "action": action}  # fmt: skip
        if seen is None:
            fields.update(fingerprint=alert.fingerprint, starts_at=alert.starts_at, first_delivery=ctx.delivery_id,
                          first_seen=now, node=alert.node, alertname=alert.alertname)  # fmt: skip
        self.store.upsert_alert(alert.key, **fields)

        def out(reason: str, **kw: Any) -> Outcome:
            return Outcome("resolved", reason, rule=rule_name, action=action, **kw)

        for pending in self.store.query(
            "SELECT id FROM actions WHERE state = 'pending' AND alert_key = ?", (alert.key,)
        ):
            self.store.update_action(pending["id"], state="cancelled", finished_at=now,
                                     outcome="cancelled: the alert resolved before approval")  # fmt: skip
            self.store.bump("actions", {"action": action or "drain", "result": "cancelled"})
        node = alert.node
        if not node:
            return out("resolved: no node label")
        own = self.store.ownership(node)
        if own is None:
            return out(f"resolved: gpufleet holds nothing on {node}")
        return self._schedule_resume(node, own, alert, out)

    def firing_alerts(self) -> list[dict[str, Any]]:
        """The alerts held as firing (key, fingerprint, node, alertname, updated_at), for
        reconciling with Alertmanager (remediation/amreconcile.py)."""
        return self.store.query(
            "SELECT key, fingerprint, starts_at, alertname, node, updated_at FROM alerts"
            " WHERE status = 'firing' ORDER BY first_seen"
        )

    def resolve_vanished(self, reasons: Mapping[str, str], *, who: str = "reconcile") -> list[dict[str, Any]]:
        """Resolve firing alerts whose resolution never arrived (``reasons``: alert key ->
        why it is over), exactly as a webhook "resolved" would: same records, same
        resume scheduling. Each decision is recorded with ``who`` and the reason first,
        and audited. An alert that is no longer firing (its resolution arrived meanwhile)
        is left alone."""
        records = []
        with self._lock, self.store.transaction():
            ctx = _Delivery(None)
            for key, why in reasons.items():
                row = self.store.alert(key)
                if row is None or row["status"] != "firing":
                    continue
                started = time.perf_counter()
                alert = Alert(key, row["fingerprint"], row["starts_at"], "resolved",
                              {"alertname": row["alertname"], "node": row["node"]}, {}, {})  # fmt: skip
                out = self._resolved(ctx, alert)
                out.reason = f"{why}: {out.reason}"
                duration = time.perf_counter() - started
                self._decision_seconds.observe(duration)
                self.store.add_audit(who, "resolve-vanished", row["node"],
                                     json.dumps({"alert_key": key, "alertname": row["alertname"], "why": why}),
                                     at=self.clock())  # fmt: skip
                records.append(self._record(out, alert=alert, who=who, duration=duration))
        return records

    def _schedule_resume(self, node: str, own: Mapping[str, Any], alert: Alert,
                         out: Callable[..., Outcome]) -> Outcome:  # fmt: skip
        now = self.clock()
        if not own["auto_resume"]:
            return out(f"resolved: {node} stays out of service, its drain (rule {own['rule']}) is not auto-resumed;"
                       " a human resumes it")  # fmt: skip
        flap = self.store.flapping(node)
        if flap:
            return out(f"resolved: {node} is flapping ({flap['reason']}); a human resumes it")
        active = self.store.active_alerts(node, actions=CAPACITY_ACTIONS, exclude_key=alert.key)
        if active:
            names = ", ".join(sorted({a["alertname"] for a in active}))
            return out(f"resolved: {len(active)} other alert(s) still firing on {node} ({names}); stays out of service")
        scheduled = self.store.actions(state="scheduled", node=node)
        if scheduled:
            return out(f"resolved: resume of {node} already scheduled for {iso(scheduled[0]['due_at'])}",
                       action_id=scheduled[0]["id"])  # fmt: skip
        hold = float(own["hold_down"])
        if self.dry_run:
            return out(f"resolved: dry-run (global): would schedule a resume of {node} after {format_duration(hold)}")
        action_id = self.store.add_action(
            node=node,
            action="resume",
            reason=f"auto-resume: {alert.alertname} resolved and stayed resolved for {format_duration(hold)}",
            state="scheduled",
            alert_key=alert.key,
            rule=own["rule"],
            requested_by="engine",
            created_at=now,
            due_at=now + hold,
            hold_down=hold,
        )
        return out(f"resolved: resume of {node} scheduled for {iso(now + hold)} (hold-down {format_duration(hold)});"
                   " cancelled if it fires again", action_id=action_id)  # fmt: skip

    def tick(self) -> dict[str, Any]:
        """Perform the auto-resumes whose hold-down has passed (call periodically).
        A resume happens only if the node is ours at that moment. At most every
        ``OWNERSHIP_REFRESH_SECONDS`` it also re-reads the scheduler to forget nodes
        someone else has resumed meanwhile (so nodes_drained stays true when no
        alert arrives)."""
        now = self.clock()
        with self._lock:
            # Also when nothing is owned: a drain that landed late after a crash is adopted here.
            if now - self._last_refresh >= OWNERSHIP_REFRESH_SECONDS:
                self._last_refresh = now
                with self.store.transaction():
                    self._fetch(_Delivery(None))
            due = self.store.query(
                "SELECT * FROM actions WHERE state = 'scheduled' AND due_at <= ? ORDER BY due_at, id", (now,)
            )
            if not due:
                return {"due": 0, "decisions": []}
            paused = self._paused()
            if paused:
                return {"due": len(due), "paused": True, "decisions": []}
            results = []
            with self.store.transaction():
                for action in due:
                    started = time.perf_counter()
                    out = self._due_resume(action)
                    if out is None:
                        continue
                    duration = time.perf_counter() - started
                    self._decision_seconds.observe(duration)
                    results.append(self._record(out, node=action["node"], alert_key=action["alert_key"], duration=duration))
            return {"due": len(due), "decisions": results}

    def _due_resume(self, action: Mapping[str, Any]) -> Outcome | None:
        node, action_id, now = action["node"], action["id"], self.clock()

        def cancel(decision: str, why: str) -> Outcome:
            self.store.update_action(action_id, state="cancelled", finished_at=now, outcome=f"cancelled: {why}")
            self.store.bump("actions", {"action": "resume", "result": "dry_run" if decision == "dry_run" else "cancelled"})
            return Outcome(decision, why, rule=action["rule"], action="resume", action_id=action_id)

        current = self.store.action(action_id)
        if current is None or current["state"] != "scheduled":
            return None
        flap = self.store.flapping(node)
        if flap:
            return cancel("declined", f"not resumed: {node} is flapping ({flap['reason']}); a human resumes it")
        active = self.store.active_alerts(node, actions=CAPACITY_ACTIONS)
        if active:
            names = ", ".join(sorted({a["alertname"] for a in active}))
            return cancel("declined", f"not resumed: alert(s) firing on {node} ({names})")
        try:
            st = self.actuator.node(node)
        except ActuatorError as exc:
            self._log({"event": "resume_postponed", "node": node, "action_id": action_id, "error": str(exc)})
            return None  # stays scheduled; the next tick tries again
        own = self.store.ownership(node)
        if not (st.exists and st.unavailable and st.ours):
            if own:
                self.store.release_ownership(node)
            return cancel("declined", f"not resumed: {node} is not ours now ({st.state or 'available'}, {st.reason!r})")
        if own is None or not own["auto_resume"]:
            return cancel("declined", f"not resumed: gpufleet's hold on {node} is no longer auto-resumable")
        if self.dry_run:
            return cancel("dry_run", f"dry-run (global): would resume {node}")
        return self._resume_now(action_id, node, who="engine")

    def _resume_now(self, action_id: int | None, node: str, *, who: str, rule: str | None = None) -> Outcome:
        """Intent -> actuator.resume -> outcome (caller holds the lock and a transaction)."""
        now = self.clock()
        if action_id is None:
            action_id = self.store.add_action(node=node, action="resume", reason=f"resumed by {who}", state="intent",
                                              rule=rule, requested_by=who, created_at=now, started_at=now)  # fmt: skip
        else:
            self.store.update_action(action_id, state="intent", started_at=now)
            rule = (self.store.action(action_id) or {}).get("rule")
        started = time.perf_counter()
        readback = None
        error = None
        with self.store.outside_transaction():  # the intent is committed first
            try:
                readback = self.actuator.resume(node)
            except ActuatorError as exc:
                error = str(exc)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._action_seconds.labels("resume").observe(time.perf_counter() - started)
        finished = self.clock()
        if error is None:
            self.store.update_action(action_id, state="done", finished_at=finished,
                                     outcome=f"done: scheduler reports {readback.state if readback else '?'}",
                                     readback=_status_dict(readback))  # fmt: skip
            self.store.bump("actions", {"action": "resume", "result": "done"})
            self.store.release_ownership(node)
            self.store.clear_flapping(node)
            self.store.commit_now()
            return Outcome("acted", f"resume {node}: scheduler reports {readback.state if readback else '?'}",
                           rule=rule, action="resume", action_id=action_id)  # fmt: skip
        self.store.update_action(action_id, state="failed", finished_at=finished, outcome=f"failed: {error}")
        self.store.bump("actions", {"action": "resume", "result": "failed"})
        self._breaker_event("failure", f"resume {node}: {error}")
        self.store.commit_now()
        return Outcome("failed", f"resume {node} failed: {error}", rule=rule, action="resume", action_id=action_id)

    # ---- start-up reconciliation --------------------------------------------------------

    def reconcile(self) -> dict[str, Any]:
        """Settle what a crash left behind, against the scheduler's real state:
        intents become done (the scheduler shows it) or failed (it does not); none is
        repeated blindly. Also releases nodes that are no longer ours and adopts nodes
        that carry our reason without a record (never auto-resumed)."""
        summary: dict[str, Any] = {"done": [], "failed": [], "cancelled": [], "unresolved": [], "released": [],
                                   "adopted": [], "interrupted_deliveries": 0}  # fmt: skip
        with self._lock, self.store.transaction():
            now = self.clock()
            interrupted = self.store.query("SELECT id FROM deliveries WHERE status = 'received'")
            for d in interrupted:
                self.store.finish_delivery(d["id"], "interrupted", at=now, error="the service stopped while deciding")
            summary["interrupted_deliveries"] = len(interrupted)
            for action in self.store.actions(state="intent"):
                try:
                    st = self.actuator.node(action["node"])
                except ActuatorError as exc:
                    summary["unresolved"].append(action["id"])
                    self._log({"event": "reconcile_postponed", "action_id": action["id"], "error": str(exc)})
                    continue
                state, why = self._reconcile_one(action, st)
                summary[state].append(action["id"])
                decision = {"done": "acted", "failed": "failed", "cancelled": "declined"}[state]
                self._record(
                    Outcome(decision, f"reconciled after a restart: {why}", rule=action["rule"], action=action["action"],
                            action_id=action["id"]),
                    node=action["node"], alert_key=action["alert_key"], who="reconcile",
                )  # fmt: skip
            ctx = _Delivery(None)
            view = self._fetch(ctx)
            if view is not None:
                summary["released"] = list(ctx.released)
                summary["adopted"] = list(ctx.adopted)
            else:
                summary["scheduler_error"] = ctx.view_error
            self.store.add_audit("engine", "reconcile", "", json.dumps(summary, sort_keys=True), at=now)
        self._log({"event": "reconcile", **summary})
        return summary

    def _reconcile_one(self, action: Mapping[str, Any], st: NodeStatus) -> tuple[str, str]:
        action_id, act, now = action["id"], action["action"], self.clock()
        where = f"{st.state or 'available'} ({st.reason!r})" if st.exists else "unknown to the scheduler"
        if act in CAPACITY_ACTIONS:
            if st.exists and st.unavailable and st.ours:
                self.store.update_action(action_id, state="done", finished_at=now, readback=_status_dict(st),
                                         outcome=f"done (reconciled): the scheduler shows our {act}: {where}")  # fmt: skip
                self.store.set_ownership(action["node"], action_id=action_id, since=now, reason=action["reason"],
                                         alert_key=action["alert_key"], rule=action["rule"],
                                         auto_resume=action["auto_resume"], hold_down=action["hold_down"])  # fmt: skip
                self.store.bump("actions", {"action": act, "result": "done"})
                return "done", f"the scheduler shows our {act} of {action['node']}: {where}"
            why = f"the scheduler does not show our {act} of {action['node']} ({where}); not repeated"
            self.store.update_action(action_id, state="failed", finished_at=now, readback=_status_dict(st),
                                     outcome=f"failed (reconciled): {why}")  # fmt: skip
            self.store.bump("actions", {"action": act, "result": "failed"})
            if action["alert_key"]:
                self.store.upsert_alert(action["alert_key"], final=0)  # a resend is judged again, guardrails and all
            return "failed", why
        if act == "resume":
            if st.exists and not st.unavailable:
                self.store.update_action(action_id, state="done", finished_at=now, readback=_status_dict(st),
                                         outcome=f"done (reconciled): {action['node']} is in service")  # fmt: skip
                self.store.release_ownership(action["node"])
                self.store.bump("actions", {"action": "resume", "result": "done"})
                return "done", f"{action['node']} is in service"
            why = f"{action['node']} is still out of service ({where}); the resume is not repeated"
            self.store.update_action(action_id, state="failed", finished_at=now, outcome=f"failed (reconciled): {why}")
            self.store.bump("actions", {"action": "resume", "result": "failed"})
            return "failed", why
        why = f"{act} on {action['node']} was interrupted; its outcome is unknown and it is not repeated"
        self.store.update_action(action_id, state="failed", finished_at=now, outcome=f"failed (reconciled): {why}")
        self.store.bump("actions", {"action": act, "result": "failed"})
        return "failed", why

    # ---- admin API ----------------------------------------------------------------------

    def approve(self, action_id: int, who: str) -> dict[str, Any]:
        """Approve a pending action: it runs through the guardrails again (paused,
        dry-run, node state, breaker, caps), not the cooldown or the rate limit."""
        with self._lock, self.store.transaction():
            action = self._pending(action_id)
            paused = self._paused()
            if paused:
                raise AdminError(f"paused by {paused['who']}: unpause before approving", code="conflict")
            self.store.add_approval(action_id, "approved", who, self.clock())
            self._audit(who, "approve", f"action {action_id}", f"{action['action']} {action['node']}")
            rule = self.policy.rule(action["rule"] or "")
            if rule is None:
                out = Outcome("declined", f"rule {action['rule']} is no longer in the policy", rule=action["rule"],
                              action=action["action"], action_id=action_id)  # fmt: skip
            else:
                alert = Alert.parse(json.loads(action["payload"] or "{}"))
                out = self._guard(_Delivery(None), alert, rule, action["node"], approved_by=who, pending_id=action_id)
                out.action_id = action_id
            current = self.store.action(action_id)
            if current and current["state"] == "pending":  # declined or dry-run: the approval is spent
                self.store.update_action(action_id, state="cancelled", finished_at=self.clock(),
                                         outcome=f"cancelled after approval by {who}: {out.reason}")  # fmt: skip
                self.store.bump("actions", {"action": action["action"],
                                            "result": "dry_run" if out.decision == "dry_run" else "cancelled"})  # fmt: skip
            record = self._record(out, node=action["node"], alert_key=action["alert_key"], who=who)
            return {**record, "state": (self.store.action(action_id) or {}).get("state")}

    def deny(self, action_id: int, who: str) -> dict[str, Any]:
        with self._lock, self.store.transaction():
            action = self._pending(action_id)
            now = self.clock()
            self.store.add_approval(action_id, "denied", who, now)
            self.store.update_action(action_id, state="cancelled", finished_at=now, outcome=f"cancelled: denied by {who}")
            self.store.bump("actions", {"action": action["action"], "result": "cancelled"})
            self._audit(who, "deny", f"action {action_id}", f"{action['action']} {action['node']}")
            out = Outcome("declined", f"denied by {who}", rule=action["rule"], action=action["action"], action_id=action_id)
            record = self._record(out, node=action["node"], alert_key=action["alert_key"], who=who)
            return {**record, "state": "cancelled"}

    def _pending(self, action_id: int) -> dict[str, Any]:
        action = self.store.action(int(action_id))
        if action is None:
            raise AdminError(f"no action {action_id}", code="not_found")
        if action["state"] != "pending":
            raise AdminError(f"action {action_id} is {action['state']}, not pending approval", code="conflict")
        return action

    def resume(self, node: str, who: str) -> dict[str, Any]:
        """A human returns a node gpufleet drained. Refused unless the scheduler shows
        it as ours right now (a foreign drain is never touched). Works while paused
        (a human's explicit call) but not in dry-run (nothing changes then)."""
        with self._lock, self.store.transaction():
            try:
                st = self.actuator.node(node)
            except ActuatorError as exc:
                raise AdminError(f"the scheduler could not be read: {exc}", code="conflict") from None
            if not st.exists:
                self._audit(who, "resume-refused", node, "unknown to the scheduler")
                self.store.commit_now()  # the refusal stays in the audit
                raise AdminError(f"node {node} is unknown to the scheduler", code="not_found")
            if not (st.unavailable and st.ours):
                what = f"{st.state or 'available'} ({st.reason!r})"
                self._audit(who, "resume-refused", node, f"not drained by gpufleet: {what}")
                self.store.commit_now()
                raise AdminError(f"refused: {node} is not taken out by gpufleet ({what}); resume it in the scheduler",
                                 code="conflict")  # fmt: skip
            self._audit(who, "resume", node, f"{st.state} ({st.reason!r})")
            own = self.store.ownership(node)
            if self.dry_run:
                out = Outcome("dry_run", f"dry-run (global): would resume {node} for {who}",
                              rule=own["rule"] if own else None, action="resume")  # fmt: skip
            else:
                self._cancel_scheduled(node, f"resumed by {who}")
                out = self._resume_now(None, node, who=who, rule=own["rule"] if own else None)
            return self._record(out, node=node, who=who)

    def pause(self, who: str) -> dict[str, Any]:
        with self._lock, self.store.transaction():
            self.store.set_flag("paused", 1, who, self.clock())
            self._audit(who, "pause")
        return {"paused": True, "by": who}

    def unpause(self, who: str) -> dict[str, Any]:
        with self._lock, self.store.transaction():
            self.store.set_flag("paused", 0, who, self.clock())
            self._audit(who, "unpause")
        return {"paused": False, "by": who}

    def reset_breaker(self, who: str) -> dict[str, Any]:
        """Close the breaker; the failures and cap hits counted so far no longer count."""
        with self._lock, self.store.transaction():
            before = self.store.breaker()
            now = self.clock()
            self.store.set_breaker(open=0, reason="", reset_at=now, reset_by=who,
                                   reset_after_event=self.store.last_breaker_event())  # fmt: skip
            self._audit(who, "reset-breaker", "", f"was {'open' if before['open'] else 'closed'}: {before['reason']}")
        return {"breaker_open": False, "was_open": bool(before["open"]), "by": who}

    # ---- queries ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The state a human needs before touching anything (no lock: never waits on a
        delivery in progress)."""
        now = self.clock()
        breaker = self.store.breaker()
        cfg = self.policy.breaker
        since = now - cfg.failure_window
        paused = self.store.flag("paused") or {"value": 0, "who": "", "at": None}
        pending = self.store.actions(state="pending")
        scheduled = self.store.actions(state="scheduled")
        out: dict[str, Any] = {
            "dry_run": self.dry_run,
            "paused": bool(paused["value"]),
            "paused_by": paused["who"] or None,
            "paused_at": iso(paused["at"]) if paused["value"] else None,
            "breaker": {
                "open": bool(breaker["open"]),
                "opened_at": iso(breaker["opened_at"]),
                "reason": breaker["reason"],
                "reset_at": iso(breaker["reset_at"]) if breaker["reset_at"] else None,
                "reset_by": breaker["reset_by"] or None,
                "failures_in_window": self.store.breaker_events("failure", since=since,
                                                                after_event=breaker["reset_after_event"]),
                "cap_hits_in_window": self.store.breaker_events("cap", since=since,
                                                                after_event=breaker["reset_after_event"]),
                "failures_to_trip": cfg.failures_to_trip,
                "cap_hits_to_trip": cfg.cap_hits_to_trip,
                "window_seconds": cfg.failure_window,
            },  # fmt: skip
            "pending_approvals": [_action_view(a) for a in pending],
            "scheduled_resumes": [_action_view(a) for a in scheduled],
            "owned_nodes": [
                {"node": o["node"], "since": iso(o["since"]), "reason": o["reason"], "rule": o["rule"],
                 "auto_resume": bool(o["auto_resume"]), "action_id": o["action_id"]}
                for o in self.store.owned_nodes()
            ],  # fmt: skip
            "flapping": [{"node": f["node"], "since": iso(f["flagged_at"]), "reason": f["reason"]}
                         for f in self.store.flapping_nodes()],  # fmt: skip
            "rate_limit": {
                "tokens": round(self._tokens(now), 3),
                "burst": self.policy.rate_limit.burst,
                "actions_per_hour": self.policy.rate_limit.actions_per_hour,
            },
        }
        try:
            out["unavailable"] = unavailable_summary(self.actuator.nodes().values(), self.policy)
        except ActuatorError as exc:
            out["unavailable"] = {"error": str(exc)}
        return out

    def readiness(self) -> dict[str, str]:
        """For /readyz: "ok" or the error, for the store and the scheduler."""
        out = {}
        try:
            self.store.scalar("SELECT COUNT(*) FROM breaker")
            out["store"] = "ok"
        except Exception as exc:
            out["store"] = f"{type(exc).__name__}: {exc}"
        try:
            self.actuator.ping()
            out["scheduler"] = "ok"
        except Exception as exc:
            out["scheduler"] = str(exc) or type(exc).__name__
        return out

    def history(self, limit: int = 100, node: str | None = None) -> list[dict[str, Any]]:
        """Decisions joined with their actions, newest first."""
        rows = self.store.history(limit=limit, node=node)
        for row in rows:
            row["at_iso"] = iso(row["at"])
            if row.get("action_readback"):
                row["action_readback"] = json.loads(row["action_readback"])
        return rows

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Admin calls and engine events (breaker trips, reconcile), newest first."""
        rows = self.store.audit(limit)
        for row in rows:
            row["at_iso"] = iso(row["at"])
        return rows


def _action_view(a: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": a["id"],
        "node": a["node"],
        "action": a["action"],
        "reason": a["reason"],
        "rule": a["rule"],
        "alert_key": a["alert_key"],
        "created_at": iso(a["created_at"]),
        "due_at": iso(a["due_at"]),
    }


def unavailable_summary(statuses: Iterable[NodeStatus], policy: Policy) -> dict[str, Any]:
    """Unavailable nodes (every cause) per partition and in total, with the caps."""
    total = ours = 0
    parts: dict[str, dict[str, Any]] = {}
    for st in statuses:
        if not st.exists:
            continue
        total += st.unavailable
        ours += st.unavailable and st.ours
        for p in st.partitions:
            entry = parts.setdefault(p, {"nodes": 0, "unavailable": 0})
            entry["nodes"] += 1
            entry["unavailable"] += st.unavailable
    for p, entry in parts.items():
        entry["limit"] = policy.caps.partition_limit(p, entry["nodes"])
        entry["ratio"] = policy.caps.ratio(p)
    return {"total": total, "ours": ours, "limit": policy.caps.max_unavailable_nodes, "partitions": parts}


class _StoreCollector:
    """Metrics read from the store at scrape time, so they survive restarts."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self) -> list:
        return [
            CounterMetricFamily("gpufleet_remediation_actions", "", labels=["action", "result"]),
            CounterMetricFamily("gpufleet_remediation_decisions", "", labels=["decision"]),
            GaugeMetricFamily("gpufleet_remediation_breaker_open", ""),
            GaugeMetricFamily("gpufleet_remediation_paused", ""),
            GaugeMetricFamily("gpufleet_remediation_dry_run", ""),
            GaugeMetricFamily("gpufleet_remediation_pending_approvals", ""),
            GaugeMetricFamily("gpufleet_remediation_scheduled_resumes", ""),
            GaugeMetricFamily("gpufleet_remediation_nodes_drained", ""),
            GaugeMetricFamily("gpufleet_remediation_flapping_nodes", ""),
            GaugeMetricFamily("gpufleet_remediation_rate_limit_tokens", ""),
        ]

    def collect(self) -> Iterable:
        engine, store = self.engine, self.engine.store
        actions = CounterMetricFamily(
            "gpufleet_remediation_actions",
            "Actions by result (done, failed, dry_run, cancelled); persisted across restarts.",
            labels=["action", "result"],
        )
        seen = {(lab.get("action", ""), lab.get("result", "")): v for lab, v in store.counters("actions")}
        for act in (*MUTATING_ACTIONS, "resume", "notify"):
            for result in RESULTS:
                seen.setdefault((act, result), 0.0)
        for (act, result), v in sorted(seen.items()):
            actions.add_metric([act, result], v)
        yield actions
        decisions = CounterMetricFamily(
            "gpufleet_remediation_decisions",
            "Decisions by kind (acted, dry_run, declined, failed, pending_approval, duplicate, unmatched, resolved).",
            labels=["decision"],
        )
        counts = {lab.get("decision", ""): v for lab, v in store.counters("decisions")}
        for d in DECISIONS:
            counts.setdefault(d, 0.0)
        for d, v in sorted(counts.items()):
            decisions.add_metric([d], v)
        yield decisions

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        paused = store.flag("paused")
        yield gauge("gpufleet_remediation_breaker_open",
                    "1 while the circuit breaker blocks new drains (a human resets it).",
                    float(bool(store.breaker()["open"])))  # fmt: skip
        yield gauge("gpufleet_remediation_paused", "1 while an admin paused all actions.",
                    float(bool(paused and paused["value"])))  # fmt: skip
        yield gauge("gpufleet_remediation_dry_run", "1 when dry-run is on globally.", float(engine.dry_run))
        yield gauge("gpufleet_remediation_pending_approvals", "Actions waiting for a human's approval.",
                    float(store.scalar("SELECT COUNT(*) FROM actions WHERE state = 'pending'") or 0))  # fmt: skip
        yield gauge("gpufleet_remediation_scheduled_resumes", "Auto-resumes waiting for their hold-down.",
                    float(store.scalar("SELECT COUNT(*) FROM actions WHERE state = 'scheduled'") or 0))  # fmt: skip
        yield gauge("gpufleet_remediation_nodes_drained", "Nodes gpufleet holds out of service now (its reason).",
                    float(store.scalar("SELECT COUNT(*) FROM ownership") or 0))  # fmt: skip
        yield gauge("gpufleet_remediation_flapping_nodes", "Nodes flagged as flapping (not auto-resumed).",
                    float(store.scalar("SELECT COUNT(*) FROM flap") or 0))  # fmt: skip
        yield gauge("gpufleet_remediation_rate_limit_tokens", "Tokens left in the rate-limit bucket.",
                    engine._tokens(engine.clock()))  # fmt: skip
