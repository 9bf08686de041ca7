"""The remediation service's HTTP layer and the admin CLI.

The service runs in this process (``RemediationService`` on 127.0.0.1 port 0, real
uvicorn, real sockets) around an engine whose actuator is the in-memory scheduler of
remediation/memory.py. That is on purpose and limited to this file: what is tested
here is the HTTP layer (validation, limits, auth, status codes, metrics, the admin API
and the CLI), for which the scheduler behind the engine does not matter. Everything
about Slurm runs against real Slurm in tests/test_remediation_slurm.py,
tests/test_remediation_e2e.py and tests/test_remediation_crash.py. A few tests start
the real program (``python -m remediation.service``, the ``gpufleet`` script) to check
the command lines, the refusal to start without tokens and the SIGTERM stop.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from remediation import cli
from remediation.engine import Engine
from remediation.memory import MemoryActuator
from remediation.service import (
    DISCARD_LIMIT,
    RemediationService,
    ServiceState,
    build_parser,
    create_app,
    main,
    reconcile,
)
from remediation.store import Store
from tests.conftest import parse, value, wait_for
from tests.remediation_proc import ADMIN_TOKEN, REPO, WEBHOOK_TOKEN, alert, payload
from tests.test_remediation_engine import make_policy

NODES = {f"gpu-node-{i}": ("gpu", "debug") if i <= 2 else ("gpu",) for i in range(1, 5)}
LIMIT = 64 * 1024
RULES = [
    {"name": "drain", "match": {"remediation": "drain"}, "action": "drain", "cooldown": "0"},
    {"name": "approve", "match": {"remediation": "approve"}, "action": "drain", "cooldown": "0",
     "requires_approval": True},
]  # fmt: skip


class Harness:
    """The service in-process, with the store and the in-memory scheduler at hand."""

    def __init__(self, tmp: Path, *, webhook_token: str | None = WEBHOOK_TOKEN, admin_token: str | None = ADMIN_TOKEN,
                 max_body: int = LIMIT, body_timeout: float = 30.0, dry_run: bool = False):  # fmt: skip
        self.actuator = MemoryActuator(NODES)
        self.store = Store(tmp / "state.db")
        self.engine = Engine(make_policy(RULES), self.store, self.actuator, dry_run=dry_run)
        self.state = ServiceState()
        reconcile(self.engine, self.state)
        app = create_app(self.engine, webhook_token=webhook_token, admin_token=admin_token, max_body_bytes=max_body,
                         body_timeout=body_timeout, state=self.state)  # fmt: skip
        self.service = RemediationService(self.engine, app, "127.0.0.1", 0, tick_interval=0.05).start()
        self.url = self.service.url
        self.session = requests.Session()

    def close(self) -> None:
        self.service.stop()

    def counts(self) -> dict[str, int]:
        return {t: self.store.scalar(f"SELECT COUNT(*) FROM {t}")
                for t in ("deliveries", "alerts", "decisions", "actions", "approvals", "audit")}  # fmt: skip

    def post(self, body: Any = None, *, token: str | None = WEBHOOK_TOKEN, headers: dict | None = None,
             data: Any = None) -> requests.Response:  # fmt: skip
        h = {"Authorization": f"Bearer {token}"} if token else {}
        h.update(headers or {})
        if data is None:
            return self.session.post(self.url + "/alerts", json=body, headers=h, timeout=30)
        return self.session.post(self.url + "/alerts", data=data, headers=h, timeout=30)

    def admin(self, method: str, path: str, *, token: str | None = ADMIN_TOKEN, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        return self.session.request(method, f"{self.url}/api/v1/{path}", headers=headers, timeout=30, **kw)

    def raw(self, request: bytes, *, wait: float = 10.0) -> bytes:
        """Send raw bytes (headers, maybe part of a body) and read the answer."""
        with socket.create_connection(("127.0.0.1", self.service.port), timeout=wait) as s:
            s.sendall(request)
            data = b""
            try:
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except TimeoutError:
                pass
            return data


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures the root logger for a program; put the test run's back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def svc(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("remediation-service"))
    yield h
    h.close()


# ---- bad input: each case is a clear 4xx and changes nothing -----------------------------------


def good() -> dict:
    return payload(alert("gpu-node-1"))


def mutate(fn) -> bytes:
    body = good()
    fn(body)
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}
BAD_INPUT = [
    # (id, headers, body, status, words in the error)
    ("malformed-json", JSON, b'{"version": "4", "alerts": [', 400, "malformed JSON"),
    ("trailing-garbage", JSON, json.dumps(good()).encode() + b"}", 400, "malformed JSON"),
    ("not-utf8", JSON, b'{"version": "\xff\xfe"}', 400, "not UTF-8"),
    ("nan", JSON, b'{"version": "4", "truncatedAlerts": NaN}', 400, "NaN"),
    ("empty-body", JSON, b"", 400, "empty body"),
    ("top-level-list", JSON, json.dumps([good()]).encode(), 422, "version 4"),
    ("top-level-string", JSON, b'"alerts"', 422, "version 4"),
    ("missing-alerts", JSON, mutate(lambda b: b.pop("alerts")), 422, "alerts"),
    ("missing-receiver", JSON, mutate(lambda b: b.pop("receiver")), 422, "receiver"),
    ("missing-status", JSON, mutate(lambda b: b.pop("status")), 422, "status"),
    ("missing-version", JSON, mutate(lambda b: b.pop("version")), 422, "version"),
    ("version-3", JSON, mutate(lambda b: b.update(version="3")), 422, "version"),
    ("version-int", JSON, mutate(lambda b: b.update(version=4)), 422, "version"),
    ("status-unknown", JSON, mutate(lambda b: b.update(status="burning")), 422, "status"),
    ("alerts-not-list", JSON, mutate(lambda b: b.update(alerts={"0": b["alerts"][0]})), 422, "alerts"),
    ("alert-not-object", JSON, mutate(lambda b: b.update(alerts=["gpu-node-1"])), 422, "alerts.0"),
    ("alert-missing-labels", JSON, mutate(lambda b: b["alerts"][0].pop("labels")), 422, "alerts.0.labels"),
    ("alert-missing-startsAt", JSON, mutate(lambda b: b["alerts"][0].pop("startsAt")), 422, "alerts.0.startsAt"),
    ("alert-missing-status", JSON, mutate(lambda b: b["alerts"][0].pop("status")), 422, "alerts.0.status"),
    ("alert-bad-startsAt", JSON, mutate(lambda b: b["alerts"][0].update(startsAt="yesterday")), 422, "RFC 3339"),
    ("alert-label-not-string", JSON, mutate(lambda b: b["alerts"][0]["labels"].update(gpu=3)), 422,
     "alerts.0.labels.gpu"),
    ("alert-labels-list", JSON, mutate(lambda b: b["alerts"][0].update(labels=["node"])), 422, "alerts.0.labels"),
    ("truncated-as-string", JSON, mutate(lambda b: b.update(truncatedAlerts="0")), 422, "truncatedAlerts"),
    ("truncated-negative", JSON, mutate(lambda b: b.update(truncatedAlerts=-1)), 422, "truncatedAlerts"),
    ("receiver-null", JSON, mutate(lambda b: b.update(receiver=None)), 422, "receiver"),
    ("fingerprint-huge", JSON, mutate(lambda b: b["alerts"][0].update(fingerprint="f" * 500)), 422, "fingerprint"),
    ("text-plain", {"Content-Type": "text/plain"}, json.dumps(good()).encode(), 415, "application/json"),
    ("form-encoded", {"Content-Type": "application/x-www-form-urlencoded"}, b"version=4", 415, "application/json"),
    ("no-content-type", {}, json.dumps(good()).encode(), 415, "application/json"),
    ("over-limit", JSON, json.dumps({**good(), "pad": "x" * (2 * LIMIT)}).encode(), 413, "limit"),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "body", "status", "words"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])  # fmt: skip
def test_bad_input_is_a_clear_4xx_and_changes_nothing(shared, headers, body, status, words):
    before = shared.counts()
    r = shared.post(data=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()
    assert words in r.text, err
    assert err["error"]
    if status == 422:
        assert err["details"] and all({"loc", "msg", "type"} <= set(d) for d in err["details"]), err
    assert shared.counts() == before
    assert not shared.actuator.mutations


def test_the_good_payload_of_the_matrix_is_accepted(svc):
    r = svc.post(data=json.dumps(good()).encode(), headers=JSON)
    assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "acted", r.text
    assert svc.actuator.mutations[0][:2] == ("drain", "gpu-node-1")


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(shared):
    before = shared.counts()
    chunk = b" " * 8192

    def body():
        yield json.dumps(good())[:-1].encode() + b', "pad": "'
        for _ in range(2 * LIMIT // len(chunk)):  # twice the limit, never announced
            yield chunk
        yield b'"}'

    r = shared.post(data=body(), headers=JSON)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert shared.counts() == before


def test_a_huge_content_length_is_refused_before_the_body_is_read(shared):
    before = shared.counts()
    size = 10 * DISCARD_LIMIT
    head = (f"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WEBHOOK_TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()  # fmt: skip
    t0 = time.monotonic()
    answer = shared.raw(head + b'{"version": "4"')  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.monotonic() - t0 < 5
    assert b"connection: close" in answer.lower()
    # Without the token the answer is 401, before anything else is looked at.
    answer = shared.raw(head.replace(f"Bearer {WEBHOOK_TOKEN}".encode(), b"Bearer nope"))
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert shared.counts() == before


def test_a_body_that_never_arrives_gets_408(tmp_path):
    h = Harness(tmp_path, body_timeout=0.5)
    try:
        head = (f"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WEBHOOK_TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n").encode()  # fmt: skip
        answer = h.raw(head + b'{"version": ')
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert h.counts()["deliveries"] == 0
    finally:
        h.close()


def test_unknown_fields_are_ignored_and_a_regex_escaped_receiver_is_accepted(svc):
    body = payload(alert("gpu-node-3"), receiver="gpufleet\\.remediation")
    body["someFutureField"] = {"nested": [1, 2]}
    body["alerts"][0]["silencedBy"] = []
    body["alerts"][0]["labels"]["gpu"] = "3"
    r = svc.post(body)
    assert r.status_code == 200, r.text
    assert r.json()["decisions"][0]["decision"] == "acted"
    (row,) = svc.store.query("SELECT receiver, payload, status FROM deliveries")
    assert row["receiver"] == "gpufleet\\.remediation" and row["status"] == "processed"
    stored = json.loads(row["payload"])
    assert "someFutureField" not in stored and "silencedBy" not in stored["alerts"][0]
    assert stored["alerts"][0]["labels"]["gpu"] == "3"


def test_declines_are_2xx_and_recorded(svc):
    svc.post(payload(alert("gpu-node-1")))
    before = svc.counts()
    r = svc.post(payload(alert("gpu-node-1", "OtherAlert", remediation="none")))  # matches no rule
    assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "unmatched"
    r = svc.post(payload(alert("gpu-node-1")))  # the same firing again
    assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "duplicate"
    after = svc.counts()
    assert after["deliveries"] == before["deliveries"] + 2 and after["decisions"] == before["decisions"] + 2


# ---- auth ------------------------------------------------------------------------------------------


def test_webhook_needs_its_own_token(svc):
    cases = [(None, {}), ("wrong-token", {}), (ADMIN_TOKEN, {}), (None, {"Authorization": f"Basic {WEBHOOK_TOKEN}"}),
             (None, {"Authorization": "Bearer"}), (WEBHOOK_TOKEN + "x", {})]  # fmt: skip
    for token, headers in cases:
        r = svc.post(good(), token=token, headers=headers)
        assert r.status_code == 401, (token, headers, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer realm="), r.headers
        assert "unauthorized" in r.json()["error"]
    assert 'error="invalid_token"' in svc.post(good(), token="wrong").headers["WWW-Authenticate"]
    # auth comes first: no token and a wrong content type is still 401
    assert svc.post(data=b"x", token=None, headers={"Content-Type": "text/plain"}).status_code == 401
    assert svc.counts()["deliveries"] == 0 and not svc.actuator.mutations
    r = svc.post(good(), token=None, headers={"Authorization": f"bearer {WEBHOOK_TOKEN}"})  # scheme is case-blind
    assert r.status_code == 200


def test_admin_api_needs_the_admin_token(svc):
    calls = [("GET", "status"), ("GET", "history"), ("GET", "audit"), ("POST", "actions/1/approve"),
             ("POST", "actions/1/deny"), ("POST", "nodes/gpu-node-1/resume"), ("POST", "pause"), ("POST", "unpause"),
             ("POST", "breaker/reset"), ("POST", "actions/not-a-number/approve")]  # fmt: skip
    for method, path in calls:
        for token in (None, WEBHOOK_TOKEN, "wrong"):
            r = svc.admin(method, path, token=token, json={"who": "mallory"})
            assert r.status_code == 401, (method, path, token, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert svc.counts()["audit"] == 1  # only the start-up reconcile
    assert svc.admin("GET", "status").status_code == 200
    assert svc.admin("POST", "pause", json={"who": "alice"}).json() == {"paused": True, "by": "alice"}


def test_insecure_no_auth_opens_only_the_api_without_a_token_file(tmp_path):
    h = Harness(tmp_path, webhook_token=None, admin_token=ADMIN_TOKEN)
    try:
        assert h.post(good(), token=None).status_code == 200
        assert h.admin("GET", "status", token=None).status_code == 401
        assert h.admin("GET", "status").status_code == 200
    finally:
        h.close()


def _start_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--actuator", "none", "--db", str(tmp_path / "db"), "--web.listen-address", "127.0.0.1:0",
            "--policy", str(REPO / "alerts" / "remediation-policy.yml"), *extra]  # fmt: skip


@pytest.mark.parametrize("case", ["none", "webhook-only", "admin-only", "same-token", "empty-file", "missing-file",
                                  "two-words"])  # fmt: skip
def test_refuses_to_start_without_usable_token_files(tmp_path, capsys, case):
    wh, ad = tmp_path / "wh", tmp_path / "ad"
    wh.write_text("webhook-secret\n")
    ad.write_text("admin-secret\n")
    flags = {
        "none": [],
        "webhook-only": ["--webhook-token-file", str(wh)],
        "admin-only": ["--admin-token-file", str(ad)],
        "same-token": ["--webhook-token-file", str(wh), "--admin-token-file", str(wh)],
        "empty-file": ["--webhook-token-file", str(tmp_path / "empty"), "--admin-token-file", str(ad)],
        "missing-file": ["--webhook-token-file", str(tmp_path / "nope"), "--admin-token-file", str(ad)],
        "two-words": ["--webhook-token-file", str(tmp_path / "two"), "--admin-token-file", str(ad)],
    }[case]
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("two words\n")
    assert main(_start_args(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpufleet-remediation: error: ")
    words = {"none": "--webhook-token-file and --admin-token-file required", "webhook-only": "--admin-token-file",
             "admin-only": "--webhook-token-file", "same-token": "must differ", "empty-file": "is empty",
             "missing-file": "cannot read", "two-words": "one word"}[case]  # fmt: skip
    assert words in err, err
    assert not (tmp_path / "db").exists()


def test_insecure_no_auth_and_check_config(tmp_path, capsys):
    assert main(_start_args(tmp_path, "--insecure-no-auth", "--check-config")) == 0
    assert "configuration ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yml"
    bad.write_text("rules: [{name: x, match: {a: b}, action: explode}]\n")
    assert main([*_start_args(tmp_path, "--insecure-no-auth"), "--policy", str(bad)]) == 2
    assert "action" in capsys.readouterr().err


def test_the_program_refuses_to_start_without_tokens_and_help_explains_the_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "remediation.service", *_start_args(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--insecure-no-auth" in r.stderr, r.stderr
    text = build_parser().format_help()
    for flag in ("--web.listen-address", "--policy", "--db", "--webhook-token-file", "--admin-token-file",
                 "--actuator", "--dry-run", "--insecure-no-auth", "--web.tls-cert-file", "--web.tls-key-file",
                 "--max-body-bytes", "--tick-interval", "--log.level", "--log.format", "--slurm.bin-dir",
                 "--slurm.conf", "--slurm.rest-url", "--slurm.token-file", "--kube.kubeconfig", "--kube.in-cluster",
                 "--exec.command", "POST /alerts", "/api/v1/"):  # fmt: skip
        assert flag in text, flag


# ---- probes, metrics, transient failures --------------------------------------------------------------


def test_healthz_and_readyz(svc):
    assert requests.get(svc.url + "/healthz", timeout=5).json() == {"status": "ok"}
    r = requests.get(svc.url + "/readyz", timeout=5)
    assert r.status_code == 200 and r.json() == {"ready": True, "store": "ok", "scheduler": "ok", "reconcile": "ok"}
    svc.actuator.reachable = False
    r = requests.get(svc.url + "/readyz", timeout=5)
    assert r.status_code == 503 and not r.json()["ready"] and "unreachable" in r.json()["scheduler"]
    assert requests.get(svc.url + "/healthz", timeout=5).status_code == 200


def test_an_unreadable_scheduler_answers_503_after_recording_and_the_retry_acts(svc):
    svc.actuator.reachable = False
    r = svc.post(good())
    assert r.status_code == 503, r.text
    assert r.json()["retry"] is True and r.json()["decisions"][0]["decision"] == "failed"
    assert svc.counts()["deliveries"] == 1  # durably recorded all the same
    svc.actuator.reachable = True
    r = svc.post(good())  # Alertmanager's retry
    assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "acted"


def test_a_store_failure_answers_503(tmp_path):
    h = Harness(tmp_path)
    try:
        h.store.close()
        r = h.post(good())
        assert r.status_code == 503 and "retry later" in r.json()["error"]
        assert not h.actuator.mutations
    finally:
        h.close()


def test_metrics_are_open_and_count_webhook_requests_by_code(svc):
    svc.post(good())
    svc.post(good(), token="wrong")
    svc.post(data=b"{", headers=JSON)
    r = requests.get(svc.url + "/metrics", timeout=5)  # no token
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse(r.text)
    assert value(m, "gpufleet_remediation_webhook_requests_total", code="200") == 1
    assert value(m, "gpufleet_remediation_webhook_requests_total", code="401") == 1
    assert value(m, "gpufleet_remediation_webhook_requests_total", code="400") == 1
    assert value(m, "gpufleet_remediation_webhook_requests_total", code="413") == 0
    assert value(m, "gpufleet_remediation_actions_total", action="drain", result="done") == 1
    assert value(m, "gpufleet_remediation_decisions_total", decision="acted") == 1
    assert value(m, "gpufleet_remediation_breaker_open") == 0
    assert value(m, "gpufleet_remediation_nodes_drained") == 1
    assert value(m, "gpufleet_remediation_decision_duration_seconds_count") == 1
    assert "process_cpu_seconds_total" in m
    assert "gpu-node" not in r.text  # no node names in the exposition


# ---- the admin API ------------------------------------------------------------------------------------


def test_admin_api_round_trip(svc):
    r = svc.post(payload(alert("gpu-node-2", remediation="approve"), alert("gpu-node-3", remediation="approve")))
    pending = [d["action_id"] for d in r.json()["decisions"]]
    assert [d["decision"] for d in r.json()["decisions"]] == ["pending_approval"] * 2
    status = svc.admin("GET", "status").json()
    assert [a["id"] for a in status["pending_approvals"]] == pending

    # approve: body names who; the drain runs
    r = svc.admin("POST", f"actions/{pending[0]}/approve", json={"who": "alice@ops"})
    assert r.status_code == 200 and r.json()["decision"] == "acted" and r.json()["state"] == "done", r.text
    assert svc.actuator.status_of("gpu-node-2").ours
    # deny: the header names who
    r = svc.admin("POST", f"actions/{pending[1]}/deny", headers={"X-Gpufleet-Who": "bob@ops"})
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert not svc.actuator.status_of("gpu-node-3").unavailable
    # errors: 404, 409, 422, 415
    assert svc.admin("POST", "actions/9999/approve", json={"who": "a"}).status_code == 404
    r = svc.admin("POST", f"actions/{pending[0]}/approve", json={"who": "a"})
    assert r.status_code == 409 and "not pending" in r.json()["error"]
    assert svc.admin("POST", "actions/0/approve", json={"who": "a"}).status_code == 422
    assert svc.admin("POST", "actions/x/approve", json={"who": "a"}).status_code == 422
    r = svc.admin("POST", "pause")  # nobody named
    assert r.status_code == 422 and "who is required" in r.json()["error"]
    assert svc.admin("POST", "pause", json={"who": ""}).status_code == 422
    assert svc.admin("POST", "pause", json={"who": "a\nb"}).status_code == 422
    assert svc.admin("POST", "pause", json={"who": 7}).status_code == 422
    assert svc.admin("POST", "pause", headers={"X-Gpufleet-Who": ""}).status_code == 422
    assert svc.admin("POST", "pause", headers={"X-Gpufleet-Who": "a\x01b"}).status_code == 422
    assert svc.admin("POST", "pause", data=b"who=a", headers={"Content-Type": "text/plain"}).status_code == 415
    assert svc.admin("POST", "pause", data=b"{", headers=JSON).status_code == 400
    assert svc.admin("POST", "nodes/gpu-node-[1-4]/resume", json={"who": "a"}).status_code in (404, 422)
    assert svc.admin("POST", "nodes/-rf/resume", json={"who": "a"}).status_code == 422
    assert svc.admin("GET", "history", params={"limit": 0}).status_code == 422
    assert svc.admin("GET", "history", params={"node": "a b"}).status_code == 422

    # resume: ours yes, foreign no (409), unknown 404
    svc.actuator.admin_drain("gpu-node-4", "admin: fan")
    r = svc.admin("POST", "nodes/gpu-node-4/resume", json={"who": "carol"})
    assert r.status_code == 409 and "not taken out by gpufleet" in r.json()["error"]
    assert svc.actuator.status_of("gpu-node-4").reason == "admin: fan"
    assert svc.admin("POST", "nodes/nope/resume", json={"who": "carol"}).status_code == 404
    r = svc.admin("POST", "nodes/gpu-node-2/resume", json={"who": "carol"})
    assert r.status_code == 200 and r.json()["decision"] == "acted"
    assert not svc.actuator.status_of("gpu-node-2").unavailable

    # pause / unpause / breaker
    assert svc.admin("POST", "pause", json={"who": "dave"}).json() == {"paused": True, "by": "dave"}
    r = svc.post(payload(alert("gpu-node-1")))
    assert r.status_code == 200 and "paused by dave" in r.json()["decisions"][0]["reason"]
    assert svc.admin("GET", "status").json()["paused_by"] == "dave"
    assert svc.admin("POST", "unpause", json={"who": "dave"}).json() == {"paused": False, "by": "dave"}
    r = svc.admin("POST", "breaker/reset", json={"who": "erin"})
    assert r.json() == {"breaker_open": False, "was_open": False, "by": "erin"}

    # history and audit say who did what
    history = svc.admin("GET", "history", params={"node": "gpu-node-2"}).json()["history"]
    assert {h["node"] for h in history} == {"gpu-node-2"}
    assert any(h["who"] == "alice@ops" and h["decision"] == "acted" for h in history)
    assert len(svc.admin("GET", "history", params={"limit": 2}).json()["history"]) == 2
    audit = svc.admin("GET", "audit").json()["audit"]
    seen = {(a["who"], a["what"]) for a in audit}
    assert {("alice@ops", "approve"), ("bob@ops", "deny"), ("carol", "resume-refused"), ("carol", "resume"),
            ("dave", "pause"), ("dave", "unpause"), ("erin", "reset-breaker")} <= seen  # fmt: skip


# ---- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_round_trip(svc, token_file, capsys):
    base = ["remediation", "--url", svc.url, "--token-file", str(token_file)]
    r = svc.post(payload(alert("gpu-node-2", remediation="approve"), alert("gpu-node-3", remediation="approve")))
    first, second = (d["action_id"] for d in r.json()["decisions"])

    code, out, _ = run_cli(capsys, *base, "status")
    assert code == 0 and "pending approvals:" in out and "breaker:     closed" in out
    assert f"  {first} " in out and "gpu-node-2" in out
    code, out, _ = run_cli(capsys, *base, "status", "--json")
    assert code == 0 and [a["id"] for a in json.loads(out)["pending_approvals"]] == [first, second]

    code, out, _ = run_cli(capsys, *base, "approve", str(first), "--who", "alice@cli")
    assert code == 0 and out.startswith("acted: drain gpu-node-2") and "now done" in out, out
    code, out, _ = run_cli(capsys, *base, "deny", str(second), "--who", "bob@cli")
    assert code == 0 and out.startswith("declined: denied by bob@cli")
    code, out, _ = run_cli(capsys, *base, "resume", "gpu-node-2", "--who", "carol@cli")
    assert code == 0 and out.startswith("acted: resume gpu-node-2")
    code, out, _ = run_cli(capsys, *base, "pause", "--who", "dave@cli")
    assert code == 0 and out.strip() == "paused by dave@cli: no new actions until unpause"
    code, out, _ = run_cli(capsys, *base, "unpause", "--who", "dave@cli")
    assert code == 0 and "unpaused by dave@cli" in out
    code, out, _ = run_cli(capsys, *base, "reset-breaker", "--who", "erin@cli")
    assert code == 0 and "breaker closed by erin@cli" in out

    code, out, _ = run_cli(capsys, *base, "history", "--node", "gpu-node-2")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "TIME", "NODE", "ALERT", "DECISION", "ACTION", "WHO",
                                                         "REASON"]  # fmt: skip
    assert "alice@cli" in out and "carol@cli" in out and "gpu-node-3" not in out
    code, out, _ = run_cli(capsys, *base, "audit", "--json")
    whats = {(a["who"], a["what"]) for a in json.loads(out)["audit"]}
    assert {("alice@cli", "approve"), ("bob@cli", "deny"), ("carol@cli", "resume"), ("erin@cli", "reset-breaker")} <= whats

    # The default who is $USER@host.
    code, out, _ = run_cli(capsys, *base, "pause")
    assert code == 0 and out.strip().startswith(f"paused by {cli.default_who()}")


def test_cli_errors_and_exit_codes(svc, token_file, tmp_path, capsys, monkeypatch):
    base = ["remediation", "--url", svc.url]
    monkeypatch.delenv("GPUFLEET_ADMIN_TOKEN_FILE", raising=False)
    code, _, err = run_cli(capsys, *base, "status")
    assert code == cli.UNAUTHORIZED and "unauthorized" in err and "--token-file" in err
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    assert run_cli(capsys, *base, "--token-file", str(wrong), "status")[0] == cli.UNAUTHORIZED
    monkeypatch.setenv("GPUFLEET_ADMIN_TOKEN_FILE", str(token_file))  # the environment variable works too
    code, _, err = run_cli(capsys, *base, "approve", "424242")
    assert code == cli.NOT_FOUND and "no action 424242" in err
    svc.actuator.admin_drain("gpu-node-4", "admin: fan")
    code, _, err = run_cli(capsys, *base, "resume", "gpu-node-4")
    assert code == cli.CONFLICT and "not taken out by gpufleet" in err
    code, _, err = run_cli(capsys, *base, "resume", "bad node", "--who", "x")
    assert code == cli.USAGE
    code, _, err = run_cli(capsys, *base, "--token-file", str(tmp_path / "missing"), "status")
    assert code == cli.USAGE and "missing" in err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    code, _, err = run_cli(capsys, "remediation", "--url", f"http://127.0.0.1:{closed}", "status")
    assert code == cli.UNREACHABLE and "cannot connect" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["remediation", "approve", "not-a-number"])
    assert exc.value.code == 2


def test_the_gpufleet_script(svc, token_file):
    script = Path(sys.executable).parent / "gpufleet"
    if not script.exists():
        pytest.skip("the gpufleet script is not installed (pip install -e .)")
    r = subprocess.run([str(script), "remediation", "status", "--json", "--url", svc.url, "--token-file",
                        str(token_file)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["breaker"]["open"] is False
    r = subprocess.run([str(script), "remediation", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "exit status" in r.stdout and "reset-breaker" in r.stdout


# ---- TLS and the program's stop -------------------------------------------------------------------------


def test_optional_tls(tmp_path, token_file, capsys):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    store = Store(tmp_path / "db")
    engine = Engine(make_policy(RULES), store, MemoryActuator(NODES))
    state = ServiceState(reconcile="ok")
    app = create_app(engine, webhook_token=WEBHOOK_TOKEN, admin_token=ADMIN_TOKEN, state=state)
    service = RemediationService(engine, app, "127.0.0.1", 0, ssl_certfile=str(cert), ssl_keyfile=str(key)).start()
    try:
        assert service.url.startswith("https://")
        assert requests.get(service.url + "/healthz", verify=str(cert), timeout=5).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(service.url + "/healthz", timeout=5)  # not trusted without the CA
        code = cli.main(["remediation", "--url", service.url, "--token-file", str(token_file), "--ca-file", str(cert),
                         "status", "--json"])  # fmt: skip
        assert code == 0 and json.loads(capsys.readouterr().out)["dry_run"] is False
    finally:
        service.stop()


def test_sigterm_stops_the_program_cleanly(tmp_path):
    (tmp_path / "wh").write_text("webhook-secret\n")
    (tmp_path / "ad").write_text("admin-secret\n")
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "remediation.service", *_start_args(tmp_path),
                                 "--webhook-token-file", str(tmp_path / "wh"), "--admin-token-file", str(tmp_path / "ad")],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = wait_for(lambda: (m := re.search(r"address=(\S+)", log.read_text())) and m[1], timeout=30)
        wait_for(lambda: _ok(url + "/healthz"), timeout=10)
        r = requests.post(url + "/alerts", json=good(), headers={"Authorization": "Bearer webhook-secret"}, timeout=10)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "msg=stopped" in text and "Traceback" not in text, text
    store = Store(tmp_path / "db")  # closed cleanly: opens, and the delivery is there
    try:
        assert store.scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'processed'") == 1
    finally:
        store.close()


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_payload_copies_are_independent():
    # guard for the matrix above: mutate() must not leak into good()
    assert good() == copy.deepcopy(good()) and "pad" not in good()
