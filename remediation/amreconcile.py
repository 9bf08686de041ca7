"""Reconcile the alerts the engine holds as firing with Alertmanager's own list.

Why. The engine learns that an alert resolved only from a webhook "resolved"
notification, and Alertmanager does not always send one. An alert that resolves while
it is inhibited (alerts/alertmanager.yml: GpuLost mutes the same GPU's other alerts,
SlurmNodeDown a node's GPU alerts) or silenced is dropped by the notification
pipeline's mute stage, and the aggregation group then deletes the resolved alert: its
resolution is never delivered. The same happens when the service was unreachable for
longer than Alertmanager retried. The engine would then believe the alert fires for
ever and never auto-resume the node it drained (safe, but the node stays out until a
human resumes it).

How. Every ``--alertmanager.reconcile-interval`` the ``AlertReconciler`` asks each
Alertmanager (``GET /api/v2/alerts`` with active, silenced, inhibited and unprocessed
alerts: every alert it still holds, resolved ones are never listed) and takes the
union of the fingerprints of those that answer. An alert the engine holds as firing
whose fingerprint no answering Alertmanager has, continuously for at least the grace
period, is resolved through the engine's own resolution path (``Engine.resolve_vanished``,
audited as ``who="reconcile"``). An alert Alertmanager still has, inhibited or
silenced or not, stays firing.

Never on missing data: when no Alertmanager answers (or every one that answers started
less than the grace period ago, so Prometheus may not have re-sent it everything yet:
Alertmanager keeps no alerts across a restart), nothing is resolved, the outage is
logged once and counted, and the grace period starts again once one answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge

from remediation.policy import format_duration

log = logging.getLogger("gpufleet.remediation.reconcile")

RUN_RESULTS = ("ok", "warming_up", "unreachable", "failed")
ALERTS_QUERY = {"active": "true", "silenced": "true", "inhibited": "true", "unprocessed": "true"}


class AlertmanagerUnavailable(Exception):
    """No Alertmanager gave a usable answer (the message says why, per URL). ``warming_up``:
    some answered, but each started less than the grace period ago."""

    def __init__(self, message: str, *, warming_up: bool = False):
        super().__init__(message)
        self.warming_up = warming_up


def read_secret(path: str | Path, what: str) -> str:
    """One line from a secret file, surrounding whitespace stripped (read on every use, so a
    rotated token needs no restart, like Alertmanager's own ``credentials_file``)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AlertmanagerUnavailable(f"{what} {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if not text:
        raise AlertmanagerUnavailable(f"{what} {path} is empty")
    return text


def _parse_time(text: str) -> float:
    """RFC 3339 (Alertmanager's ``uptime``, with up to nanoseconds) -> epoch seconds."""
    value = text.strip().replace("Z", "+00:00")
    head, dot, rest = value.partition(".")
    if dot:  # fromisoformat takes at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        value = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    return datetime.fromisoformat(value).timestamp()


@dataclass
class AlertmanagerClient:
    """Reads Alertmanager API v2 from one or more instances (an HA pair answers alike:
    Prometheus sends every alert to each of them)."""

    urls: Sequence[str]
    timeout: float = 10.0
    token_file: str | None = None
    basic_auth_user: str | None = None
    basic_auth_password_file: str | None = None
    ca_file: str | None = None
    session: requests.Session = field(default_factory=requests.Session)

    def _request_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"timeout": self.timeout, "allow_redirects": False}
        if self.ca_file:
            args["verify"] = self.ca_file
        if self.token_file:
            args["headers"] = {"Authorization": f"Bearer {read_secret(self.token_file, '--alertmanager.token-file')}"}
        elif self.basic_auth_user:
            password = read_secret(self.basic_auth_password_file or "", "--alertmanager.basic-auth-password-file")
            args["auth"] = (self.basic_auth_user, password)
        return args

    def _get(self, url: str, path: str, params: dict[str, str] | None = None) -> Any:
        r = self.session.get(url.rstrip("/") + path, params=params, **self._request_args())
        if r.status_code != 200:
            raise AlertmanagerUnavailable(f"GET {path}: HTTP {r.status_code} {r.text[:200].strip()}")
        try:
            return r.json()
        except ValueError:
            raise AlertmanagerUnavailable(f"GET {path}: the answer is not JSON") from None

    def fetch(self, url: str) -> tuple[set[str], float]:
        """Fingerprints of every alert one Alertmanager holds (any state), and when it
        started (``/api/v2/status`` uptime)."""
        status = self._get(url, "/api/v2/status")
        try:
            started = _parse_time(str(status["uptime"]))
        except (KeyError, TypeError, ValueError):
            raise AlertmanagerUnavailable("GET /api/v2/status: no valid uptime in the answer") from None
        alerts = self._get(url, "/api/v2/alerts", ALERTS_QUERY)
        if not isinstance(alerts, list):
            raise AlertmanagerUnavailable("GET /api/v2/alerts: expected a list of alerts")
        fingerprints = set()
        for a in alerts:
            fp = a.get("fingerprint") if isinstance(a, dict) else None
            if not isinstance(fp, str) or not fp:
                raise AlertmanagerUnavailable("GET /api/v2/alerts: an alert without a fingerprint")
            fingerprints.add(fp)
        return fingerprints, started


