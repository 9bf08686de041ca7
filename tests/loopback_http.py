"""The life cycle the test fakes of HTTP APIs share (tests/fake_kube.py, tests/fake_slurmrestd.py):
serve a handler class on a free 127.0.0.1 port in a daemon thread, stop, context manager, URL."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class LoopbackHTTP:
    """Mixin: the class keeps ``_server`` (None when stopped)."""

    _server: ThreadingHTTPServer | None

    def _serve(self, handler: type[BaseHTTPRequestHandler], name: str) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name=name, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()  # type: ignore[attr-defined] - each fake's start() builds its handler

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"
