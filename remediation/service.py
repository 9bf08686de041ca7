"""gpufleet-remediation: the HTTP service around the decision engine.

FastAPI (request models in ``remediation/schema.py``, pydantic v2) served by uvicorn.
The service validates, authenticates and counts; the engine (``remediation/engine.py``)
decides. Endpoints:

======================================  =========  ==============================================
``POST /alerts``                         webhook    Alertmanager webhook payload v4
``GET  /healthz``                        none       liveness: the process serves HTTP
``GET  /readyz``                         none       store, scheduler and start-up reconcile ok
``GET  /metrics``                        none       Prometheus exposition (no node names in it)
``GET  /api/v1/status``                  admin      breaker, pause, approvals, owned nodes, caps
``GET  /api/v1/history?limit=&node=``    admin      decisions with their actions, newest first
``GET  /api/v1/audit?limit=``            admin      admin calls and engine events
``POST /api/v1/actions/{id}/approve``    admin      approve a pending action
``POST /api/v1/actions/{id}/deny``       admin      deny a pending action
``POST /api/v1/nodes/{node}/resume``     admin      resume a node gpufleet drained
``POST /api/v1/pause`` / ``unpause``     admin      stop / restart all new actions
``POST /api/v1/breaker/reset``           admin      close the circuit breaker
======================================  =========  ==============================================

Admin POSTs name the human in ``{"who": "..."}`` or the ``X-Gpufleet-Who`` header; it is
recorded in the audit. Two bearer tokens, read from files at start and compared in
constant time: the webhook token only opens ``POST /alerts``, the admin token only the
admin API (the two must differ). ``/healthz``, ``/readyz`` and ``/metrics`` are open like
any exporter's, so Prometheus and a load balancer need no secret; they reveal counts and
states, never node names or tokens.

``POST /alerts`` answers, in this order: 401 (token), 415 (Content-Type is not
``application/json``), 413 (Content-Length over ``--max-body-bytes``, or the streamed
body grows past it: the body is never buffered beyond the limit), 408 (body not
received in time), 400 (not UTF-8 JSON), 422 (not a v4 payload: wrong types, missing
fields), then 200 once the engine has durably recorded the delivery and decided
(declines included), or 503 when the engine asks for Alertmanager's retry (the
scheduler could not be read) or the store failed. Nothing is recorded for a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from exporters.cli import duration
from exporters.logsetup import LEVELS, setup_logging
from remediation.actuators.base import Actuator, ActuatorError
from remediation.amreconcile import AlertmanagerClient, AlertReconciler, ReconcileMetrics
from remediation.engine import AdminError, Engine
from remediation.policy import PolicyError, load_policy
from remediation.schema import WHO_HEADER, AdminRequest, WebhookPayload
from remediation.store import Store

log = logging.getLogger("gpufleet.remediation.service")

DEFAULT_LISTEN = "127.0.0.1:9847"
DEFAULT_POLICY = "alerts/remediation-policy.yml"
DEFAULT_DB = "/var/lib/gpufleet/remediation.db"
DEFAULT_MAX_BODY = 1 << 20
BODY_TIMEOUT = 30.0
# A body over the limit is read on (and thrown away) up to this many bytes so the client
# gets its 413 instead of a reset connection; past it the connection is closed.
DISCARD_LIMIT = 8 << 20
NODE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}$"
WEBHOOK_CODES = ("200", "400", "401", "408", "413", "415", "422", "503")
ACTUATORS = ("slurm", "slurmrestd", "kubernetes", "exec", "none")


class ConfigError(Exception):
    """A start-up configuration problem (exit status 2)."""


# ---- tokens ------------------------------------------------------------------------------


def read_token(path: str | os.PathLike[str], what: str) -> str:
    """A bearer token from a file: one line, surrounding whitespace (the trailing
    newline) stripped, like Alertmanager's ``credentials_file``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"{what} {path} is empty")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in token):
        raise ConfigError(f"{what} {path}: the token must be one word of printable characters")
    return token


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def _token_ok(request: Request, token: str | None) -> bool:
    if token is None:  # --insecure-no-auth and no token file for this API
        return True
    got = _bearer(request)
    return got is not None and hmac.compare_digest(got.encode(), token.encode())


def _challenge(request: Request, realm: str) -> str:
    challenge = f'Bearer realm="gpufleet-remediation {realm}"'
    if _bearer(request) is not None:
        challenge += ', error="invalid_token"'
    return challenge


