"""Which pod the kubelet gave each GPU: the kubelet's pod-resources gRPC API, v1.

The kubelet serves ``PodResourcesLister`` (package ``v1``, Go module
``k8s.io/kubelet/pkg/apis/podresources/v1``) on the unix socket
``/var/lib/kubelet/pod-resources/kubelet.sock``, without TLS or authentication: whoever
can connect to the socket may ask. ``List`` answers every pod the kubelet runs with, per
container, the devices device plugins allocated: ``resource_name`` (``nvidia.com/gpu``)
and ``device_ids`` exactly as the plugin reported them. The NVIDIA device plugin reports
GPU UUIDs (``GPU-8f3c...``; its default ``--device-id-strategy=uuid``) or indexes
(``index``), and a replica of a time-sliced GPU as ``<id>::<replica>``. The API gives
the pod's namespace and name, never its UID; the jobs collector links the two through
the pod UID that a GPU process's cgroup names (exporters/jobs.py).

The message classes are built here, on first use, from a descriptor, not from protoc output: generated
``*_pb2`` modules pin the protobuf runtime they were generated for, while
``message_factory.GetMessageClass`` works the same on every protobuf the ``kubelet``
extra allows (4.25 to 7). ``_MESSAGES`` is the upstream ``api.proto`` (the v1 API as of
Kubernetes 1.31+, where ``DynamicResource.class_name`` (1) is a tombstone and
``ClaimResource`` carries driver/pool/device names), field for field; it was checked by
compiling that proto with ``grpc_tools.protoc 1.85`` (protobuf 7.36) and comparing the
FileDescriptorProto, which matched apart from ``json_name`` and ``go_package``. Unknown
fields a newer kubelet adds are skipped by the protobuf parser, as in Go.

``grpc`` and ``protobuf`` are imported only when a client is made, so the agent runs
without the ``kubelet`` extra unless ``--collector.jobs.pod-resources-socket`` is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"
# The kubelet's own client allows 16 MiB answers (podresources.DefaultMaxMsgSize): a node
# with hundreds of pods and their CPU ids outgrows gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GPU_RESOURCE_PREFIX = "nvidia.com/gpu"  # nvidia.com/gpu, and nvidia.com/gpu.shared when renamed

_SCALARS = ("string", "int64", "uint64")
# message -> [(field, number, scalar type or message, repeated)], in api.proto's order.
_MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "AllocatableResourcesRequest": [],
    "AllocatableResourcesResponse": [
        ("devices", 1, "ContainerDevices", True), ("cpu_ids", 2, "int64", True),
        ("memory", 3, "ContainerMemory", True)],
    "ListPodResourcesRequest": [],
    "ListPodResourcesResponse": [("pod_resources", 1, "PodResources", True)],
    "PodResources": [
        ("name", 1, "string", False), ("namespace", 2, "string", False),
        ("containers", 3, "ContainerResources", True)],
    "ContainerResources": [
        ("name", 1, "string", False), ("devices", 2, "ContainerDevices", True),
        ("cpu_ids", 3, "int64", True), ("memory", 4, "ContainerMemory", True),
        ("dynamic_resources", 5, "DynamicResource", True)],
    "ContainerMemory": [
        ("memory_type", 1, "string", False), ("size", 2, "uint64", False),
        ("topology", 3, "TopologyInfo", False)],
    "ContainerDevices": [
        ("resource_name", 1, "string", False), ("device_ids", 2, "string", True),
        ("topology", 3, "TopologyInfo", False)],
    "TopologyInfo": [("nodes", 1, "NUMANode", True)],
    "NUMANode": [("ID", 1, "int64", False)],
    "DynamicResource": [
        ("claim_name", 2, "string", False), ("claim_namespace", 3, "string", False),
        ("claim_resources", 4, "ClaimResource", True)],
    "ClaimResource": [
        ("cdi_devices", 1, "CDIDevice", True), ("driver_name", 2, "string", False),
        ("pool_name", 3, "string", False), ("device_name", 4, "string", False)],
    "CDIDevice": [("name", 1, "string", False)],
    "GetPodResourcesRequest": [("pod_name", 1, "string", False), ("pod_namespace", 2, "string", False)],
    "GetPodResourcesResponse": [("pod_resources", 1, "PodResources", False)],
}
_METHODS = (
    ("List", "ListPodResourcesRequest", "ListPodResourcesResponse"),
    ("GetAllocatableResources", "AllocatableResourcesRequest", "AllocatableResourcesResponse"),
    ("Get", "GetPodResourcesRequest", "GetPodResourcesResponse"),
)


class PodResourcesError(Exception):
    """The kubelet could not be asked; ``code`` is the gRPC status name (UNAVAILABLE...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def file_descriptor() -> Any:
    """``api.proto`` of the kubelet's pod-resources v1 API as a FileDescriptorProto."""
    from google.protobuf import descriptor_pb2

    f = descriptor_pb2.FieldDescriptorProto
    scalar = {"string": f.TYPE_STRING, "int64": f.TYPE_INT64, "uint64": f.TYPE_UINT64}
    fd = descriptor_pb2.FileDescriptorProto(name="k8s.io/kubelet/pkg/apis/podresources/v1/api.proto",
                                            package="v1", syntax="proto3")
    for name, fields in _MESSAGES.items():
        m = fd.message_type.add(name=name)
        for fname, number, ftype, repeated in fields:
            field = m.field.add(name=fname, number=number, label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL,
                                type=scalar.get(ftype, f.TYPE_MESSAGE))
            if ftype not in _SCALARS:
                field.type_name = f".v1.{ftype}"
    svc = fd.service.add(name="PodResourcesLister")
    for name, req, resp in _METHODS:
        svc.method.add(name=name, input_type=f".v1.{req}", output_type=f".v1.{resp}")
    return fd


_CLASSES: dict[str, Any] = {}


def messages() -> dict[str, Any]:
    """Message name -> class, built on first use (protobuf is the ``kubelet`` extra's)."""
    if not _CLASSES:
        try:
            from google.protobuf import descriptor_pool, message_factory
        except ImportError:
            raise PodResourcesError("the protobuf package is missing: install gpufleet[kubelet] to read the "
                                    "kubelet's pod-resources API", "MISSING_PROTOBUF") from None
        pool = descriptor_pool.DescriptorPool()  # our own pool: no clash with another "v1" package
        fd = pool.Add(file_descriptor())
        _CLASSES.update({name: message_factory.GetMessageClass(fd.message_types_by_name[name])
                         for name in _MESSAGES})
    return _CLASSES


def __getattr__(name: str) -> Any:
    """``podresources.ListPodResourcesResponse`` and the other message classes, lazily."""
    if name in _MESSAGES:
        return messages()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- what the jobs collector uses ------------------------------------------------------------
@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str


_REPLICA = re.compile(r"::\d+$")
_INDEX = re.compile(r"\d{1,4}")


def gpu_key(resource: str, device_id: str) -> str | None:
    """The GPU a device id names: ``uuid:<lowercase uuid>``, ``index:<n>``, or None.

    UUIDs are matched for any resource (they are unique); a bare index only for the
    NVIDIA GPU resources, since other device plugins number their devices too. MIG
    devices (``MIG-...`` ids, ``nvidia.com/mig-*`` resources) name no full GPU: None.
    """
    dev = _REPLICA.sub("", device_id.strip())
    if dev[:4].upper() == "GPU-" and len(dev) > 4:
        return "uuid:" + dev.lower()
    if resource.startswith(GPU_RESOURCE_PREFIX) and _INDEX.fullmatch(dev):
        return f"index:{int(dev)}"
    return None


def gpu_pods(resp: Any) -> dict[str, set[PodRef]]:
    """GPU key (see ``gpu_key``) -> the pods whose containers were allocated it."""
    out: dict[str, set[PodRef]] = {}
    for pod in resp.pod_resources:
        ref = PodRef(pod.namespace, pod.name)
        for container in pod.containers:
            for dev in container.devices:
                for device_id in dev.device_ids:
                    key = gpu_key(dev.resource_name, device_id)
                    if key is not None:
                        out.setdefault(key, set()).add(ref)
    return out


class PodResourcesClient:
    """``List`` over the kubelet's socket. The channel is kept and reconnects by itself
    when the kubelet restarts (it recreates the socket)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 2.0):
        try:
            import grpc
        except ImportError:
            raise PodResourcesError("the grpcio package is missing: install gpufleet[kubelet] to read the "
                                    "kubelet's pod-resources API", "MISSING_GRPC") from None
        self._grpc = grpc
        msg = messages()
        self._request = msg["ListPodResourcesRequest"]
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix://{socket_path}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     # A restarted kubelet is back within seconds: retry the socket at least
                     # once per collection interval, not after gRPC's default minutes of backoff.
                     ("grpc.initial_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 5000)])
        self._list = self._channel.unary_unary(
            LIST_METHOD,
            request_serializer=self._request.SerializeToString,
            response_deserializer=msg["ListPodResourcesResponse"].FromString)

    def list(self) -> Any:
        """The kubelet's ListPodResourcesResponse; PodResourcesError when it cannot answer."""
        try:
            return self._list(self._request(), timeout=self.timeout)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise PodResourcesError(f"List on {self.socket_path}: {name}: {detail}", name) from None

    def close(self) -> None:
        self._channel.close()
