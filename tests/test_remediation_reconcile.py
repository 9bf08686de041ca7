"""Reconciling firing alerts with Alertmanager's API (remediation/amreconcile.py).

The bug: Alertmanager never delivers the resolution of an alert that resolves while it is
inhibited (the mute stage drops it, the aggregation group deletes it after the flush), so
the service believed a reboot-class alert still fired and never auto-resumed the node it
drained. These tests reproduce it against a real Alertmanager running a test-fast copy of
the shipped alerts/alertmanager.yml (its inhibit rule (b): GpuLost mutes the same GPU's
other alerts) and the service in-process (real uvicorn, the engine on the in-memory
scheduler, whose node state the tests read), once without and once with
``--alertmanager.url``; then an unreachable Alertmanager, and the engine's side (a firing
delivered again after reconcile resolved it is judged afresh).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client import generate_latest

from remediation.amreconcile import AlertReconciler
from remediation.engine import Engine
from remediation.memory import MemoryActuator
from remediation.policy import load_policy
from remediation.service import (
    RemediationService,
    ServiceState,
    build_parser,
    check_alertmanager,
    create_app,
    main,
)
from remediation.service import reconcile as startup_reconcile
from remediation.store import Store
from tests.conftest import need_binary, parse, value, wait_for
from tests.promstack import Alertmanager, WebhookSink, alertmanager_config_for_test, free_port
from tests.remediation_proc import REPO, WEBHOOK_TOKEN, alert, payload, policy_file

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
NODES = {f"gpu-node-{i}": ("gpu",) for i in range(1, 5)}
# The demo's choice (demo/config.py): a reboot-class alert drains with auto-resume.
RULES = [
    {"name": "reboot-class-drain", "match": {"remediation": "reboot"}, "action": "drain", "auto_resume": True,
     "resume_hold_down": "1s", "cooldown": "0"},
    {"name": "drain-hardware-suspect", "match": {"remediation": "drain"}, "action": "drain"},
]  # fmt: skip
GPU0 = {"node": NODE, "gpu": "0", "uuid": "GPU-0", "severity": "critical", "domain": "gpu", "remediation": "reboot"}
XID = {"alertname": "GpuXidRebootRequired", **GPU0}
LOST = {"alertname": "GpuLost", **GPU0}
RECONCILE = ["--alertmanager.reconcile-interval", "200ms", "--alertmanager.reconcile-grace", "1s"]


def rfc3339(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Stack:
    """Alertmanager (the shipped config, test timings, the remediation receiver pointed at
    the service, the others at a sink) and the service in-process on the in-memory
    scheduler; ``am_flags`` are the service's --alertmanager.* flags (``{am}`` is
    replaced by the Alertmanager's URL)."""

    def __init__(self, tmp: Path, am_flags: list[str]):
        tmp.mkdir(parents=True)
        self.actuator = MemoryActuator(NODES)
        self.store = Store(tmp / "state.db")
        self.engine = Engine(load_policy(str(policy_file(tmp / "policy.yml", rules=RULES))), self.store,
                             self.actuator)  # fmt: skip
        self.sink = WebhookSink()
        token = tmp / "webhook-token"
        token.write_text(WEBHOOK_TOKEN + "\n")
        port = free_port()
        config = tmp / "alertmanager.yml"
        cfg = alertmanager_config_for_test(REPO / "alerts" / "alertmanager.yml", config, webhook_base=self.sink.url,
                                           credentials_file=token,
                                           timings={"group_wait": "1s", "group_interval": "1s",
                                                    "repeat_interval": "1h"})  # fmt: skip
        (receiver,) = [r for r in cfg["receivers"] if r["name"] == "gpufleet-remediation"]
        receiver["webhook_configs"][0]["url"] = f"http://127.0.0.1:{port}/alerts"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.am = Alertmanager(config, tmp / "am", binary=need_binary("prometheus-alertmanager"))
        self.am.start()
        args = build_parser().parse_args(["--insecure-no-auth", *(f.format(am=self.am.url) for f in am_flags)])
        self.state = ServiceState()
        startup_reconcile(self.engine, self.state)
        app = create_app(self.engine, webhook_token=WEBHOOK_TOKEN, admin_token=None, state=self.state)
        client = check_alertmanager(args)
        self.reconciler = None
        if client is not None:
            self.reconciler = AlertReconciler(self.engine, client, app.state.reconcile_metrics,
                                              interval=args.alertmanager_interval, grace=args.alertmanager_grace)
        self.service = RemediationService(self.engine, app, "127.0.0.1", port, tick_interval=0.1, state=self.state,
                                          reconciler=self.reconciler).start()  # fmt: skip

    def close(self) -> None:
        self.service.stop()
        self.am.stop()
        self.sink.close()

    # -- what the tests look at --------------------------------------------------------------
    def post(self, labels: dict[str, str], starts: datetime, *, resolved: bool = False) -> None:
        body: dict[str, Any] = {"labels": labels, "annotations": {"summary": labels["alertname"]},
                                "startsAt": rfc3339(starts)}  # fmt: skip
        if resolved:
            body["endsAt"] = rfc3339(datetime.now(UTC))
        self.am.post_alerts([body])

    def drained(self) -> bool:
        st = self.actuator.node(NODE)
        return st.unavailable and st.ours

    def decisions(self, alertname: str, status: str | None = None) -> list[dict[str, Any]]:
        return [d for d in reversed(self.engine.history(limit=1000, node=NODE))
                if d["alertname"] == alertname and (status is None or d["alert_status"] == status)]  # fmt: skip

    def stored(self, alertname: str) -> dict[str, Any]:
        (row,) = self.store.query("SELECT * FROM alerts WHERE alertname = ?", (alertname,))
        return row

    def metric(self, name: str, **labels: str) -> float:
        return value(parse(self.service_metrics()), name, **labels)

    def service_metrics(self) -> str:
        return requests.get(self.service.url + "/metrics", timeout=10).text

    def wait_reconcile_runs(self, result: str, more: int) -> None:
        start = self.metric("gpufleet_remediation_alertmanager_reconcile_runs_total", result=result)
        wait_for(lambda: self.metric("gpufleet_remediation_alertmanager_reconcile_runs_total", result=result)
                 >= start + more, timeout=30, interval=0.1)  # fmt: skip

    def resolutions_delivered(self, alertname: str) -> list[dict[str, Any]]:
        """Resolutions of ``alertname`` that reached any receiver (the service or the sink)."""
        got = [d for d in self.decisions(alertname, "resolved") if d["delivery_id"] is not None]
        for n in self.sink.received():
            got += [a for a in n.body.get("alerts", [])
                    if a["labels"].get("alertname") == alertname and a["status"] == "resolved"]  # fmt: skip
        return got


