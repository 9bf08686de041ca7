"""A fake Kubernetes API server: the REST paths and bodies the node actuator uses.

No API server runs here (DESIGN.md), so this stands in for one, on 127.0.0.1 with
the standard library's threaded HTTP server. It follows the real API where the
actuator depends on it, and refuses what it does not implement instead of
pretending:

* ``GET /api/v1/nodes`` (``limit``/``continue`` paging), ``GET /api/v1/nodes/{name}``,
  ``PATCH /api/v1/nodes/{name}`` with ``application/strategic-merge-patch+json``
  (maps merged, ``null`` deletes, lists replaced: ``spec.taints`` has no merge key)
  or ``application/merge-patch+json`` (RFC 7386); other patch types and SMP
  directives (``$patch``...) answer 415/400. A ``metadata.resourceVersion`` in the
  patch is a precondition (409 Conflict when stale), as on a real server; writes
  bump the version and are validated (taint keys, label-value taint values, effects,
  no duplicate key+effect: 422 Invalid).
* ``GET /api/v1/pods`` and ``GET /api/v1/namespaces/{ns}/pods`` with
  ``fieldSelector=spec.nodeName=N`` (also ``==`` and ``!=``, comma-joined).
* ``POST /api/v1/namespaces/{ns}/pods/{pod}/eviction`` with a ``policy/v1`` (or
  ``v1beta1``) Eviction whose name matches the URL: 201 and the pod is gone, or
  what the test scripted with ``script_eviction``: 429 (a PodDisruptionBudget:
  Status reason ``TooManyRequests``, cause ``DisruptionBudget``), 500 (several PDBs:
  ``InternalError``), or any other code.
* Every answer that is not an object is a ``Status`` (``NotFound``, ``Conflict``,
  ``Invalid``, ``MethodNotAllowed``...), like the real thing.

Every request is recorded (method, path, query, content type, body) and mapped to
the (resource, verb) pair the API server's authorizer would check, for RBAC tests.
With ``grants`` set (e.g. ``role_grants(cluster_role)`` from the shipped manifests) the
fake also authorizes like the RBAC authorizer: a request whose (resource, verb) no rule
grants is answered 403 ``Forbidden`` with the API server's message, and recorded in
``denied``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client as k8s

from tests.loopback_http import LoopbackHTTP

SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
_QUALIFIED = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_NOW = "2026-01-01T00:00:00Z"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any
    resource: str = ""
    verb: str = ""


@dataclass
class FakeKube(LoopbackHTTP):
    """Nodes and pods in memory, served over HTTP. ``start()``, then point a client at
    ``configuration()``; ``stop()`` at the end (or use it as a context manager)."""

    token: str = ""  # when set, "Authorization: Bearer <token>" is required (401 otherwise)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    evicted: list[tuple[str, str]] = field(default_factory=list)
    # RBAC: None lets everything through; a set of (resource, verb) enforces exactly that.
    grants: set[tuple[str, str]] | None = None
    user: str = "system:serviceaccount:gpufleet:gpufleet-remediation"
    denied: list[Request] = field(default_factory=list)
    # Called as on_patch(fake, node_name) before a PATCH is applied: another writer
    # changing the node between the client's read and its patch.
    on_patch: Callable[[FakeKube, str], None] | None = None
    _script: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _rv: int = 100
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _server: ThreadingHTTPServer | None = None

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        return self._serve(Handler, "fake-kube")

    def configuration(self) -> k8s.Configuration:
        cfg = k8s.Configuration(host=self.url)
        if self.token:
            # The whole header value, no api_key_prefix: client 36 looks the prefix up
            # under 'BearerToken' but the key under 'authorization'.
            cfg.api_key = {"authorization": f"Bearer {self.token}"}
        return cfg

    # -- state ----------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def add_node(self, name: str, *, ready: bool | None = True, unschedulable: bool = False,
                 taints: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None,
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if unschedulable:
            spec["unschedulable"] = True
        if taints:
            spec["taints"] = copy.deepcopy(taints)
        status = "Unknown" if ready is None else ("True" if ready else "False")
        node = {
            "kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "", "creationTimestamp": _NOW,
                         "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                         "annotations": dict(annotations or {})},
            "spec": spec,
            "status": {"conditions": [{
                "type": "Ready", "status": status, "lastHeartbeatTime": _NOW, "lastTransitionTime": _NOW,
                "reason": "KubeletReady" if ready else "KubeletNotReady",
                "message": "kubelet is posting ready status" if ready else "container runtime is down"}]},
        }
        with self._lock:
            node["metadata"]["resourceVersion"] = self._next_rv()
            self.nodes[name] = node
        return node

    def add_pod(self, namespace: str, name: str, node: str, *, owner_kind: str | None = "ReplicaSet",
                mirror: bool = False, phase: str = "Running", terminating: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                                "creationTimestamp": _NOW, "annotations": {}}
        if owner_kind:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner_kind, "name": f"{name}-owner",
                                        "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]
        if mirror:
            meta["annotations"]["kubernetes.io/config.mirror"] = "0123456789abcdef"
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": str(uuid.uuid4()),
                                        "controller": True}]
        if terminating:
            meta["deletionTimestamp"] = _NOW
            meta["deletionGracePeriodSeconds"] = 30
        pod = {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
               "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.local/app:1"}]},
               "status": {"phase": phase}}
        with self._lock:
            meta["resourceVersion"] = self._next_rv()
            self.pods[(namespace, name)] = pod
        return pod

    def script_eviction(self, namespace: str, name: str, *codes: int) -> None:
        """The next evictions of this pod answer these codes, in order (then 201)."""
        with self._lock:
            self._script.setdefault((namespace, name), []).extend(codes)

    def update_node(self, name: str, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Change a node as another client would (its resourceVersion moves on)."""
        with self._lock:
            mutate(self.nodes[name])
            self.nodes[name]["metadata"]["resourceVersion"] = self._next_rv()

    def node_obj(self, name: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.nodes[name])

    def rbac(self) -> set[tuple[str, str]]:
        """The (resource, verb) pairs an authorizer would have checked so far."""
        with self._lock:
            return {(r.resource, r.verb) for r in self.requests}

    def evictions(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.resource == "pods/eviction"]

    # -- request handling (called from the HTTP threads) --------------------------------
    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/") or "/"
        query = parse_qs(parts.query, keep_blank_values=True)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = body.decode(errors="replace")
        req = Request(method, path, query, ctype, parsed)
        req.resource, req.verb = authorizer_attributes(method, path, query)
        with self._lock:
            self.requests.append(req)
            if self.token and headers.get("authorization") != f"Bearer {self.token}":
                return 401, status_obj(401, "Unauthorized", "Unauthorized")
            if self.grants is not None and (req.resource, req.verb) not in self.grants:
                self.denied.append(req)
                return 403, forbidden(self.user, req)
            return self._route(req)

    def _route(self, req: Request) -> tuple[int, dict]:
        m = req.method
        p = req.path
        if p == "/api/v1/nodes":
            if m == "GET":
                return 200, self._list("NodeList", list(self.nodes.values()), req.query)
            return 405, status_obj(405, "MethodNotAllowed", f"the server does not allow this method on /api/v1/nodes ({m})")
        if mt := re.fullmatch(r"/api/v1/nodes/([^/]+)", p):
            name = mt.group(1)
            node = self.nodes.get(name)
            if node is None:
                return 404, status_obj(404, "NotFound", f'nodes "{name}" not found', name=name, kind="nodes")
            if m == "GET":
                return 200, copy.deepcopy(node)
            if m == "PATCH":
                return self._patch_node(name, node, req)
            return 405, status_obj(405, "MethodNotAllowed", f"the server does not allow this method ({m})")
        if p == "/api/v1/pods" or re.fullmatch(r"/api/v1/namespaces/[^/]+/pods", p):
            if m != "GET":
                return 405, status_obj(405, "MethodNotAllowed", f"the server does not allow this method ({m})")
            ns = p.split("/")[4] if p.startswith("/api/v1/namespaces/") else None
            try:
                sel = parse_field_selector(req.query.get("fieldSelector", [""])[0])
            except ValueError as exc:
                return 400, status_obj(400, "BadRequest", str(exc))
            pods = [pod for (pns, _), pod in self.pods.items() if (ns is None or pns == ns) and sel(pod)]
            return 200, self._list("PodList", pods, req.query)
        if mt := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/eviction", p):
            if m != "POST":
                return 405, status_obj(405, "MethodNotAllowed", f"the server does not allow this method ({m})")
            return self._evict(mt.group(1), mt.group(2), req)
        return 404, status_obj(404, "NotFound", "the server could not find the requested resource")

    def _list(self, kind: str, items: list[dict], query: dict[str, list[str]]) -> dict:
        items = sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        start = int(query.get("continue", ["0"])[0] or 0)
        limit = int(query.get("limit", ["0"])[0] or 0)
        end = start + limit if limit > 0 else len(items)
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if end < len(items):
            meta["continue"] = str(end)
            meta["remainingItemCount"] = len(items) - end
        out = []
        for o in items[start:end]:
            o = copy.deepcopy(o)
            o.pop("kind", None)
            o.pop("apiVersion", None)
            out.append(o)
        return {"kind": kind, "apiVersion": "v1", "metadata": meta, "items": out}

    def _patch_node(self, name: str, node: dict, req: Request) -> tuple[int, dict]:
        if req.content_type not in (SMP, MERGE):
            return 415, status_obj(415, "UnsupportedMediaType",
                                   f"fake_kube implements only {SMP} and {MERGE} patches, got {req.content_type!r}")
        if not isinstance(req.body, dict):
            return 400, status_obj(400, "BadRequest", "patch body is not a JSON object")
        if req.content_type == SMP and (bad := _directive(req.body)):
            return 400, status_obj(400, "BadRequest", f"fake_kube does not implement the SMP directive {bad}")
        if self.on_patch is not None:
            self.on_patch(self, name)
            node = self.nodes[name]
        want_rv = (req.body.get("metadata") or {}).get("resourceVersion")
        if want_rv is not None and want_rv != node["metadata"]["resourceVersion"]:
            return 409, status_obj(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object '
                                   "has been modified; please apply your changes to the latest version and try again",
                                   name=name, kind="nodes")
        new = merge_patch(copy.deepcopy(node), req.body)
        new["metadata"]["resourceVersion"] = node["metadata"]["resourceVersion"]
        if new["metadata"].get("name") != name:
            return 422, status_obj(422, "Invalid", f'Node "{name}" is invalid: metadata.name: field is immutable')
        problems = validate_node(new)
        if problems:
            return 422, status_obj(422, "Invalid", f'Node "{name}" is invalid: {"; ".join(problems)}',
                                   name=name, kind="Node")
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.nodes[name] = new
        return 200, copy.deepcopy(new)

    def _evict(self, ns: str, name: str, req: Request) -> tuple[int, dict]:
        pod = self.pods.get((ns, name))
        if pod is None:
            return 404, status_obj(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        body = req.body
        if not isinstance(body, dict) or body.get("kind") != "Eviction" or \
                body.get("apiVersion") not in ("policy/v1", "policy/v1beta1"):
            return 400, status_obj(400, "BadRequest", "expected a policy/v1 Eviction body")
        if (body.get("metadata") or {}).get("name") != name:
            return 400, status_obj(400, "BadRequest", "name in URL does not match name in Eviction object")
        script = self._script.get((ns, name))
        code = script.pop(0) if script else 201
        if code == 429:
            return 429, status_obj(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's "
                                   "disruption budget.", causes=[{"reason": "DisruptionBudget", "message":
                                   "The disruption budget pdb-train needs 2 healthy pods and has 2 currently"}])
        if code == 500:
            return 500, status_obj(500, "InternalError", "This pod has more than one PodDisruptionBudget, which the "
                                   "eviction subresource does not support.")
        if code >= 300:
            return code, status_obj(code, "InternalError" if code >= 500 else "BadRequest", f"scripted {code}")
        del self.pods[(ns, name)]
        self.evicted.append((ns, name))
        return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        code, obj = self.kube.handle(self.command, self.path, headers, body)
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve  # noqa: N815


# -- the API server's rules, as far as the fake needs them --------------------------------
def status_obj(code: int, reason: str, message: str, *, name: str = "", kind: str = "",
               causes: list[dict] | None = None) -> dict:
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if kind:
        details["kind"] = kind
    if causes:
        details["causes"] = causes
    obj: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code}
    if details:
        obj["details"] = details
    return obj


