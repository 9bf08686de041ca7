"""Crash test: kill -9 the service in the middle of a burst, restart it, and check that
the audit and the scheduler agree.

The service runs against real Slurm through a bin dir whose ``scontrol`` sleeps before
``update`` (then runs the real one). A burst of deliveries goes out from 12 threads;
after the first 2xx, the moment an action's intent is committed and its ``scontrol
update`` is running, the service gets SIGKILL: the scheduler acts a moment later and
the outcome is never written. Like the scheduler's own RPC, the orphaned
``scontrol`` finishes after the service is gone; the test waits for it before the
restart, so that the restart's reconcile reads the scheduler's final state.

After the restart (same database) and its reconcile:
* every node Slurm shows drained with our ``gpufleet:`` reason has exactly one
  ``done`` drain action, and every done drain is drained in Slurm (agreement);
* no node was drained twice, no action is left in ``intent``;
* every delivery that got a 2xx is in the history with a decision for each alert;
* re-sending the whole burst (what Alertmanager does: retries and repeat_interval)
  changes none of that.
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from exporters.localslurm import LocalSlurm
from tests.conftest import wait_for
from tests.remediation_proc import ServiceProcess, alert, payload, policy_file
from tests.slurm_fixture import NODES

pytestmark = pytest.mark.integration

SLOW_UPDATE = 0.4


def slow_bin_dir(path: Path, slurm: LocalSlurm) -> Path:
    path.mkdir()
    for name in ("sinfo", "scontrol"):
        real = slurm.binary(name)
        delay = f'case " $* " in *" update "*) sleep {SLOW_UPDATE};; esac\n' if name == "scontrol" else ""
        script = path / name
        script.write_text(f"#!/bin/sh\n# gpufleet crash test wrapper\n{delay}exec {real} \"$@\"\n")
        script.chmod(0o755)
    return path


def wrapper_processes(bin_dir: Path, arg: str = "") -> list[int]:
    """Our wrapper scripts running now (with ``arg`` among their arguments)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if any(str(bin_dir).encode() in a for a in argv) and (not arg or arg.encode() in argv):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def burst() -> list[dict]:
    """24 deliveries: 4 nodes x 3 alerts, each delivered twice (an HA pair)."""
    names = ("GpuRowRemapFailure", "GpuXidHardwareInspection", "GpuMissing")
    one = [payload(alert(node, name)) for name in names for node in NODES]
    return [p for pair in zip(one, one, strict=True) for p in pair]