def run_until_the_reboot_alert_resolves_while_inhibited(s: Stack) -> datetime:
    """Xid fires (drain, auto-resume) -> GpuLost fires and inhibits it -> Xid resolves
    while inhibited (Alertmanager flushes its group: nothing is sent, it is gone)."""
    starts = datetime.now(UTC) - timedelta(minutes=1)
    s.post(XID, starts)
    wait_for(lambda: s.drained() and s.decisions("GpuXidRebootRequired", "firing"), timeout=30)
    assert s.decisions("GpuXidRebootRequired", "firing")[0]["decision"] == "acted"
    s.post(LOST, starts)
    wait_for(lambda: any(a["status"]["inhibitedBy"] for a in s.am.find(alertname="GpuXidRebootRequired")), timeout=30)
    wait_for(lambda: s.decisions("GpuLost", "firing"), timeout=30)  # the node is already ours: declined
    s.post(XID, starts, resolved=True)
    # Alertmanager no longer lists it (resolved alerts never are) and its group flushed the
    # resolved alert through the mute stage (Alertmanager's debug log says so).
    wait_for(lambda: not s.am.find(alertname="GpuXidRebootRequired"), timeout=30)
    wait_for(lambda: re.search(r"msg=flushing alerts=\[GpuXidRebootRequired\[\w+\]\[resolved\]\]", s.am.log_tail(20000)),
             timeout=30)  # fmt: skip
    return starts


@pytest.fixture
def make_stack(tmp_path) -> Iterator[Any]:
    stacks: list[Stack] = []

    def make(am_flags: list[str]) -> Stack:
        stacks.append(Stack(tmp_path / f"stack{len(stacks)}", am_flags))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