def _unauthorized_message(realm: str) -> str:
    return f"unauthorized: a valid bearer token for the {realm} is required"


# ---- request bodies ----------------------------------------------------------------------


class BodyError(Exception):
    def __init__(self, status: int, message: str, *, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _discard(chunks: Any, seen: int = 0, cap: int = DISCARD_LIMIT) -> bool:
    """Read the rest of a body and throw it away, up to ``cap`` bytes in all; True if
    the body ended (the connection can answer cleanly), False past the cap."""
    async for chunk in chunks:
        seen += len(chunk)
        if seen > cap:
            return False
    return True


async def read_body(request: Request, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The request body, never buffered past ``limit`` bytes: a Content-Length over the
    limit is refused before any of it is kept, a streamed (chunked) body as soon as it
    grows past it. A body over the limit is read on and thrown away up to
    ``DISCARD_LIMIT`` so the client sees the 413 (closing with unread data resets the
    connection); a larger one is not read at all and the connection is closed."""
    declared = request.headers.get("content-length")
    size = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BodyError(400, f"invalid Content-Length {declared!r}") from None
    try:
        async with asyncio.timeout(timeout):
            if size is not None and size > limit:
                ended = size <= DISCARD_LIMIT and await _discard(request.stream())
                raise BodyError(413, f"body of {size} bytes is over the limit of {limit} bytes", close=not ended)
            buf = bytearray()
            chunks = request.stream()
            async for chunk in chunks:
                buf += chunk
                if len(buf) > limit:
                    ended = await _discard(chunks, len(buf))
                    raise BodyError(413, f"body over the limit of {limit} bytes", close=not ended)
            return bytes(buf)
    except TimeoutError:
        raise BodyError(408, f"request body not received within {timeout:g}s", close=True) from None


async def drain_small_body(request: Request, limit: int) -> bool:
    """Before answering without reading the body (401, 415): read and drop a body that
    is no larger than ``limit``, so the client gets the answer, not a reset. False when
    the connection must be closed instead."""
    declared = request.headers.get("content-length")
    try:
        if declared is not None and int(declared) > limit:
            return False
        async with asyncio.timeout(5.0):
            return await _discard(request.stream(), cap=limit)
    except (ValueError, TimeoutError):
        return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    if not body:
        raise BodyError(400, "empty body: a JSON document is required")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # JSONDecodeError and NaN/Infinity
        raise BodyError(400, f"malformed JSON: {exc}") from None


def _details(errors: Sequence[Any]) -> list[dict[str, str]]:
    out = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        out.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"Connection": "close"} if extra.pop("close", False) else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# ---- the application ---------------------------------------------------------------------


@dataclass
class ServiceState:
    """What the background loop knows, for /readyz."""

    reconcile: str = "pending"  # "ok" or why the start-up reconcile is not done yet
    last_tick_error: str | None = None
    started_at: float = field(default_factory=time.time)


def create_app(
    engine: Engine,
    *,
    webhook_token: str | None,
    admin_token: str | None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    body_timeout: float = BODY_TIMEOUT,
    state: ServiceState | None = None,
) -> FastAPI:
    """The ASGI app. A token of ``None`` leaves that API open (``--insecure-no-auth``).
    Registers the service's own metrics in ``engine.registry`` (one app per engine)."""
    if webhook_token is not None and webhook_token == admin_token:
        raise ConfigError("the webhook token and the admin token must differ")
    state = state or ServiceState()
    app = FastAPI(title="gpufleet-remediation", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.service = state
    webhook_requests = Counter(
        "gpufleet_remediation_webhook_requests",
        "Webhook deliveries (POST /alerts) by HTTP status code.",
        ["code"],
        registry=engine.registry,
    )
    for code in WEBHOOK_CODES:
        webhook_requests.labels(code)
    # Registered whether or not --alertmanager.url is given (the reconciler uses them).
    app.state.reconcile_metrics = ReconcileMetrics(engine.registry)
    ProcessCollector(registry=engine.registry)
    PlatformCollector(registry=engine.registry)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request", details=_details(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return _error(503, f"internal failure: {type(exc).__name__}: {exc}")

    # -- the webhook ------------------------------------------------------------------------

    async def webhook(request: Request) -> Response:
        if not _token_ok(request, webhook_token):
            headers = {"WWW-Authenticate": _challenge(request, "webhook")}
            if not await drain_small_body(request, max_body_bytes):
                headers["Connection"] = "close"
            return JSONResponse({"error": _unauthorized_message("webhook")}, status_code=401, headers=headers)
        if _media_type(request) != "application/json":
            got = request.headers.get("content-type") or "none"
            ended = await drain_small_body(request, max_body_bytes)
            return _error(415, f"Content-Type must be application/json, got {got}", close=not ended)
        try:
            data = parse_json(await read_body(request, max_body_bytes, body_timeout))
        except BodyError as exc:
            return _error(exc.status, str(exc), close=exc.close)
        try:
            payload = WebhookPayload.model_validate(data)
        except ValidationError as exc:
            return _error(422, "not an Alertmanager webhook payload (version 4)",
                          details=_details(exc.errors(include_url=False, include_input=False)))
        try:
            result = await run_in_threadpool(engine.handle, payload.for_engine())
        except Exception as exc:
            log.error("webhook delivery not recorded or not decided", exc_info=exc)
            return _error(503, f"the delivery could not be processed ({type(exc).__name__}: {exc}); retry later")
        status = 503 if result.get("retry") else 200
        log.info("webhook delivery", extra={"delivery_id": result["delivery_id"], "alerts": result["alerts"],
                                            "counts": result["counts"], "code": status})
        body = {"status": "retry" if status == 503 else "ok", **result}
        if status == 503:
            body["error"] = "the scheduler could not be read for some alerts; retry later (recorded)"
        return JSONResponse(body, status_code=status)

    @app.post("/alerts")
    async def alerts(request: Request) -> Response:
        code = "500"
        try:
            response = await webhook(request)
            code = str(response.status_code)
            return response
        finally:
            webhook_requests.labels(code).inc()

    # -- probes and metrics -------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = engine.readiness()
        checks["reconcile"] = state.reconcile
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)

    # -- the admin API -----------------------------------------------------------------------

    def require_admin(request: Request) -> None:
        if not _token_ok(request, admin_token):
            raise HTTPException(401, _unauthorized_message("admin API"),
                                headers={"WWW-Authenticate": _challenge(request, "admin API")})

    admin = [Depends(require_admin)]

    async def who_of(request: Request) -> str:
        body = await read_body(request, max_body_bytes, body_timeout)
        who = None
        if body:
            if _media_type(request) != "application/json":
                raise BodyError(415, "Content-Type must be application/json for a request body")
            try:
                who = AdminRequest.model_validate(parse_json(body)).who
            except ValidationError as exc:
                raise _Invalid(exc) from None
        if who is None and request.headers.get(WHO_HEADER) is not None:
            try:
                who = AdminRequest.model_validate({"who": request.headers[WHO_HEADER]}).who
            except ValidationError as exc:
                raise _Invalid(exc, where=WHO_HEADER) from None
        if who is None:
            raise BodyError(422, f'who is required: a JSON body {{"who": "alice@host"}} or the {WHO_HEADER} header')
        return who

    async def admin_call(request: Request, call: Callable[[str], dict[str, Any]]) -> Response:
        try:
            who = await who_of(request)
        except BodyError as exc:
            return _error(exc.status, str(exc), close=exc.close)
        except _Invalid as exc:
            return _error(422, "invalid request", details=exc.details)
        try:
            result = await run_in_threadpool(call, who)
        except AdminError as exc:
            return _error(404 if exc.code == "not_found" else 409, str(exc))
        return JSONResponse(result)

    @app.get("/api/v1/status", dependencies=admin)
    def status() -> dict[str, Any]:
        return engine.status()

    @app.get("/api/v1/history", dependencies=admin)
    def history(limit: int = Query(100, ge=1, le=10000),
                node: str | None = Query(None, pattern=NODE_PATTERN)) -> dict[str, Any]:  # fmt: skip
        return {"history": engine.history(limit=limit, node=node)}

    @app.get("/api/v1/audit", dependencies=admin)
    def audit(limit: int = Query(100, ge=1, le=10000)) -> dict[str, Any]:
        return {"audit": engine.audit(limit=limit)}

    @app.post("/api/v1/actions/{action_id}/approve", dependencies=admin)
    async def approve(request: Request, action_id: int = PathParam(ge=1, le=2**62)) -> Response:
        return await admin_call(request, lambda who: engine.approve(action_id, who))

    @app.post("/api/v1/actions/{action_id}/deny", dependencies=admin)
    async def deny(request: Request, action_id: int = PathParam(ge=1, le=2**62)) -> Response:
        return await admin_call(request, lambda who: engine.deny(action_id, who))

    @app.post("/api/v1/nodes/{node}/resume", dependencies=admin)
    async def resume(request: Request, node: str = PathParam(pattern=NODE_PATTERN)) -> Response:
        return await admin_call(request, lambda who: engine.resume(node, who))

    @app.post("/api/v1/pause", dependencies=admin)
    async def pause(request: Request) -> Response:
        return await admin_call(request, engine.pause)

    @app.post("/api/v1/unpause", dependencies=admin)
    async def unpause(request: Request) -> Response:
        return await admin_call(request, engine.unpause)

    @app.post("/api/v1/breaker/reset", dependencies=admin)
    async def reset_breaker(request: Request) -> Response:
        return await admin_call(request, engine.reset_breaker)

    return app


class _Invalid(Exception):
    def __init__(self, exc: ValidationError, where: str | None = None):
        super().__init__(str(exc))
        self.details = _details(exc.errors(include_url=False, include_input=False))
        if where:
            for d in self.details:
                d["loc"] = where


# ---- background work ---------------------------------------------------------------------


class Ticker(threading.Thread):
    """Calls ``engine.tick()`` every ``interval`` seconds, and retries the start-up
    reconcile until it has settled everything (a scheduler that was away at start)."""

    def __init__(self, engine: Engine, interval: float, state: ServiceState):
        super().__init__(name="remediation-tick", daemon=True)
        self.engine = engine
        self.interval = interval
        self.state = state
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            if self.state.reconcile != "ok":
                reconcile(self.engine, self.state)
            try:
                self.engine.tick()
                self.state.last_tick_error = None
            except Exception as exc:  # a store or scheduler hiccup: the next tick tries again
                self.state.last_tick_error = f"{type(exc).__name__}: {exc}"
                log.error("tick failed", exc_info=exc)

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=60)


def reconcile(engine: Engine, state: ServiceState) -> dict[str, Any]:
    try:
        summary = engine.reconcile()
    except Exception as exc:
        state.reconcile = f"failed: {type(exc).__name__}: {exc}"
        log.error("reconcile failed", exc_info=exc)
        return {}
    if summary.get("scheduler_error") or summary.get("unresolved"):
        state.reconcile = (f"pending: {len(summary.get('unresolved', []))} unfinished action(s) not settled; "
                           f"scheduler: {summary.get('scheduler_error') or 'unreadable for some nodes'}")
    else:
        state.reconcile = "ok"
    log.info("reconciled", extra={"reconcile": summary})
    return summary


# ---- the server --------------------------------------------------------------------------


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"--web.listen-address {text!r}: expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--web.listen-address {text!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"--web.listen-address {text!r}: port out of range")
    return host or "0.0.0.0", number


def bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class RemediationService:
    """uvicorn on a socket bound at construction (port 0 picks a free one), the tick
    loop, and an orderly close: in-flight requests finish, the tick loop stops, the
    store closes. ``serve()`` blocks (the program); ``start()``/``stop()`` run it in a
    thread (tests)."""

    def __init__(self, engine: Engine, app: FastAPI, host: str, port: int, *, tick_interval: float = 5.0,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 graceful_timeout: int = 30, state: ServiceState | None = None,
                 reconciler: AlertReconciler | None = None):  # fmt: skip
        import uvicorn

        self.engine = engine
        self.state = state or app.state.service
        self.sock = bind(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if ssl_certfile else "http"
        config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, lifespan="off",
                                timeout_graceful_shutdown=graceful_timeout, ssl_certfile=ssl_certfile,
                                ssl_keyfile=ssl_keyfile, proxy_headers=False)  # fmt: skip
        try:
            config.load()  # TLS files and the app are checked now, not in the serving thread
        except Exception:
            self.sock.close()
            raise
        self.server = uvicorn.Server(config)
        self.ticker = Ticker(engine, tick_interval, self.state)
        self.reconciler = reconciler
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def serve(self) -> None:
        self.ticker.start()
        if self.reconciler is not None:
            self.reconciler.start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.close()

    def start(self, timeout: float = 30.0) -> RemediationService:
        self._thread = threading.Thread(target=self.serve, name="remediation-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the remediation service stopped during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the remediation service did not start within {timeout}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.ticker.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        # No decision is cut in half: wait for one in progress (uvicorn has already
        # waited for in-flight requests up to the graceful timeout).
        lock = getattr(self.engine, "_lock", None)
        held = lock.acquire(timeout=30) if lock is not None else False
        try:
            self.engine.store.close()
        finally:
            if held:
                lock.release()
        closer = getattr(self.engine.actuator, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception:  # closing a client must not turn a clean stop into a crash
                log.warning("closing the actuator failed", exc_info=True)
        try:
            self.sock.close()
        except OSError:
            pass


# ---- the command line --------------------------------------------------------------------


def build_actuator(args: argparse.Namespace) -> Actuator:
    kind = args.actuator
    if kind == "none":
        from remediation.actuators.none import NoneActuator

        return NoneActuator()
    if kind == "slurm" or (kind == "exec" and args.exec_view == "slurm"):
        from remediation.actuators.slurm import SlurmActuator

        view: Actuator = SlurmActuator(bin_dir=args.slurm_bin_dir, conf=args.slurm_conf, timeout=args.slurm_timeout)
    elif kind == "slurmrestd" or (kind == "exec" and args.exec_view == "slurmrestd"):
        if not args.slurm_rest_url:
            raise ConfigError("--slurm.rest-url is required with slurmrestd")
        from remediation.actuators.slurmrestd import SlurmRestActuator

        view = SlurmRestActuator(args.slurm_rest_url, token_file=args.slurm_token_file, user=args.slurm_rest_user,
                                 timeout=args.slurm_timeout, ca_file=args.slurm_ca_file)  # fmt: skip
    elif kind == "kubernetes" or (kind == "exec" and args.exec_view == "kubernetes"):
        from remediation.actuators.kubernetes import KubernetesActuator

        view = KubernetesActuator(kubeconfig=args.kube_kubeconfig, in_cluster=args.kube_in_cluster,
                                  taint_key=args.kube_taint_key, eviction_deadline=args.kube_eviction_deadline,
                                  partition_label=args.kube_partition_label, context=args.kube_context)  # fmt: skip
    else:
        raise ConfigError(f"unknown actuator {kind!r}")
    if kind != "exec":
        return view
    if not args.exec_command:
        raise ConfigError("--exec.command is required with --actuator exec")
    from remediation.actuators.exec import ExecActuator

    try:
        argv = shlex.split(args.exec_command)
        return ExecActuator(argv, args.exec_timeout, view=view)
    except ValueError as exc:
        raise ConfigError(f"--exec.command {args.exec_command!r}: {exc}") from None


DESCRIPTION = """\
Alertmanager webhooks in, guarded node drains out (docs/remediation.md).

Endpoints (default http://127.0.0.1:9847):
  POST /alerts                        webhook, bearer token from --webhook-token-file
  GET  /healthz, /readyz, /metrics    open (no token), like any exporter
  GET  /api/v1/status | history | audit                      admin token
  POST /api/v1/actions/ID/approve | /api/v1/actions/ID/deny  admin token
  POST /api/v1/nodes/NODE/resume | pause | unpause | breaker/reset
  (admin POSTs name the human: {"who": "alice@host"} or the X-Gpufleet-Who header)

The CLI `gpufleet remediation ...` wraps the admin API.
"""

EPILOG = """\
Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 when the store or the listen
address cannot be opened, 2 for a configuration error (flags, token files, policy).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpufleet-remediation", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    web = p.add_argument_group("HTTP")
    web.add_argument("--web.listen-address", dest="listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                     help=f"address to listen on; port 0 picks a free one (default {DEFAULT_LISTEN})")
    web.add_argument("--web.tls-cert-file", dest="tls_cert", metavar="FILE",
                     help="serve HTTPS with this certificate (PEM; with --web.tls-key-file)")
    web.add_argument("--web.tls-key-file", dest="tls_key", metavar="FILE", help="the certificate's private key (PEM)")
    web.add_argument("--max-body-bytes", "--web.max-body-bytes", dest="max_body", type=int, default=DEFAULT_MAX_BODY,
                     metavar="N", help=f"largest request body accepted, else 413 (default {DEFAULT_MAX_BODY})")
    auth = p.add_argument_group("authentication (both token files are required unless --insecure-no-auth)")
    auth.add_argument("--webhook-token-file", metavar="FILE",
                      help="bearer token Alertmanager sends on POST /alerts (its http_config.authorization."
                           "credentials_file); one line, read at start")
    auth.add_argument("--admin-token-file", metavar="FILE",
                      help="bearer token for the admin API /api/v1/ (must differ from the webhook token)")
    auth.add_argument("--insecure-no-auth", action="store_true",
                      help="allow starting without token files: an API whose file is not given is open to "
                           "anyone who can connect (a given file is still enforced)")
    core = p.add_argument_group("decisions")
    core.add_argument("--policy", default=DEFAULT_POLICY, metavar="FILE",
                      help=f"the remediation policy, validated at start (default {DEFAULT_POLICY})")
    core.add_argument("--db", default=DEFAULT_DB, metavar="FILE",
                      help=f"SQLite state and audit (WAL); its directory must exist (default {DEFAULT_DB})")
    core.add_argument("--dry-run", action="store_true",
                      help="decide and audit everything, change nothing in the scheduler")
    core.add_argument("--tick-interval", type=duration, default=5.0, metavar="DURATION",
                      help="how often due auto-resumes are performed (default 5s)")
    core.add_argument("--check-config", action="store_true",
                      help="validate the flags, token files, policy and actuator settings, then exit")
    act = p.add_argument_group("actuator")
    act.add_argument("--actuator", choices=ACTUATORS, default="slurm",
                     help="what carries out the actions (default slurm); none: notify-only")
    act.add_argument("--slurm.bin-dir", dest="slurm_bin_dir", metavar="DIR",
                     help="directory of sinfo/scontrol (default: PATH)")
    act.add_argument("--slurm.conf", dest="slurm_conf", metavar="FILE",
                     help="slurm.conf for the clients (default: SLURM_CONF or Slurm's default)")
    act.add_argument("--slurm.timeout", dest="slurm_timeout", type=duration, default=10.0, metavar="DURATION",
                     help="limit for each Slurm command or REST request (default 10s)")
    act.add_argument("--slurm.rest-url", dest="slurm_rest_url", metavar="URL",
                     help="slurmrestd base URL (http://host:6820 or unix:///path)")
    act.add_argument("--slurm.token-file", dest="slurm_token_file", metavar="FILE",
                     help="file with the JWT for slurmrestd (X-SLURM-USER-TOKEN)")
    act.add_argument("--slurm.rest-user", dest="slurm_rest_user", metavar="USER",
                     help="X-SLURM-USER-NAME for slurmrestd")
    act.add_argument("--slurm.ca-file", dest="slurm_ca_file", metavar="FILE", help="CA bundle for an https slurmrestd")
    act.add_argument("--kube.kubeconfig", dest="kube_kubeconfig", metavar="FILE",
                     help="kubeconfig (default: KUBECONFIG or ~/.kube/config)")
    act.add_argument("--kube.context", dest="kube_context", metavar="NAME", help="kubeconfig context")
    act.add_argument("--kube.in-cluster", dest="kube_in_cluster", action="store_true",
                     help="use the pod's service account")
    act.add_argument("--kube.taint-key", dest="kube_taint_key", default="gpufleet.io/remediation", metavar="KEY",
                     help="NoSchedule taint that marks our drains (default gpufleet.io/remediation)")
    act.add_argument("--kube.partition-label", dest="kube_partition_label",
                     default="node.kubernetes.io/instance-type", metavar="LABEL",
                     help="node label whose value groups nodes for the caps (default node.kubernetes.io/instance-type)")
    act.add_argument("--kube.eviction-deadline", dest="kube_eviction_deadline", type=duration, default=600.0,
                     metavar="DURATION", help="how long a drain retries evictions blocked by PDBs (default 10m)")
    act.add_argument("--exec.command", dest="exec_command", metavar="'ARGV'",
                     help="site command for --actuator exec, split like a shell (shlex) but never run by one; "
                          "{node} is replaced by the node, else the node is appended")
    act.add_argument("--exec.timeout", dest="exec_timeout", type=duration, default=30.0, metavar="DURATION",
                     help="limit for the site command (default 30s)")
    act.add_argument("--exec.view", dest="exec_view", choices=("slurm", "slurmrestd", "kubernetes"),
                     default="slurm", help="what reads the scheduler's state for --actuator exec (default slurm)")
    am = p.add_argument_group(
        "Alertmanager reconciliation (off without --alertmanager.url; docs/remediation.md)",
        "A resolution Alertmanager never delivers (the alert resolved while inhibited or silenced,\n"
        "or the service was unreachable) would keep a drained node out for ever: every interval the\n"
        "service asks Alertmanager's API which alerts it still holds and resolves those it held as\n"
        "firing that no Alertmanager has had for the grace period. None answering: nothing resolved.")
    am.add_argument("--alertmanager.url", dest="alertmanager_urls", action="append", default=[], metavar="URL",
                    help="Alertmanager base URL (http://host:9093, plus its --web.route-prefix if any); repeat "
                         "for each member of an HA pair: those that answer are asked, one is enough")
    am.add_argument("--alertmanager.reconcile-interval", dest="alertmanager_interval", type=duration, default=60.0,
                    metavar="DURATION", help="how often to reconcile (default 1m)")
    am.add_argument("--alertmanager.reconcile-grace", dest="alertmanager_grace", type=duration, metavar="DURATION",
                    help="how long an alert must be missing from every answering Alertmanager before it counts "
                         "as resolved, and how long an Alertmanager must have been up for its answer to count "
                         "(Prometheus re-sends every firing alert each minute); more than Prometheus' resend "
                         "delay (default: twice the interval)")
    am.add_argument("--alertmanager.timeout", dest="alertmanager_timeout", type=duration, default=10.0,
                    metavar="DURATION", help="limit for each request to Alertmanager (default 10s)")
    am.add_argument("--alertmanager.token-file", dest="alertmanager_token_file", metavar="FILE",
                    help="bearer token for Alertmanager (one line, read on every request), e.g. behind a proxy")
    am.add_argument("--alertmanager.basic-auth-user", dest="alertmanager_user", metavar="USER",
                    help="basic-auth user for Alertmanager (its --web.config.file basic_auth_users)")
    am.add_argument("--alertmanager.basic-auth-password-file", dest="alertmanager_password_file", metavar="FILE",
                    help="file with that user's password (one line, read on every request)")
    am.add_argument("--alertmanager.ca-file", dest="alertmanager_ca_file", metavar="FILE",
                    help="CA bundle for an https Alertmanager")
    logs = p.add_argument_group("logging")
    logs.add_argument("--log.level", dest="log_level", choices=LEVELS, default="info")
    logs.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt")
    return p


@dataclass
class Settings:
    host: str
    port: int
    webhook_token: str | None
    admin_token: str | None
    alertmanager: AlertmanagerClient | None = None


def check_settings(args: argparse.Namespace) -> Settings:
    """Everything that can be checked without touching the store or the scheduler."""
    missing = [flag for flag, value in (("--webhook-token-file", args.webhook_token_file),
                                        ("--admin-token-file", args.admin_token_file)) if not value]  # fmt: skip
    if missing and not args.insecure_no_auth:
        raise ConfigError(f"{' and '.join(missing)} required: the webhook and the admin API need bearer tokens "
                          "(or pass --insecure-no-auth to run without them, never on a shared network)")
    webhook = read_token(args.webhook_token_file, "--webhook-token-file") if args.webhook_token_file else None
    admin = read_token(args.admin_token_file, "--admin-token-file") if args.admin_token_file else None
    if webhook is not None and webhook == admin:
        raise ConfigError("--webhook-token-file and --admin-token-file hold the same token: they must differ "
                          "(Alertmanager's token must not open the admin API)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--web.tls-cert-file and --web.tls-key-file go together")
    for flag, path in (("--web.tls-cert-file", args.tls_cert), ("--web.tls-key-file", args.tls_key)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{flag} {path}: not readable")
    if args.max_body < 1024:
        raise ConfigError(f"--max-body-bytes {args.max_body}: at least 1024")
    host, port = parse_listen_address(args.listen)
    return Settings(host, port, webhook, admin, check_alertmanager(args))


def check_alertmanager(args: argparse.Namespace) -> AlertmanagerClient | None:
    """The Alertmanager client for reconciliation, or None when it is off (no URL)."""
    urls = list(args.alertmanager_urls)
    if not urls:
        given = [flag for flag, value in (("--alertmanager.reconcile-grace", args.alertmanager_grace),
                                          ("--alertmanager.token-file", args.alertmanager_token_file),
                                          ("--alertmanager.basic-auth-user", args.alertmanager_user),
                                          ("--alertmanager.basic-auth-password-file", args.alertmanager_password_file),
                                          ("--alertmanager.ca-file", args.alertmanager_ca_file)) if value]  # fmt: skip
        if given:
            raise ConfigError(f"{', '.join(given)} without --alertmanager.url: give the Alertmanager to reconcile with")
        return None
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"--alertmanager.url {url!r}: expected http(s)://host:port with an optional path")
    if len(set(urls)) != len(urls):
        raise ConfigError("--alertmanager.url: the same URL is given twice")
    if args.alertmanager_token_file and (args.alertmanager_user or args.alertmanager_password_file):
        raise ConfigError("--alertmanager.token-file and basic auth (--alertmanager.basic-auth-*) exclude each other")
    if bool(args.alertmanager_user) != bool(args.alertmanager_password_file):
        raise ConfigError("--alertmanager.basic-auth-user and --alertmanager.basic-auth-password-file go together")
    if args.alertmanager_token_file:
        read_token(args.alertmanager_token_file, "--alertmanager.token-file")
    for flag, path in (("--alertmanager.basic-auth-password-file", args.alertmanager_password_file),
                       ("--alertmanager.ca-file", args.alertmanager_ca_file)):  # fmt: skip
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{flag} {path}: not readable")
    if args.alertmanager_grace is None:
        args.alertmanager_grace = 2 * args.alertmanager_interval
    return AlertmanagerClient(urls, timeout=args.alertmanager_timeout, token_file=args.alertmanager_token_file,
                              basic_auth_user=args.alertmanager_user,
                              basic_auth_password_file=args.alertmanager_password_file,
                              ca_file=args.alertmanager_ca_file)  # fmt: skip


class _DropColorMessage(logging.Filter):
    """uvicorn attaches an ANSI-coloured copy of its message as an extra field."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).addFilter(_DropColorMessage())

    def fail(code: int, message: str) -> int:
        print(f"gpufleet-remediation: error: {message}", file=sys.stderr)
        log.error("not starting", extra={"reason": message})
        return code

    try:
        settings = check_settings(args)
        policy = load_policy(args.policy)
        actuator = build_actuator(args)
    except (ConfigError, PolicyError) as exc:
        return fail(2, str(exc))
    except ActuatorError as exc:
        return fail(2, f"--actuator {args.actuator}: {exc}")
    if args.check_config:
        am = (f", reconciling with {len(settings.alertmanager.urls)} Alertmanager(s) every "
              f"{args.alertmanager_interval:g}s" if settings.alertmanager else "")  # fmt: skip
        print(f"gpufleet-remediation: configuration ok ({len(policy.rules)} rules, actuator {args.actuator}{am})")
        return 0
    if args.insecure_no_auth and (settings.webhook_token is None or settings.admin_token is None):
        open_apis = [n for n, t in (("webhook", settings.webhook_token), ("admin API", settings.admin_token)) if t is None]
        log.warning("running without authentication", extra={"open": ", ".join(open_apis)})

    try:
        store = Store(args.db)
    except Exception as exc:
        return fail(1, f"--db {args.db}: cannot open the store: {exc}")
    engine = Engine(policy, store, actuator, dry_run=args.dry_run)
    state = ServiceState()
    try:
        app = create_app(engine, webhook_token=settings.webhook_token, admin_token=settings.admin_token,
                         max_body_bytes=args.max_body, state=state)  # fmt: skip
        reconciler = None
        if settings.alertmanager is not None:
            reconciler = AlertReconciler(engine, settings.alertmanager, app.state.reconcile_metrics,
                                         interval=args.alertmanager_interval, grace=args.alertmanager_grace,
                                         clock=engine.clock)  # fmt: skip
        service = RemediationService(engine, app, settings.host, settings.port, tick_interval=args.tick_interval,
                                     ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, state=state,
                                     reconciler=reconciler)  # fmt: skip
    except OSError as exc:
        store.close()
        return fail(1, f"--web.listen-address {args.listen}: {exc.strerror or exc}")
    except Exception as exc:  # a TLS file that does not load
        store.close()
        return fail(2, f"cannot set up the HTTP server: {exc}")

    def on_signal(signum: int, _frame: Any) -> None:
        # Before serving: stop now (the finally below closes the store). After uvicorn's
        # graceful shutdown it re-raises the signal it handled: nothing left to do.
        if not service.server.should_exit:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        reconcile(engine, state)
        log.info("listening", extra={"address": service.url, "actuator": actuator.name, "dry_run": engine.dry_run,
                                     "policy": args.policy, "db": args.db,
                                     "alertmanagers": ",".join(args.alertmanager_urls) or "none"})  # fmt: skip
        service.serve()
    finally:
        service.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
