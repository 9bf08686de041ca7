"""A fake slurmrestd of Slurm 23.02+ (v0.0.39 .. v0.0.41): node reads and node updates.

Debian's slurmrestd 22.05 (OpenAPI v0.0.38) has no node update (``POST
/slurm/v0.0.38/node/{name}`` answers 405), so the write path of the slurmrestd
actuator is tested here, against the REST paths and bodies of the newer API:

* ``GET /openapi/v3``: the paths, with their operations (``/node/{node_name}``: get,
  post, delete), for each version served.
* ``GET /slurm/<v>/nodes``, ``GET /slurm/<v>/node/<name>``: node records in the
  v0.0.41 shape (``state`` a list of flags, numbers wrapped in ``{"set", "infinite",
  "number"}``), taken from tests/fixtures/slurm/v0.0.41; an unknown node is HTTP 500
  with ``error_number`` 2018 (ESLURM_INVALID_NODE_NAME), as slurmrestd answers.
* ``POST /slurm/<v>/node/<name>`` with ``update_node_msg`` (``state``: a list of
  flags, ``reason``, ``reason_uid``, ``comment``...; unknown fields rejected):
  ``DRAIN`` needs a reason (as slurmctld insists), ``RESUME`` clears DRAIN/DOWN and
  the reason and is refused on a node that is neither.
* ``GET /slurm/<v>/ping``.

With ``token`` set, ``X-SLURM-USER-NAME`` and ``X-SLURM-USER-TOKEN`` must match (401
otherwise). Every request is recorded (method, path, headers, body).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.loopback_http import LoopbackHTTP

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "slurm" / "v0.0.41" / "rest" / "slurm_v0.0.41_nodes.json"
UPDATE_FIELDS = {"comment", "cpu_bind", "extra", "features", "features_act", "gres", "address", "hostname",
                 "name", "state", "reason", "reason_uid", "resume_after", "weight"}
STATE_FLAGS = {"DRAIN", "RESUME", "UNDRAIN", "DOWN", "FAIL", "IDLE", "FUTURE", "POWER_DOWN", "POWER_UP",
               "NOT_RESPONDING", "REBOOT_REQUESTED", "MAINTENANCE", "CLOUD", "POWER_DRAIN"}


@dataclass
class FakeSlurmrestd(LoopbackHTTP):
    versions: tuple[str, ...] = ("v0.0.40", "v0.0.41")
    user: str = ""
    token: str = ""
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    fail_next: list[tuple[int, dict]] = field(default_factory=list)  # scripted answers to the next POSTs
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeSlurmrestd:
        fake = self

        class Handler(_Handler):
            rest = fake

        return self._serve(Handler, "fake-slurmrestd")

    def add_node(self, name: str, state: list[str] | None = None, reason: str = "",
                 partitions: tuple[str, ...] = ("gpu",)) -> None:
        template = json.loads(FIXTURE.read_text())["nodes"][0]
        rec = copy.deepcopy(template)
        rec.update(name=name, hostname=name, state=list(state or ["IDLE"]), reason=reason,
                   reason_set_by_user="root" if reason else "", partitions=list(partitions),
                   alloc_cpus=0, gres_used="gpu:h100:0(IDX:N/A)", tres_used="")
        with self._lock:
            self.nodes[name] = rec

    def posts(self) -> list[tuple[str, Any]]:
        with self._lock:
            return [(p, b) for m, p, _, b in self.requests if m == "POST"]

    # -- handling ---------------------------------------------------------------------
    def _meta(self, v: str) -> dict[str, Any]:
        return {"plugin": {"type": "", "name": "", "data_parser": f"data_parser/{v}", "accounting_storage": ""},
                "client": {"source": "[127.0.0.1]", "user": self.user or "root", "group": "root"},
                "slurm": {"version": {"major": "24", "micro": "4", "minor": "05"}, "release": "24.05.4",
                          "cluster": "fake"}}

    def _resp(self, v: str, **body: Any) -> dict[str, Any]:
        errors = body.pop("errors", [])
        return {**body, "meta": self._meta(v), "errors": errors, "warnings": []}

    def _error(self, v: str, code: int, errno: int, error: str, description: str) -> tuple[int, dict]:
        return code, self._resp(v, errors=[{"description": description, "error_number": errno, "error": error,
                                            "source": "_update_node" if code != 404 else "slurmrestd"}])

    def openapi(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for v in self.versions:
            ref = {"$ref": f"#/components/schemas/{v}_update_node_msg"}
            paths[f"/slurm/{v}/ping"] = {"get": {"operationId": f"slurm_{v}_get_ping"}}
            paths[f"/slurm/{v}/nodes"] = {"get": {"operationId": f"slurm_{v}_get_nodes"}}
            paths[f"/slurm/{v}/node/{{node_name}}"] = {
                "get": {"operationId": f"slurm_{v}_get_node"},
                "post": {"operationId": f"slurm_{v}_post_node",
                         "requestBody": {"content": {"application/json": {"schema": ref}}}},
                "delete": {"operationId": f"slurm_{v}_delete_node"},
            }
        return {"openapi": "3.0.3", "info": {"title": "Slurm REST API", "version": "Slurm-24.05.4"}, "paths": paths}

    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path, headers, body))
            if self.token and (headers.get("x-slurm-user-token") != self.token
                               or headers.get("x-slurm-user-name") != self.user):
                return 401, "Authentication failure"
            if path == "/openapi/v3" and method == "GET":
                return 200, self.openapi()
            m = re.fullmatch(r"/slurm/(v\d+\.\d+\.\d+)/(ping|nodes|node/([^/]+))/?", path)
            if not m or m.group(1) not in self.versions:
                return 404, "Unable find requested URL. Please view /openapi/v3 for API reference."
            v, what, name = m.group(1), m.group(2), m.group(3)
            if what == "ping" and method == "GET":
                return 200, self._resp(v, pings=[{"hostname": "ctld", "pinged": "UP", "latency": 90,
                                                  "mode": "primary", "primary": True, "responding": True}])
            if what == "nodes" and method == "GET":
                return 200, self._resp(v, nodes=list(copy.deepcopy(self.nodes).values()), last_update={})
            node = self.nodes.get(name or "")
            if method == "GET":
                if node is None:
                    return self._error(v, 500, 2018, "Invalid node name specified", f"Failure to query node {name}")
                return 200, self._resp(v, nodes=[copy.deepcopy(node)], last_update={})
            if method == "POST":
                if self.fail_next:
                    return self.fail_next.pop(0)
                return self._update(v, name or "", node, body)
            return 405, "Requested REST method is not defined at URL. Please view /openapi/v3 for API reference."

    def _update(self, v: str, name: str, node: dict | None, body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict):
            return self._error(v, 400, 9000, "Unable to parse query", "expected a JSON object (update_node_msg)")
        unknown = set(body) - UPDATE_FIELDS
        if unknown:
            return self._error(v, 400, 9001, "Unable to parse query", f"unknown update_node_msg fields {sorted(unknown)}")
        state = body.get("state", [])
        if not isinstance(state, list) or not all(isinstance(s, str) and s in STATE_FLAGS for s in state):
            return self._error(v, 400, 9001, "Unable to parse query", f"invalid node state {state!r}")
        if node is None:
            return self._error(v, 500, 2018, "Invalid node name specified", f"Failure to update node {name}")
        flags = [s for s in node["state"] if s != "IDLE"]
        base = node["state"][0]
        if "DRAIN" in state:
            if not body.get("reason"):
                return self._error(v, 500, 2023, "Invalid node state specified",
                                   "You must specify a reason when DOWNING or DRAINING a node")
            if "DRAIN" not in flags:
                flags.append("DRAIN")
            node["reason"] = body["reason"]
            node["reason_set_by_user"] = self.user or "root"
        if "RESUME" in state:
            if "DRAIN" not in flags and base != "DOWN":
                return self._error(v, 500, 2023, "Invalid node state specified", f"Failure to update node {name}")
            flags = [f for f in flags if f not in ("DRAIN", "DOWN")]
            base = "IDLE" if base == "DOWN" else base
            node["reason"] = ""
            node["reason_set_by_user"] = ""
        node["state"] = [base, *[f for f in flags if f != base]]
        return 200, self._resp(v)


class _Handler(BaseHTTPRequestHandler):
    rest: FakeSlurmrestd
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        code, obj = self.rest.handle(self.command, self.path, headers, body)
        if isinstance(obj, str):
            data, ctype = obj.encode(), "text/plain"
        else:
            data, ctype = json.dumps(obj).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = _serve  # noqa: N815