def test_without_reconciliation_an_alert_resolved_while_inhibited_keeps_the_node_drained(make_stack):
    s = make_stack([])
    starts = run_until_the_reboot_alert_resolves_while_inhibited(s)
    s.post(LOST, starts, resolved=True)
    (lost,) = wait_for(lambda: s.decisions("GpuLost", "resolved"), timeout=30)
    assert lost["delivery_id"] is not None  # GpuLost's resolution was delivered ...
    assert "still firing" in lost["reason"] and "GpuXidRebootRequired" in lost["reason"], lost
    # ... the reboot alert's never was, to the service or to the pager: the bug.
    assert s.resolutions_delivered("GpuXidRebootRequired") == []
    assert s.stored("GpuXidRebootRequired")["status"] == "firing"
    assert s.engine.status()["scheduled_resumes"] == [] and s.drained()
    assert s.metric("gpufleet_remediation_alertmanager_reconcile_runs_total", result="ok") == 0


def test_reconciliation_resolves_it_and_the_node_resumes_but_inhibited_firing_alerts_stay(make_stack):
    s = make_stack(["--alertmanager.url", "{am}", *RECONCILE])
    starts = datetime.now(UTC) - timedelta(minutes=1)
    s.post(XID, starts)
    wait_for(s.drained, timeout=30)
    s.post(LOST, starts)
    wait_for(lambda: any(a["status"]["inhibitedBy"] for a in s.am.find(alertname="GpuXidRebootRequired")), timeout=30)
    # Inhibited but firing, for well over the grace period: not resolved.
    s.wait_reconcile_runs("ok", 8)
    assert s.stored("GpuXidRebootRequired")["status"] == "firing"
    assert s.metric("gpufleet_remediation_alertmanager_reconcile_missing_alerts") == 0
    assert s.metric("gpufleet_remediation_alertmanager_reconcile_resolved_total") == 0
    assert not [a for a in s.engine.audit() if a["who"] == "reconcile"]

    s.post(XID, starts, resolved=True)
    wait_for(lambda: re.search(r"msg=flushing alerts=\[GpuXidRebootRequired\[\w+\]\[resolved\]\]", s.am.log_tail(20000)),
             timeout=30)  # fmt: skip
    (xid,) = wait_for(lambda: s.decisions("GpuXidRebootRequired", "resolved"), timeout=30)
    assert xid["who"] == "reconcile" and xid["delivery_id"] is None, xid
    assert xid["reason"].startswith("Alertmanager no longer has this alert"), xid
    assert "GpuLost" in xid["reason"] and s.drained()  # GpuLost still fires: the node stays out
    assert s.resolutions_delivered("GpuXidRebootRequired") == []  # reconcile, not a delivery
    wait_for(lambda: s.metric("gpufleet_remediation_alertmanager_reconcile_resolved_total") == 1, timeout=10)
    (audit,) = [a for a in s.engine.audit() if a["who"] == "reconcile"]
    assert audit["what"] == "resolve-vanished" and audit["target"] == NODE

    s.post(LOST, starts, resolved=True)
    (lost,) = wait_for(lambda: s.decisions("GpuLost", "resolved"), timeout=30)
    assert lost["delivery_id"] is not None and "resume of gpu-node-1 scheduled" in lost["reason"], lost
    (resume,) = wait_for(lambda: [d for d in s.engine.history(node=NODE)
                                  if d["action"] == "resume" and d["decision"] == "acted"], timeout=30)  # fmt: skip
    assert resume["action_state"] == "done" and not s.drained()
    assert s.metric("gpufleet_remediation_alertmanager_reconcile_runs_total", result="unreachable") == 0