class ReconcileMetrics:
    """The reconciler's series, registered in the engine's registry by the service
    (always, so the catalogue and dashboards see them even when it is off)."""

    def __init__(self, registry: CollectorRegistry):
        self.runs = Counter(
            "gpufleet_remediation_alertmanager_reconcile_runs",
            "Reconcile runs against Alertmanager's API by result (ok; warming_up: every Alertmanager that answered "
            "started less than the grace period ago; unreachable: none gave a usable answer; failed: the store "
            "failed; nothing is resolved but on ok), since start.",
            ["result"],
            registry=registry,
        )
        for result in RUN_RESULTS:
            self.runs.labels(result)
        self.resolved = Counter(
            "gpufleet_remediation_alertmanager_reconcile_resolved",
            "Alerts resolved because no Alertmanager had them any more (their resolution never reached the "
            "webhook), since start.",
            registry=registry,
        )
        self.missing = Gauge(
            "gpufleet_remediation_alertmanager_reconcile_missing_alerts",
            "Alerts held as firing that no answering Alertmanager has, waiting out the grace period.",
            registry=registry,
        )
        self.last_success = Gauge(
            "gpufleet_remediation_alertmanager_reconcile_last_success_timestamp_seconds",
            "When a reconcile run last got a usable answer from an Alertmanager (0: never; off without "
            "--alertmanager.url).",
            registry=registry,
        )


class AlertReconciler(threading.Thread):
    """Every ``interval``: resolve the engine's firing alerts that no Alertmanager has
    had for ``grace`` (see the module docstring). ``run_once`` is one run (tests)."""

    def __init__(self, engine: Any, client: AlertmanagerClient, metrics: ReconcileMetrics, *, interval: float,
                 grace: float, clock: Callable[[], float] = time.time):  # fmt: skip
        super().__init__(name="remediation-am-reconcile", daemon=True)
        self.engine = engine
        self.client = client
        self.metrics = metrics
        self.interval = interval
        self.grace = grace
        self.clock = clock
        self.stopping = threading.Event()
        self.missing_since: dict[str, float] = {}
        self._outage: str | None = None

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.run_once()

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=60)

    def _ask(self) -> tuple[set[str], list[str]]:
        """Union of the fingerprints of every Alertmanager that answers and has been up for
        the grace period; raises AlertmanagerUnavailable if none qualifies."""
        present: set[str] = set()
        answered: list[str] = []
        problems = []
        young = False
        for url in self.client.urls:
            try:
                fingerprints, started = self.client.fetch(url)
            except (requests.RequestException, AlertmanagerUnavailable) as exc:
                problems.append(f"{url}: {exc}")
                continue
            up = self.clock() - started
            if up < self.grace:
                young = True
                problems.append(f"{url}: up for only {format_duration(up)}, less than the grace period "
                                f"{format_duration(self.grace)} (it keeps no alerts across a restart)")  # fmt: skip
                continue
            present |= fingerprints
            answered.append(url)
        if not answered:
            raise AlertmanagerUnavailable("; ".join(problems) or "no Alertmanager configured", warming_up=young)
        return present, answered

    def run_once(self) -> dict[str, Any]:
        """One reconcile run; returns what it saw and did."""
        started = self.clock()
        try:
            present, answered = self._ask()
        except AlertmanagerUnavailable as exc:
            result = "warming_up" if exc.warming_up else "unreachable"
            self.metrics.runs.labels(result).inc()
            self.missing_since.clear()  # no data: the grace period starts again once one answers
            self.metrics.missing.set(0)
            if self._outage != result:  # once per outage (and once more if it turns into the other kind)
                if exc.warming_up:
                    log.info("Alertmanager started recently: firing alerts are reconciled once it has been up "
                             "for the grace period", extra={"error": str(exc)})  # fmt: skip
                else:
                    log.warning("no Alertmanager answers: firing alerts are not reconciled until one does",
                                extra={"error": str(exc)})  # fmt: skip
            self._outage = result
            return {"result": result, "error": str(exc), "resolved": []}
        if self._outage is not None:
            log.info("an Alertmanager answers: reconciling firing alerts", extra={"alertmanagers": answered})
            self._outage = None
        try:
            resolved = self._settle(present, answered, started)
        except Exception as exc:  # a store failure: the next run tries again
            self.metrics.runs.labels("failed").inc()
            log.error("reconciling firing alerts failed", exc_info=exc)
            return {"result": "failed", "error": f"{type(exc).__name__}: {exc}", "resolved": []}
        self.metrics.runs.labels("ok").inc()
        self.metrics.last_success.set(self.clock())
        return {"result": "ok", "alertmanagers": answered, "resolved": resolved,
                "missing": sorted(self.missing_since)}  # fmt: skip

    def _settle(self, present: set[str], answered: list[str], asked_at: float) -> list[dict[str, Any]]:
        now = self.clock()
        firing = self.engine.firing_alerts()
        due: dict[str, str] = {}
        for row in firing:
            key = row["key"]
            # Delivered (or re-sent) after the question was asked: the answer may predate it.
            if row["fingerprint"] in present or float(row["updated_at"] or 0) >= asked_at:
                self.missing_since.pop(key, None)
                continue
            since = self.missing_since.setdefault(key, now)
            if now - since >= self.grace:
                due[key] = (f"Alertmanager no longer has this alert (gone from {', '.join(answered)} for "
                            f"{format_duration(now - since)}; its resolution never reached the webhook, e.g. "
                            "it resolved while inhibited or silenced)")  # fmt: skip
        keys = {row["key"] for row in firing}
        for key in list(self.missing_since):
            if key not in keys:
                del self.missing_since[key]
        records = self.engine.resolve_vanished(due, who="reconcile") if due else []
        for key in due:
            self.missing_since.pop(key, None)
        self.metrics.resolved.inc(len(records))
        self.metrics.missing.set(len(self.missing_since))
        if records:
            log.info("resolved alerts no Alertmanager has", extra={"alerts": [r["alert_key"] for r in records]})
        return records
