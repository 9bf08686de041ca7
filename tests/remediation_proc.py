"""gpufleet-remediation as a real process, for the Slurm, end-to-end and crash tests.

``ServiceProcess`` runs ``python -m remediation.service`` on 127.0.0.1 port 0 (it logs
the port it got), with token files and a database in the caller's directory, and
offers the webhook and admin calls the tests make. ``stop()`` sends SIGTERM (the
service's graceful stop), ``kill()`` SIGKILL; an ``atexit`` hook ends anything a failed
test left running. ``policy_file`` writes a test policy derived from the shipped one.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
SHIPPED_POLICY = REPO / "alerts" / "remediation-policy.yml"
WEBHOOK_TOKEN = "webhook-token-for-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-tests-9876543210"
STARTS = "2024-05-01T12:00:00.000Z"

_LIVE: set[ServiceProcess] = set()


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        proc.kill()


def policy_file(path: Path, *, caps: dict[str, Any] | None = None, rules: Sequence[dict[str, Any]] | None = None,
                **top: Any) -> Path:  # fmt: skip
    """The shipped policy with test caps (4 nodes: 10 % of a partition would be none)
    and optionally other rules or top-level keys."""
    doc = yaml.safe_load(SHIPPED_POLICY.read_text())
    doc["caps"] = {**doc["caps"], "max_unavailable_ratio": 0.5, "max_unavailable_nodes": 2, **(caps or {})}
    if rules is not None:
        doc["rules"] = list(rules)
    for key, value in top.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def alert(node: str, name: str = "GpuRowRemapFailure", *, status: str = "firing", remediation: str = "drain",
          starts: str = STARTS, **labels: str) -> dict[str, Any]:  # fmt: skip
    lab = {"alertname": name, "node": node, "severity": "critical", "remediation": remediation, "domain": "gpu",
           **labels}  # fmt: skip
    fingerprint = hashlib.sha256(json.dumps(lab, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "status": status,
        "labels": lab,
        "annotations": {"summary": f"{name} on {node}"},
        "startsAt": starts,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-01T13:00:00.000Z",
        "generatorURL": "http://prometheus.test/graph",
        "fingerprint": fingerprint,
    }


def payload(*alerts: dict[str, Any], receiver: str = "gpufleet-remediation") -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    common = alerts[0]["labels"] if len(alerts) == 1 else {}
    return {
        "version": "4",
        "groupKey": '{}/{remediation=~"^(?:drain|reboot)$"}:{alertname="x"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.test",
        "alerts": list(alerts),
    }


class ServiceProcess:
    def __init__(self, workdir: Path, *, policy: Path, actuator: str = "slurm", slurm_conf: Path | None = None,
                 db: Path | None = None, args: Iterable[str] = ()):  # fmt: skip
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.webhook_token_file = self.workdir / "webhook-token"
        self.admin_token_file = self.workdir / "admin-token"
        self.webhook_token_file.write_text(WEBHOOK_TOKEN + "\n")
        self.admin_token_file.write_text(ADMIN_TOKEN + "\n")
        self.db = db or self.workdir / "remediation.db"
        self.policy = policy
        self.actuator = actuator
        self.slurm_conf = slurm_conf
        self.extra = list(args)
        self.log_path = self.workdir / "service.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.session = requests.Session()

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "remediation.service", "--web.listen-address", "127.0.0.1:0",
                "--policy", str(self.policy), "--db", str(self.db), "--webhook-token-file", str(self.webhook_token_file),
                "--admin-token-file", str(self.admin_token_file), "--actuator", self.actuator,
                "--tick-interval", "200ms", "--log.level", "debug", *self.extra]  # fmt: skip
        if self.slurm_conf:
            argv += ["--slurm.conf", str(self.slurm_conf)]
        return argv

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, start_new_session=True)  # fmt: skip
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_bytes()[start_offset:].decode(errors="replace")
            m = re.search(r"msg=listening address=(\S+)", text)
            if m:
                self.url = m[1]
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpufleet-remediation exited {self.proc.returncode} during start-up\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gpufleet-remediation did not start within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)
        while True:  # listening is logged just before uvicorn starts serving
            try:
                if self.session.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gpufleet-remediation not serving\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                raise RuntimeError(f"gpufleet-remediation ignored SIGTERM for {timeout}s\n{self.log_tail()}") from None
        return proc.returncode

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    # -- calls -----------------------------------------------------------------------------
    def post(self, body: dict[str, Any], *, token: str | None = WEBHOOK_TOKEN, timeout: float = 60.0) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.session.post(self.url + "/alerts", json=body, headers=headers, timeout=timeout)

    def admin(self, method: str, path: str, *, who: str = "tester@test", expect: int | None = 200,
              **params: Any) -> Any:  # fmt: skip
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        body = {"who": who} if method == "POST" else None
        r = self.session.request(method, f"{self.url}/api/v1/{path}", json=body, params=params or None,
                                 headers=headers, timeout=60)  # fmt: skip
        if expect is not None:
            assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def history(self, node: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if node:
            params["node"] = node
        return self.admin("GET", "history", **params)["history"]

    def decisions(self, node: str | None = None, decision: str | None = None) -> list[dict[str, Any]]:
        return [h for h in self.history(node) if decision is None or h["decision"] == decision]

    def metrics(self) -> str:
        return self.session.get(self.url + "/metrics", timeout=10).text