def forbidden(user: str, req: Request) -> dict:
    """The 403 Status the API server answers when RBAC grants nothing for the request."""
    parts = [p for p in req.path.split("/") if p]
    namespace = parts[3] if parts[2:3] == ["namespaces"] and len(parts) > 3 else ""
    rest = parts[4:] if namespace else parts[2:]
    name = rest[1] if len(rest) >= 2 else ""
    resource, _, sub = req.resource.partition("/")
    what = f'{resource} "{name}"' if name else resource
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return status_obj(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {req.verb} resource '
                      f'"{req.resource}" in API group "" {scope}', name=name, kind=resource)


def role_grants(role: dict) -> set[tuple[str, str]]:
    """(resource, verb) pairs a (Cluster)Role grants in the core API group, as the RBAC
    authorizer reads its rules ("*" expanded over what the fake serves). Rules for other
    API groups grant nothing here; ``resourceNames`` and ``nonResourceURLs`` are refused,
    since the fake does not model them."""
    served = {"nodes", "pods", "pods/eviction"}
    verbs_all = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
    out: set[tuple[str, str]] = set()
    for rule in role.get("rules") or []:
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            raise ValueError(f"rule not modelled by the fake: {rule}")
        groups = rule.get("apiGroups") or []
        if "" not in groups and "*" not in groups:
            continue
        resources = served if "*" in (rule.get("resources") or []) else set(rule.get("resources") or [])
        verbs = verbs_all if "*" in (rule.get("verbs") or []) else set(rule.get("verbs") or [])
        out |= {(r, v) for r in resources for v in verbs}
    return out