def test_an_unreachable_alertmanager_resolves_nothing(tmp_path, caplog):
    actuator = MemoryActuator(NODES)
    store = Store(tmp_path / "state.db")
    engine = Engine(load_policy(str(policy_file(tmp_path / "policy.yml", rules=RULES))), store, actuator)
    app = create_app(engine, webhook_token=None, admin_token=None)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = build_parser().parse_args(["--insecure-no-auth", "--alertmanager.url", closed,
                                      "--alertmanager.url", closed + "/sub", *RECONCILE])  # fmt: skip
    reconciler = AlertReconciler(engine, check_alertmanager(args), app.state.reconcile_metrics,
                                 interval=args.alertmanager_interval, grace=args.alertmanager_grace)  # fmt: skip
    engine.handle(payload(alert(NODE, "GpuXidRebootRequired", remediation="reboot", gpu="0")))
    assert actuator.node(NODE).ours
    caplog.set_level(logging.INFO, logger="gpufleet.remediation.reconcile")
    results = [reconciler.run_once() for _ in range(3)]
    reconciler.clock = lambda: time.time() + 3600  # an hour later: far past the grace period
    results += [reconciler.run_once() for _ in range(3)]
    assert {r["result"] for r in results} == {"unreachable"}, results
    assert all(closed in r["error"] and closed + "/sub" in r["error"] for r in results)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "no Alertmanager answers: firing alerts are not reconciled until one does"]  # once per outage
    assert store.query("SELECT status FROM alerts") == [{"status": "firing"}]
    assert not [d for d in engine.history(node=NODE) if d["who"] == "reconcile"] and actuator.node(NODE).ours
    assert engine.status()["scheduled_resumes"] == []
    samples = parse(generate_latest(engine.registry))
    assert value(samples, "gpufleet_remediation_alertmanager_reconcile_runs_total", result="unreachable") == 6
    assert value(samples, "gpufleet_remediation_alertmanager_reconcile_resolved_total") == 0
    store.close()


def test_a_firing_delivered_again_after_reconcile_resolved_it_is_judged_afresh(tmp_path):
    """The safety valve: if reconcile was wrong (an Alertmanager lost its alerts), the next
    delivery of the same firing reopens it and cancels the resume that reconcile scheduled."""
    actuator = MemoryActuator(NODES)
    store = Store(tmp_path / "state.db")
    engine = Engine(load_policy(str(policy_file(tmp_path / "policy.yml", rules=RULES))), store, actuator)
    firing = alert(NODE, "GpuXidRebootRequired", remediation="reboot", gpu="0")
    engine.handle(payload(firing))
    (row,) = engine.firing_alerts()
    (rec,) = engine.resolve_vanished({row["key"]: "Alertmanager no longer has this alert"})
    assert rec["decision"] == "resolved" and "resume of gpu-node-1 scheduled" in rec["reason"], rec
    assert len(engine.status()["scheduled_resumes"]) == 1 and engine.firing_alerts() == []
    # A webhook resolution of the same firing afterwards is a duplicate (nothing twice).
    resolved = {**firing, "status": "resolved"}
    assert engine.handle(payload(resolved))["decisions"][0]["decision"] == "duplicate"
    engine.resolve_vanished({row["key"]: "again"})  # no longer firing: left alone
    assert len([d for d in engine.history(node=NODE) if d["who"] == "reconcile"]) == 1

    (out,) = engine.handle(payload(firing))["decisions"]
    assert out["decision"] != "duplicate" and out["reason"].startswith("reopened:"), out
    assert engine.status()["scheduled_resumes"] == [] and actuator.node(NODE).ours
    assert [r["key"] for r in engine.firing_alerts()] == [row["key"]]
    # A firing resolved by a webhook stays resolved when a stale resend follows (unchanged).
    engine.handle(payload(resolved))
    assert engine.handle(payload(firing))["decisions"][0]["decision"] == "duplicate"
    store.close()


@pytest.mark.parametrize(("flags", "words"), [
    (["--alertmanager.reconcile-grace", "1m"], "without --alertmanager.url"),
    (["--alertmanager.url", "127.0.0.1:9093"], "expected http(s)://host:port"),
    (["--alertmanager.url", "http://a:9093", "--alertmanager.url", "http://a:9093"], "given twice"),
    (["--alertmanager.url", "http://a:9093", "--alertmanager.basic-auth-user", "u"], "go together"),
    (["--alertmanager.url", "http://a:9093", "--alertmanager.token-file", "/nonexistent/t"], "cannot read"),
])  # fmt: skip
def test_bad_alertmanager_flags_are_clear_configuration_errors(tmp_path, capsys, flags, words):
    base = ["--actuator", "none", "--db", str(tmp_path / "db"), "--insecure-no-auth", "--check-config"]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert main([*base, *flags]) == 2
        assert words in capsys.readouterr().err
        assert main([*base, "--alertmanager.url", "http://am-1:9093", "--alertmanager.url", "http://am-2:9093"]) == 0
        assert "reconciling with 2 Alertmanager(s) every 60s" in capsys.readouterr().out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
