"""Kubernetes through the official client: cordon, taint, evict; and the reverse.

Drain, the way ``kubectl drain`` does it but with an owner's mark:

1. one PATCH of the Node (strategic merge, guarded by the ``resourceVersion`` just
   read, so a concurrent change makes it fail with 409 and we read again):
   ``spec.unschedulable: true``, our ``NoSchedule`` taint (``taint_key``, value
   ``drain``) added to the existing taints, and the reason in the annotation
   ``gpufleet.io/reason`` (a taint value is a 63-character label value, a reason is
   free text);
2. the node's pods (``fieldSelector=spec.nodeName=N``, all namespaces) are evicted
   through the Eviction API (``policy/v1``), which honours PodDisruptionBudgets.
   DaemonSet pods (their controller ignores cordons and would recreate them) and
   mirror pods (static pods of the kubelet, annotation ``kubernetes.io/config.mirror``)
   are skipped, as are pods already finished or terminating. 429 (a PDB does not
   allow the disruption now) is retried with exponential backoff until
   ``eviction_deadline``; 500 (the pod matches several PDBs, which the Eviction API
   refuses) is not retried. Failures are reported after every pod was tried, as an
   ActuatorError; the node stays cordoned and tainted (ours), so a retry of the drain
   is allowed and only evicts what is left. Evictions start the pods' graceful
   termination; the drain does not wait for the pods to be gone.

Ownership is our taint: ``ours`` when it is present; a node that is unschedulable
without it was cordoned by someone else, and is refused, as is a NotReady node.
Resume requires our taint and removes it, uncordons and removes the annotation.

Reboot: Kubernetes has no API to reboot a node, so ``reboot`` raises a non-transient
ActuatorError. Sites that reboot through an agent (kured's sentinel, a BMC) use the
exec actuator for that rule.

``RBAC_VERBS`` lists every (resource, verb) this module calls; the ClusterRole that
ships with the service grants exactly these (tests/test_actuator_kubernetes.py checks
the list against the requests the actuator really makes).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from remediation.actuators.base import REASON_PREFIX, ActuatorError, NodeStatus
from remediation.actuators.slurm import sanitize_reason

__all__ = ["MIRROR_ANNOTATION", "RBAC_VERBS", "REASON_ANNOTATION", "KubernetesActuator"]

#: Every (resource, verb) the actuator uses; nothing else.
RBAC_VERBS = (
    ("nodes", "get"),
    ("nodes", "list"),
    ("nodes", "patch"),
    ("pods", "list"),
    ("pods/eviction", "create"),
)
REASON_ANNOTATION = "gpufleet.io/reason"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
TAINT_VALUE = "drain"
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MULTIPLE_PDB = re.compile(r"more than one PodDisruptionBudget", re.I)
_CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, OSError)


def check_node_name(node: str) -> str:
    if not isinstance(node, str) or len(node) > 253 or not _DNS_SUBDOMAIN.fullmatch(node):
        raise ActuatorError(f"refusing node name {node!r}: not a Kubernetes node name", transient=False)
    return node


def _status_message(exc: ApiException) -> str:
    """The ``message`` of the Status object the API server answered with."""
    try:
        body = json.loads(exc.body) if exc.body else {}
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (ValueError, TypeError):
        pass
    return f"{exc.reason or ''}".strip() or "(no message)"


def _transient_status(status: int | None) -> bool:
    return status in (None, 0, 408, 409, 429) or (status is not None and status >= 500)


class KubernetesActuator:
    """Nodes of the cluster that ``kubeconfig`` (or the pod's service account with
    ``in_cluster``, or an explicit ``configuration``) points at.

    ``partition_label``: the node label whose value groups nodes for the caps (a node
    pool; default the instance type). ``eviction_deadline``: how long a drain keeps
    retrying evictions that PodDisruptionBudgets block (429). ``request_timeout``: the
    limit for each API request.
    """

    name = "kubernetes"

    def __init__(
        self,
        kubeconfig: str | None = None,
        in_cluster: bool = False,
        taint_key: str = "gpufleet.io/remediation",
        eviction_deadline: float = 600.0,
        partition_label: str = "node.kubernetes.io/instance-type",
        *,
        configuration: k8s.Configuration | None = None,
        context: str | None = None,
        request_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        page_size: int = 500,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if configuration is None:
            configuration = k8s.Configuration()
            try:
                if in_cluster:
                    k8s_config.load_incluster_config(client_configuration=configuration)
                else:
                    k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                                client_configuration=configuration)
            except (k8s_config.ConfigException, OSError, TypeError, ValueError) as exc:
                where = "in-cluster service account" if in_cluster else (kubeconfig or "default kubeconfig")
                raise ActuatorError(f"cannot load Kubernetes configuration ({where}): {exc}", transient=False) from None
        self.api = k8s.CoreV1Api(k8s.ApiClient(configuration))
        self.taint_key = taint_key
        self.eviction_deadline = eviction_deadline
        self.partition_label = partition_label
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.page_size = page_size
        self._sleep = sleep
        self._clock = clock

    def close(self) -> None:
        self.api.api_client.close()

    # -- API calls ---------------------------------------------------------------
    @staticmethod
    def _error(what: str, exc: ApiException) -> ActuatorError:
        if exc.status in (401, 403):
            return ActuatorError(f"{what}: HTTP {exc.status} {_status_message(exc)} "
                                 "(check the credentials and the RBAC rules: RBAC_VERBS)", transient=False)
        return ActuatorError(f"{what}: HTTP {exc.status} {_status_message(exc)}",
                             transient=_transient_status(exc.status))

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, _request_timeout=self.request_timeout, **kwargs)
        except ApiException as exc:
            raise self._error(what, exc) from None
        except _CONNECTION_ERRORS as exc:
            raise ActuatorError(f"{what}: API server unreachable: {type(exc).__name__}: {exc}", transient=True) from None

    def _list(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> list[Any]:
        items: list[Any] = []
        token = None
        while True:
            page_args = {"limit": self.page_size, **kwargs}
            if token:
                page_args["_continue"] = token
            resp = self._call(what, fn, **page_args)
            items.extend(resp.items or [])
            token = resp.metadata._continue if resp.metadata else None
            if not token:
                return items

    def _read(self, node: str) -> k8s.V1Node | None:
        try:
            return self.api.read_node(node, _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error(f"GET node {node}", exc) from None
        except _CONNECTION_ERRORS as exc:
            raise ActuatorError(f"GET node {node}: API server unreachable: {exc}", transient=True) from None

    # -- reading ------------------------------------------------------------------
    def _our_taint(self, n: k8s.V1Node) -> k8s.V1Taint | None:
        for t in (n.spec.taints if n.spec and n.spec.taints else []):
            if t.key == self.taint_key:
                return t
        return None

    def status_of(self, n: k8s.V1Node) -> NodeStatus:
        meta = n.metadata
        annotations = meta.annotations or {}
        labels = meta.labels or {}
        unschedulable = bool(n.spec and n.spec.unschedulable)
        ready = "Unknown"
        ready_reason = ""
        for c in (n.status.conditions if n.status and n.status.conditions else []):
            if c.type == "Ready":
                ready = "Ready" if c.status == "True" else ("NotReady" if c.status == "False" else "Unknown")
                ready_reason = c.reason or ""
        ours = self._our_taint(n) is not None
        unavailable = unschedulable or ready != "Ready" or ours
        if ours:
            reason = annotations.get(REASON_ANNOTATION) or f"{REASON_PREFIX} (taint {self.taint_key})"
        elif unschedulable:
            reason = "cordoned (spec.unschedulable) by someone else"
        elif ready != "Ready":
            reason = f"{ready}: {ready_reason}".rstrip(": ")
        else:
            reason = ""
        state = ready + (",SchedulingDisabled" if unschedulable else "")  # kubectl get nodes' STATUS
        extra = {"ready": ready}
        if ours:
            extra["taint"] = self.taint_key
        part = labels.get(self.partition_label)
        return NodeStatus(name=meta.name, exists=True, unavailable=unavailable, ours=ours, reason=reason,
                          partitions=(part,) if part else (), state=state, extra=extra)

    def nodes(self) -> dict[str, NodeStatus]:
        items = self._list("list nodes", self.api.list_node)
        return {n.metadata.name: self.status_of(n) for n in items}

    def node(self, name: str) -> NodeStatus:
        n = self._read(check_node_name(name))
        return self.status_of(n) if n is not None else NodeStatus(name=name, exists=False)

    def ping(self) -> None:
        self._call("list nodes (ping)", self.api.list_node, limit=1)

    # -- acting -------------------------------------------------------------------
    def _patch_node(self, node: str, build: Callable[[k8s.V1Node], dict[str, Any]], attempts: int = 5) -> None:
        """Read, build a patch from what was read, PATCH with that resourceVersion;
        read again and rebuild on 409 Conflict. ``build`` raises to refuse."""
        for attempt in range(attempts):
            n = self._read(node)
            if n is None:
                raise ActuatorError(f"{node}: Kubernetes has no such node", transient=False)
            body = build(n)
            body.setdefault("metadata", {})["resourceVersion"] = n.metadata.resource_version
            try:
                self.api.patch_node(node, body, _request_timeout=self.request_timeout)
                return
            except ApiException as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise self._error(f"PATCH node {node}", exc) from None
            except _CONNECTION_ERRORS as exc:
                raise ActuatorError(f"PATCH node {node}: API server unreachable: {exc}", transient=True) from None

    def _taints_without_ours(self, n: k8s.V1Node) -> list[dict[str, Any]]:
        sanitize = self.api.api_client.sanitize_for_serialization
        return [sanitize(t) for t in (n.spec.taints or []) if t.key != self.taint_key] if n.spec else []

    def drain(self, node: str, reason: str) -> NodeStatus:
        check_node_name(node)
        text = sanitize_reason(reason)  # one line, bounded, prefixed: as on Slurm

        def build(n: k8s.V1Node) -> dict[str, Any]:
            st = self.status_of(n)
            if st.unavailable and not st.ours:
                raise ActuatorError(f"drain {node}: already unavailable for someone else ({st.state}: {st.reason}); "
                                    "not touching it", transient=False)
            taints = [*self._taints_without_ours(n),
                      {"key": self.taint_key, "value": TAINT_VALUE, "effect": "NoSchedule"}]
            return {"metadata": {"annotations": {REASON_ANNOTATION: text}},
                    "spec": {"unschedulable": True, "taints": taints}}

        self._patch_node(node, build)
        evicted, skipped, problems = self._evict_all(node)
        st = self.node(node)
        extra = {**st.extra, "evicted": str(evicted), "skipped": str(skipped)}
        if problems:
            transient = all(t for _, t in problems)
            detail = "; ".join(m for m, _ in problems[:10])
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise ActuatorError(f"drain {node}: cordoned and tainted, {evicted} pods evicted, "
                                f"{len(problems)} not: {detail}{more}", transient=transient)
        return dataclasses.replace(st, extra=extra)

    # -- evictions ------------------------------------------------------------------
    @staticmethod
    def _skip(pod: k8s.V1Pod) -> str:
        meta = pod.metadata
        if MIRROR_ANNOTATION in (meta.annotations or {}):
            return "mirror"
        if any(o.kind == "DaemonSet" and o.controller is not False for o in (meta.owner_references or [])):
            return "daemonset"
        if pod.status and pod.status.phase in ("Succeeded", "Failed"):
            return "finished"
        if meta.deletion_timestamp is not None:
            return "terminating"
        return ""

    def _pods(self, node: str) -> Iterable[k8s.V1Pod]:
        return self._list(f"list pods on {node}", self.api.list_pod_for_all_namespaces,
                          field_selector=f"spec.nodeName={node}")

    def _evict(self, ns: str, name: str) -> tuple[str, str]:
        """('done'|'blocked'|'failed', message): one eviction request."""
        body = k8s.V1Eviction(api_version="policy/v1", kind="Eviction",
                              metadata=k8s.V1ObjectMeta(name=name, namespace=ns))
        try:
            self.api.create_namespaced_pod_eviction(name, ns, body, _request_timeout=self.request_timeout)
            return "done", ""
        except ApiException as exc:
            if exc.status == 404:
                return "done", ""  # gone already
            if exc.status == 429:
                return "blocked", _status_message(exc)
            msg = f"{ns}/{name}: HTTP {exc.status} {_status_message(exc)}"
            if exc.status == 500 and _MULTIPLE_PDB.search(msg):
                return "failed-permanent", msg
            return ("failed" if _transient_status(exc.status) else "failed-permanent"), msg
        except _CONNECTION_ERRORS as exc:
            return "failed", f"{ns}/{name}: API server unreachable: {type(exc).__name__}"

    def _evict_all(self, node: str) -> tuple[int, int, list[tuple[str, bool]]]:
        """Evict every evictable pod; (evicted, skipped, [(problem, transient)])."""
        pending: list[tuple[str, str]] = []
        skipped = 0
        for pod in self._pods(node):
            if self._skip(pod):
                skipped += 1
            else:
                pending.append((pod.metadata.namespace, pod.metadata.name))
        deadline = self._clock() + self.eviction_deadline
        delay = self.backoff_initial
        evicted = 0
        problems: list[tuple[str, bool]] = []
        while pending:
            blocked: list[tuple[str, str, str]] = []
            for ns, name in pending:
                outcome, msg = self._evict(ns, name)
                if outcome == "done":
                    evicted += 1
                elif outcome == "blocked":
                    blocked.append((ns, name, msg))
                else:
                    problems.append((msg, outcome == "failed"))
            if not blocked:
                break
            if self._clock() + delay > deadline:
                for ns, name, msg in blocked:
                    problems.append((f"{ns}/{name}: still blocked by a PodDisruptionBudget after "
                                     f"{self.eviction_deadline:g}s ({msg})", True))
                break
            self._sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            pending = [(ns, name) for ns, name, _ in blocked]
        return evicted, skipped, problems

    def reboot(self, node: str, reason: str) -> NodeStatus:
        raise ActuatorError(
            "Kubernetes has no node reboot API; reboot rules need the exec actuator (e.g. a site script "
            "that asks the node's reboot agent or BMC) or the Slurm actuator", transient=False)

    def resume(self, node: str) -> NodeStatus:
        check_node_name(node)

        def build(n: k8s.V1Node) -> dict[str, Any]:
            if self._our_taint(n) is None:
                st = self.status_of(n)
                raise ActuatorError(f"resume {node}: not taken out of service by gpufleet (no {self.taint_key} "
                                    f"taint; {st.state}{': ' + st.reason if st.reason else ''})", transient=False)
            return {"metadata": {"annotations": {REASON_ANNOTATION: None}},
                    "spec": {"unschedulable": None, "taints": self._taints_without_ours(n) or None}}

        self._patch_node(node, build)
        return self.node(node)