def authorizer_attributes(method: str, path: str, query: dict[str, list[str]]) -> tuple[str, str]:
    """(resource[/subresource], verb) as the apiserver's RequestInfoResolver derives them."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] != ["api", "v1"]:
        return "nonresource:" + path, method.lower()
    rest = parts[2:]
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    resource = rest[0] if rest else ""
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    watch = query.get("watch", ["false"])[0] in ("true", "1")
    verb = {
        "GET": ("watch" if watch else "get") if named else ("watch" if watch else "list"),
        "POST": "create", "PUT": "update", "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }.get(method, method.lower())
    return resource, verb


def parse_field_selector(text: str):
    """A matcher for ``a=b,c!=d`` over the fields pods support here."""
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([A-Za-z.]+)\s*(==|!=|=)\s*(.*)", term)
        if not m:
            raise ValueError(f"invalid field selector: {term!r}")
        fld, op, val = m.groups()
        if fld not in ("spec.nodeName", "metadata.name", "metadata.namespace", "status.phase"):
            raise ValueError(f'field label not supported: {fld}')
        terms.append((fld, op != "!=", val))

    def get(obj: dict, dotted: str) -> str:
        cur: Any = obj
        for key in dotted.split("."):
            cur = cur.get(key, "") if isinstance(cur, dict) else ""
        return str(cur or "")

    return lambda obj: all((get(obj, f) == v) == eq for f, eq, v in terms)


def _directive(patch: Any) -> str:
    if isinstance(patch, dict):
        for k, v in patch.items():
            if k.startswith("$"):
                return k
            if found := _directive(v):
                return found
    elif isinstance(patch, list):
        for v in patch:
            if found := _directive(v):
                return found
    return ""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386; also strategic merge for what Node patches here touch (lists replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge_patch(target.get(k), v)
    return target


def validate_node(node: dict) -> list[str]:
    problems = []
    spec = node.get("spec") or {}
    if "unschedulable" in spec and not isinstance(spec["unschedulable"], bool):
        problems.append("spec.unschedulable: must be a boolean")
    seen = set()
    for i, t in enumerate(spec.get("taints") or []):
        key, value, effect = t.get("key", ""), t.get("value", ""), t.get("effect", "")
        if not isinstance(key, str) or not _QUALIFIED.fullmatch(key) or len(key.split("/")[-1]) > 63:
            problems.append(f"spec.taints[{i}].key: Invalid value: {key!r}")
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value) or len(value) > 63:
            problems.append(f"spec.taints[{i}].value: Invalid value: {value!r}: a valid label must be 63 "
                            "characters or less, alphanumeric, '-', '_' or '.'")
        if effect not in _EFFECTS:
            problems.append(f"spec.taints[{i}].effect: Unsupported value: {effect!r}")
        if (key, effect) in seen:
            problems.append(f"spec.taints[{i}]: Duplicate value: {key}:{effect}")
        seen.add((key, effect))
    for k, v in ((node.get("metadata") or {}).get("annotations") or {}).items():
        if not isinstance(v, str):
            problems.append(f"metadata.annotations[{k}]: must be a string")
    return problems
