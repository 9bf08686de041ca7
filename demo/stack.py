"""Child processes on loopback for the demo and the tests: Prometheus, Alertmanager, any program.

Prometheus and Alertmanager run the Debian binaries as they run in production, on free
127.0.0.1 ports, with their data and logs in a directory the caller owns (the demo's
work directory, a pytest tmp dir). ``Program`` runs any other command (the node agents,
the Slurm exporter, the remediation service) the same way, ready when an HTTP URL
answers. ``stop()`` ends the process it started (SIGTERM, then SIGKILL), and an
``atexit`` hook stops anything a crash left running. ``WebhookSink`` is the smallest
Alertmanager webhook target: it records each notification (path, headers, JSON body).

Nothing here skips or asserts: callers decide (the tests' ``need_binary``, the demo's
prerequisite check) and this module only runs things and reports clearly when they fail
to start (the log's tail is in the error). tests/promstack.py re-exports this API.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import requests
import yaml

_LIVE: set[_Server] = set()


def free_port() -> int:
    """A port that was free a moment ago (start() retries if another process took it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """The predicate's first truthy result, checked every ``interval``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)


class _Server:
    """One child process serving HTTP on 127.0.0.1, with /-/ready."""

    name = "server"
    start_attempts = 3
    health_path = "/-/ready"

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:  # pragma: no cover - subclasses
        raise NotImplementedError

    def argv(self) -> list[str]:
        return [self.binary, *self.args()]

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self.workdir}

    def start(self, timeout: float = 30.0, *, port: int | None = None) -> Self:
        """Start on a free port, or on ``port`` (an address another process was already given,
        or a restart that keeps its address); a port taken meanwhile is retried on another."""
        for attempt in range(1 if port else self.start_attempts):
            self.port = port or free_port()
            with self.log_path.open("ab") as log:
                log.write(f"--- start attempt {attempt + 1}: {' '.join(self.argv())}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, **self.popen_options())
            _LIVE.add(self)
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                self.stop()
                if port or "address already in use" not in self.log_tail().lower():
                    raise
        raise RuntimeError(f"{self.name}: no free port after {self.start_attempts} attempts\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up\n{self.log_tail()}")
            try:
                if requests.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def get(self, path: str, **params: Any) -> Any:
        r = requests.get(self.url + path, params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class Alertmanager(_Server):
    """``prometheus-alertmanager`` with clustering off, API v2 helpers."""

    name = "alertmanager"

    def __init__(self, config_file: Path, workdir: Path, binary: str | None = None):
        super().__init__(binary or shutil.which("prometheus-alertmanager") or "prometheus-alertmanager", workdir)
        self.config_file = Path(config_file)

    def args(self) -> list[str]:
        return [f"--config.file={self.config_file}", f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",  # empty: no gossip, no second port
                "--log.level=debug"]

    def post_alerts(self, alerts: Iterable[dict[str, Any]]) -> None:
        """POST /api/v2/alerts (postableAlerts: labels, annotations, startsAt, endsAt)."""
        r = requests.post(self.url + "/api/v2/alerts", json=list(alerts), timeout=10)
        r.raise_for_status()

    def alerts(self, **filters: Any) -> list[dict[str, Any]]:
        """GET /api/v2/alerts; filters: active, silenced, inhibited, unprocessed (bools), filter, receiver."""
        params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in filters.items()}
        return self.get("/api/v2/alerts", **params)

    def find(self, **labels: str) -> list[dict[str, Any]]:
        """Alerts whose labels include ``labels``, with their status (state, inhibitedBy...)."""
        return [a for a in self.alerts() if all(a["labels"].get(k) == v for k, v in labels.items())]


class Prometheus(_Server):
    """``prometheus`` with a generated prometheus.yml: scrape configs, rule files, Alertmanagers."""

    name = "prometheus"

    def __init__(self, workdir: Path, *, scrape_configs: list[dict[str, Any]] | None = None,
                 rule_files: Iterable[Path | str] = (), alertmanagers: Iterable[str] = (),
                 scrape_interval: str = "1s", evaluation_interval: str = "1s", binary: str | None = None,
                 config: dict[str, Any] | None = None, extra_args: Iterable[str] = ()):
        super().__init__(binary or shutil.which("prometheus") or "prometheus", workdir)
        self.extra_args = list(extra_args)
        self.config: dict[str, Any] = config if config is not None else {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape_configs or [],
        }
        targets = [t.removeprefix("http://") for t in alertmanagers]
        if targets and config is None:
            self.config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": targets}]}]}
        self.config_file = self.workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def args(self) -> list[str]:
        return [f"--config.file={self.config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=debug", *self.extra_args]

    def api(self, path: str, **params: Any) -> Any:
        body = self.get("/api/v1/" + path, **params)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus /api/v1/{path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def rules(self) -> list[dict[str, Any]]:
        """Rule groups as loaded: each with file, name and rules (health, lastError, state...)."""
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]


class Program(_Server):
    """Any HTTP-serving program: ``argv(port)`` builds its command line for a free port.

    Ready when ``health_path`` answers 200. The process gets its own session (Ctrl-C in
    the terminal reaches only the demo, which then stops it in order).
    """

    def __init__(self, name: str, argv: Callable[[int], list[str]], workdir: Path, *,
                 health_path: str = "/healthz", env: dict[str, str] | None = None, cwd: Path | None = None):
        self.name = name
        super().__init__(argv(0)[0], workdir)
        self._argv = argv
        self.health_path = health_path
        self.env = env
        self.cwd = cwd

    def args(self) -> list[str]:
        return self._argv(self.port)[1:]

    def argv(self) -> list[str]:
        return self._argv(self.port)

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self.cwd or self.workdir, "env": self.env, "start_new_session": True}


@dataclass
class Notification:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received: float = field(default_factory=time.time)


class WebhookSink:
    """An HTTP server on 127.0.0.1 that records Alertmanager webhook notifications (200 OK)."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                with sink._lock:
                    sink.notifications.append(Notification(self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-sink", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def received(self, path: str | None = None) -> list[Notification]:
        with self._lock:
            return [n for n in self.notifications if path is None or n.path == path]

    def wait(self, predicate: Callable[[Notification], bool], timeout: float = 30.0) -> Notification:
        """The first notification matching ``predicate`` (waits for it)."""
        return poll(lambda: next((n for n in self.received() if predicate(n)), None), timeout,
                     what="webhook notification")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_config_for_test(source: Path, dest: Path, *, webhook_base: str, credentials_file: Path,
                                 timings: dict[str, str] | None = None) -> dict[str, Any]:
    """Copy of an Alertmanager config safe and fast to run in a test.

    Every webhook goes to ``webhook_base`` + ``/<receiver name>`` (never to a real
    service), every ``credentials_file`` to the given temporary file, and ``timings``
    (e.g. ``{"group_wait": "1s"}``) replace those keys on every route that sets them and
    on the root. The routing tree, matchers and inhibitions stay as they are.
    """
    cfg = yaml.safe_load(Path(source).read_text())
    out = copy.deepcopy(cfg)
    for receiver in out.get("receivers", []):
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{webhook_base}/{receiver['name']}"
            auth = hook.get("http_config", {}).get("authorization")
            if auth and "credentials_file" in auth:
                auth["credentials_file"] = str(credentials_file)
    if timings:
        def retime(route: dict[str, Any], root: bool) -> None:
            for key, val in timings.items():
                if root or key in route:
                    route[key] = val
            for child in route.get("routes", []):
                retime(child, False)

        retime(out["route"], True)
    Path(dest).write_text(yaml.safe_dump(out, sort_keys=False))
    return out
