"""HTTP serving for the exporters: /metrics, a landing page, /healthz.

Built on the stdlib threading HTTP server: a scrape only copies bytes the
collectors rendered in the background, so nothing heavier is needed. TLS and
basic auth follow the exporter-toolkit web config file (exporters/webconfig.py).
"""

from __future__ import annotations

import gzip
import html
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from exporters.webconfig import WebConfig

log = logging.getLogger("gpufleet.web")

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen_address(addr: str) -> tuple[str, int]:
    """node_exporter style ``host:port``; ``:9835`` listens on every address."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {addr!r} is not HOST:PORT")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        metrics: Callable[[], bytes],
        landing: Callable[[], str],
        health: Callable[[], tuple[bool, str]],
        telemetry_path: str = "/metrics",
        web_config: WebConfig | None = None,
    ):
        self.metrics = metrics
        self.landing = landing
        self.health = health
        self.telemetry_path = telemetry_path
        self.web_config = web_config or WebConfig()
        super().__init__(address, _Handler)
        ctx = self.web_config.ssl_context()
        if ctx is not None:
            self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.web_config.tls_enabled else "http"
        return f"{scheme}://{host}:{port}{self.telemetry_path}"

    def serve_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        t.start()
        return t


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    protocol_version = "HTTP/1.1"
    server_version = "gpufleet"
    timeout = 30  # a client that connects and sends nothing must not hold a thread forever
    # Headers and body go out in two writes; with Nagle on, a keep-alive client's
    # delayed ACK would add ~40 ms to every scrape.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("http " + format, *args)

    def _send(self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        for k, v in {**self.server.web_config.headers, **(extra or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if not self.server.web_config.authorize(self.headers.get("Authorization")):
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                       {"WWW-Authenticate": 'Basic realm="gpufleet"'})
            return
        path = self.path.split("?", 1)[0]
        try:
            if path == self.server.telemetry_path:
                body = self.server.metrics()
                extra = {}
                if "gzip" in (self.headers.get("Accept-Encoding") or ""):
                    body = gzip.compress(body, compresslevel=1)
                    extra["Content-Encoding"] = "gzip"
                self._send(200, body, CONTENT_TYPE_LATEST, extra)
            elif path == "/":
                self._send(200, self.server.landing().encode(), "text/html; charset=utf-8")
            elif path in ("/healthz", "/-/healthy"):
                ok, text = self.server.health()
                self._send(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"Not Found\n", "text/plain; charset=utf-8")
        except Exception:  # noqa: BLE001 - one bad request must not kill the server
            log.exception("error serving %s", path)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")


def landing_page(title: str, telemetry_path: str, rows: list[tuple[str, str, str]]) -> str:
    """A small HTML page like node_exporter's, with a table of collector states."""
    trs = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(state)}</td><td>{html.escape(detail)}</td></tr>"
        for name, state, detail in rows
    )
    return (
        f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p><a href="{html.escape(telemetry_path)}">Metrics</a> &middot; <a href="/healthz">Health</a></p>'
        f"<table border=1 cellpadding=4><tr><th>collector</th><th>state</th><th>detail</th></tr>{trs}</table>"
        "</body></html>"
    )


class ServedAgent:
    """Collectors (an ``Agent``) and their HTTP server, started and stopped together;
    the node agent and the Slurm exporter are both one."""

    agent: Any
    server: ExporterServer

    def start(self) -> None:
        self.agent.start()
        self.server.serve_in_background()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.agent.stop()