def send_all(svc: ServiceProcess, deliveries: list[dict], *, threads: int = 12,
             on_success=None) -> dict[int, tuple[int, dict | None]]:  # fmt: skip
    """Post every delivery from ``threads`` threads; index -> (status or 0, body)."""
    results: dict[int, tuple[int, dict | None]] = {}
    lock = threading.Lock()
    queue = list(enumerate(deliveries))

    def worker() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not queue:
                    return
                i, body = queue.pop(0)
            try:
                r = session.post(svc.url + "/alerts", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {svc.webhook_token_file.read_text().strip()}"})
                results[i] = (r.status_code, r.json() if r.headers.get("content-type") == "application/json" else None)
                if r.status_code == 200 and on_success:
                    on_success()
            except requests.RequestException:
                results[i] = (0, None)  # the service died under this request

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return results


def check_agreement(svc: ServiceProcess, slurm: LocalSlurm) -> dict[str, int]:
    """Audit and scheduler agree; returns node -> done drain action id."""
    why = dict(ln.split("|")[:2] for ln in slurm.run("sinfo", "-h", "-N", "-O", "NodeList:|,Reason:|")
               .stdout.splitlines() if "|" in ln)  # fmt: skip
    ours_in_slurm = {n for n, st in slurm.node_states().items() if "drain" in st and why[n].startswith("gpufleet:")}
    with sqlite3.connect(f"file:{svc.db}?mode=ro", uri=True) as db:
        done = db.execute("SELECT node, id FROM actions WHERE action = 'drain' AND state = 'done'").fetchall()
        intents = db.execute("SELECT COUNT(*) FROM actions WHERE state = 'intent'").fetchone()[0]
    per_node = collections.Counter(node for node, _ in done)
    assert all(c == 1 for c in per_node.values()), f"a node drained twice: {done}"
    assert set(per_node) == ours_in_slurm, f"audit {sorted(per_node)} vs Slurm {sorted(ours_in_slurm)}"
    assert intents == 0, "an action was left in intent after reconcile"
    owned = {o["node"] for o in svc.admin("GET", "status")["owned_nodes"]}
    assert owned == ours_in_slurm
    return {node: action_id for node, action_id in done}


def check_recorded(svc: ServiceProcess, results: dict[int, tuple[int, dict | None]]) -> int:
    """Every delivery answered 2xx is in the history, one decision per alert."""
    by_delivery = collections.Counter(h["delivery_id"] for h in svc.history(limit=10000) if h["delivery_id"])
    ok = [body for status, body in results.values() if status == 200]
    for body in ok:
        assert by_delivery[body["delivery_id"]] == body["alerts"] == 1, (body, by_delivery)
    return len(ok)


def test_kill_9_mid_burst_then_restart_loses_nothing_and_repeats_nothing(tmp_path, slurm):
    bin_dir = slow_bin_dir(tmp_path / "bin", slurm)
    policy = policy_file(tmp_path / "policy.yml", caps={"max_unavailable_ratio": 1.0, "max_unavailable_nodes": 4},
                         rate_limit={"actions_per_hour": 3600, "burst": 100},
                         breaker={"failures_to_trip": 100, "cap_hits_to_trip": 0})  # fmt: skip
    svc = ServiceProcess(tmp_path / "svc", policy=policy, slurm_conf=slurm.conf_path,
                         args=["--slurm.bin-dir", str(bin_dir)])  # fmt: skip
    svc.start()
    deliveries = burst()
    answered_once, killed = threading.Event(), threading.Event()

    def in_flight() -> bool:
        if not wrapper_processes(bin_dir, "update"):
            return False
        with sqlite3.connect(f"file:{svc.db}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM actions WHERE state = 'intent'").fetchone()[0] > 0

    def killer() -> None:
        # After the first 2xx, once an action's intent is committed and its scontrol
        # update is running (asleep in the wrapper): kill -9, so the outcome is never written.
        if answered_once.wait(30):
            deadline = time.monotonic() + 20
            while not in_flight() and time.monotonic() < deadline:
                time.sleep(0.005)
        killed.set()
        svc.kill()

    watcher = threading.Thread(target=killer)
    watcher.start()
    try:
        first = send_all(svc, deliveries, on_success=answered_once.set)
        watcher.join(60)
        assert killed.is_set(), svc.log_tail()
        answered = sum(1 for status, _ in first.values() if status == 200)
        assert 0 < answered < len(deliveries), first  # killed in the middle
        wait_for(lambda: not wrapper_processes(bin_dir), timeout=15)  # orphaned scontrol calls finish

        svc.start()  # same database: reconcile runs before it serves
        (reconciled,) = [json.loads(a["detail"]) for a in svc.admin("GET", "audit")["audit"]
                         if a["what"] == "reconcile" and json.loads(a["detail"])["done"] + json.loads(a["detail"])["failed"]]
        assert len(reconciled["done"]) == 1, reconciled  # the drain in flight: the scheduler shows it, now done
        assert reconciled["interrupted_deliveries"] >= 1  # its delivery got no 2xx: Alertmanager retries it
        drained_before = check_agreement(svc, slurm)
        assert drained_before, "the kill came before any drain"
        assert check_recorded(svc, first) == answered

        # Alertmanager retries what got no 2xx and resends the rest: still one action per node.
        again = send_all(svc, deliveries)
        assert all(status == 200 for status, _ in again.values()), again
        drained_after = check_agreement(svc, slurm)
        assert {n: drained_after[n] for n in drained_before} == drained_before  # nothing redone
        check_recorded(svc, again)
        assert svc.stop() == 0, svc.log_tail()
    finally:
        svc.kill()
        for pid in wrapper_processes(bin_dir):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
