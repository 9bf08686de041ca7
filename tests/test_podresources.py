"""GPU -> pod attribution through the kubelet's pod-resources API (v1 ``List``).

``FakeKubelet`` is a real gRPC server on a unix socket that serves
``v1.PodResourcesLister/List`` the way the kubelet's server_v1.go does: every pod it
runs, its containers in spec order, each with the devices the device manager allocated
per resource (``nvidia.com/gpu`` with the ids the NVIDIA device plugin reports: GPU UUIDs
by default, indexes under ``--device-id-strategy=index``, ``<id>::<n>`` for time-sliced
replicas, MIG UUIDs for MIG resources) and NUMA topology, behind the kubelet's token
bucket (``ResourceExhausted: rejected by rate limit``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from exporters import agent, jobs, podresources
from exporters.gpu_sim import SimulatedNVML, uuid_for
from exporters.jobs import JobsCollector
from exporters.podresources import PodRef, PodResourcesClient, PodResourcesError, gpu_key, gpu_pods
from tests.conftest import scrape_collector, value, wait_for

PROC = Path(__file__).resolve().parent / "fixtures" / "jobs" / "proc"
# The pod UIDs the fixture procfs' cgroups name (tests/fixtures/jobs/README.md).
POD = "8dbc5577-d0e2-4706-8787-57d52c03ddf2"    # pid 3001, uid 61003
POD2 = "3f1c9a7e-51b2-4c7d-9e0f-1a2b3c4d5e6f"   # pid 3002, root
GPU = "nvidia.com/gpu"


def U(i: int) -> str:  # noqa: N802 - the sim's GPU UUID of index i, as the device plugin reports it
    return uuid_for(0, i)


@dataclass
class Container:
    name: str
    devices: dict[str, list[str]] = field(default_factory=dict)  # resource -> device ids
    cpu_ids: list[int] = field(default_factory=list)


@dataclass
class Pod:
    namespace: str
    name: str
    containers: list[Container]


class FakeKubelet:
    """The kubelet's pod-resources endpoint. ``burst``/``qps``: its rate limiter
    (kubelet defaults 10 and 100); ``qps=0`` makes the bucket never refill."""

    def __init__(self, socket_path: str, pods: list[Pod] | None = None, burst: int = 10, qps: float = 100.0):
        self.socket_path = socket_path
        self.pods = list(pods or [])
        self.burst, self.qps = burst, qps
        self.tokens = float(burst)
        self.calls = 0
        self._server: grpc.Server | None = None

    def _allow(self) -> bool:
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def _list(self, request, context):
        self.calls += 1
        if not self._allow():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected by rate limit")
        resp = podresources.ListPodResourcesResponse()
        for pod in self.pods:
            pr = resp.pod_resources.add(name=pod.name, namespace=pod.namespace)
            for c in pod.containers:
                cr = pr.containers.add(name=c.name)
                cr.cpu_ids.extend(c.cpu_ids)
                for resource, ids in c.devices.items():
                    dev = cr.devices.add(resource_name=resource)
                    dev.device_ids.extend(ids)
                    dev.topology.nodes.add(ID=0)
        return resp

    def start(self) -> FakeKubelet:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(podresources.SERVICE, {
            "List": grpc.unary_unary_rpc_method_handler(
                self._list, request_deserializer=podresources.ListPodResourcesRequest.FromString,
                response_serializer=podresources.ListPodResourcesResponse.SerializeToString),
        })
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    d = Path(tempfile.mkdtemp(prefix="kubelet-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def kubelet(sock_dir) -> Iterator[FakeKubelet]:
    k = FakeKubelet(str(sock_dir / "kubelet.sock")).start()
    yield k
    k.stop()


@pytest.fixture
def make(sim_state, tmp_path, kubelet):
    made: list[JobsCollector] = []

    def _make(socket: str | None = None) -> JobsCollector:
        sim = SimulatedNVML(gpus=8, seed=0, state_file=str(sim_state.path), state_poll_interval=0)
        client = PodResourcesClient(socket or kubelet.socket_path)
        c = JobsCollector(sim, procfs=str(PROC), mapping_dir=str(tmp_path / "map"), pod_resources=client)
        made.append(c)
        return c

    yield _make
    for c in made:
        c.close()


def info(m: dict) -> set[tuple[str, str, str, str, str, str]]:
    """gpu_job_info as {(gpu, job_id, user, source, namespace, pod)}."""
    out = set()
    for lab, v in m.get("gpu_job_info", []):
        assert v == 1 and lab["uuid"] == U(int(lab["gpu"]))
        out.add((lab["gpu"], lab["job_id"], lab["user"], lab["source"], lab["namespace"], lab["pod"]))
    return out


def trainer(namespace: str, name: str, *ids: str, resource: str = GPU) -> Pod:
    return Pod(namespace, name, [Container("trainer", {resource: list(ids)}, [2, 3]), Container("log-shipper")])


# -- the API's shape ------------------------------------------------------------------------
def test_messages_have_the_kubelets_field_numbers_on_the_wire():
    # Hand-encoded protobuf (tag = field << 3 | wire type 2) of what the kubelet sends.
    dev = b"\x0a\x0envidia.com/gpu" + b"\x12\x05GPU-1"                # ContainerDevices: 1 name, 2 ids
    container = b"\x0a\x01c" + b"\x12" + bytes([len(dev)]) + dev     # ContainerResources: 1 name, 2 devices
    pod = b"\x0a\x01p" + b"\x12\x02ns" + b"\x1a" + bytes([len(container)]) + container
    wire = b"\x0a" + bytes([len(pod)]) + pod                         # ListPodResourcesResponse: 1 pod_resources
    resp = podresources.ListPodResourcesResponse.FromString(wire)
    assert resp.SerializeToString() == wire
    assert gpu_pods(resp) == {"uuid:gpu-1": {PodRef("ns", "p")}}
    # A field a newer kubelet adds (here 9 in ContainerResources) is skipped, as in Go.
    newer = podresources.ContainerResources.FromString(container + b"\x4a\x03new")
    assert newer.name == "c" and list(newer.devices[0].device_ids) == ["GPU-1"]
    assert podresources.LIST_METHOD == "/v1.PodResourcesLister/List"


@pytest.mark.parametrize("resource, device_id, key", [
    (GPU, "GPU-8F3C0000-1111-2222-3333-444455556666", "uuid:gpu-8f3c0000-1111-2222-3333-444455556666"),
    (GPU, "GPU-8f3c0000-1111-2222-3333-444455556666::3", "uuid:gpu-8f3c0000-1111-2222-3333-444455556666"),
    ("nvidia.com/gpu.shared", "GPU-abc::0", "uuid:gpu-abc"),
    (GPU, "3", "index:3"),                  # --device-id-strategy=index
    (GPU, "3::1", "index:3"),
    ("rdma/hca_shared_devices_a", "3", None),  # another plugin's numbering is no GPU index
    ("nvidia.com/mig-1g.10gb", "MIG-4a5b0000-1111-2222-3333-444455556666", None),
    (GPU, "", None),
])
def test_device_ids_name_gpus_by_uuid_or_index(resource, device_id, key):
    assert gpu_key(resource, device_id) == key


# -- the client over a real socket -----------------------------------------------------------
def test_client_lists_the_pods_over_the_unix_socket(kubelet):
    kubelet.pods = [trainer("ml", "train-0", U(0), U(1)), Pod("web", "nginx", [Container("nginx")])]
    client = PodResourcesClient(kubelet.socket_path)
    try:
        resp = client.list()
    finally:
        client.close()
    assert [(p.namespace, p.name) for p in resp.pod_resources] == [("ml", "train-0"), ("web", "nginx")]
    first = resp.pod_resources[0].containers
    assert [c.name for c in first] == ["trainer", "log-shipper"]
    assert list(first[0].devices[0].device_ids) == [U(0), U(1)] and list(first[0].cpu_ids) == [2, 3]
    assert gpu_pods(resp) == {f"uuid:{U(0).lower()}": {PodRef("ml", "train-0")},
                              f"uuid:{U(1).lower()}": {PodRef("ml", "train-0")}}


def test_client_reports_a_missing_kubelet_as_unavailable(sock_dir):
    client = PodResourcesClient(str(sock_dir / "absent.sock"), timeout=1.0)
    try:
        with pytest.raises(PodResourcesError) as err:
            client.list()
    finally:
        client.close()
    assert err.value.code == "UNAVAILABLE" and "absent.sock" in str(err.value)


# -- the jobs collector -----------------------------------------------------------------------
def test_pods_behind_cgroup_uids_are_named_and_idle_allocations_attributed(make, kubelet, sim_state):
    kubelet.pods = [trainer("ml", "train-0", U(0), U(1)), trainer("ml", "notebook", U(5)),
                    Pod("web", "nginx", [Container("nginx")])]
    sim_state.gpu(0, processes=[{"pid": 3001, "used_memory_bytes": 100}])
    sim_state.gpu(1, processes=[{"pid": 3001, "used_memory_bytes": 50}])
    m = scrape_collector(make())
    assert info(m) == {
        ("0", f"pod:{POD}", "61003", "kubernetes", "ml", "train-0"),
        ("1", f"pod:{POD}", "61003", "kubernetes", "ml", "train-0"),
        # allocated by the kubelet, nothing running, UID never seen: named by namespace/name
        ("5", "pod:ml/notebook", "", "pod-resources", "ml", "notebook"),
    }
    assert value(m, "gpu_process_memory_used_bytes", gpu="5", job_id="pod:ml/notebook") == 0
    assert value(m, "gpu_process_memory_used_bytes", gpu="0", job_id=f"pod:{POD}") == 100


def test_idle_gpus_of_a_pod_that_runs_elsewhere_carry_its_uid(make, kubelet, sim_state):
    kubelet.pods = [trainer("ml", "train-0", *(U(i) for i in range(4)))]
    sim_state.gpu(0, processes=[{"pid": 3001, "used_memory_bytes": 1}])
    c = make()
    m = scrape_collector(c)
    assert info(m) == {("0", f"pod:{POD}", "61003", "kubernetes", "ml", "train-0")} | {
        (str(i), f"pod:{POD}", "61003", "pod-resources", "ml", "train-0") for i in (1, 2, 3)}
    # The process ends; the pod still holds the GPUs: the UID link is kept.
    sim_state.gpu(0, processes=[])
    m = scrape_collector(c)
    assert info(m) == {(str(i), f"pod:{POD}", "", "pod-resources", "ml", "train-0") for i in range(4)}
    # The pod is gone: its link too.
    kubelet.pods = []
    assert "gpu_job_info" not in scrape_collector(c)


def test_index_device_ids_and_time_sliced_replicas(make, kubelet, sim_state):
    # GPU 6 time-sliced between two pods (replica ids); pod b also holds GPU 7 by index.
    kubelet.pods = [trainer("ml", "a", f"{U(6)}::0"), trainer("ml", "b", f"{U(6)}::1", "7")]
    sim_state.gpu(6, processes=[{"pid": 3001, "used_memory_bytes": 1}, {"pid": 3002, "used_memory_bytes": 2}])
    sim_state.gpu(7, processes=[{"pid": 3002, "used_memory_bytes": 3}])
    m = scrape_collector(make())
    # POD2 runs on 6 and 7: only b holds both. POD runs on 6 only, shared by a and b:
    # with b taken by POD2, it is a.
    assert info(m) == {
        ("6", f"pod:{POD}", "61003", "kubernetes", "ml", "a"),
        ("6", f"pod:{POD2}", "root", "kubernetes", "ml", "b"),
        ("7", f"pod:{POD2}", "root", "kubernetes", "ml", "b"),
    }


def test_an_ambiguous_pod_is_left_unnamed(make, kubelet, sim_state):
    kubelet.pods = [trainer("ml", "a", f"{U(6)}::0"), trainer("ml", "b", f"{U(6)}::1")]
    sim_state.gpu(6, processes=[{"pid": 3001, "used_memory_bytes": 1}])
    m = scrape_collector(make())
    assert ("6", f"pod:{POD}", "61003", "kubernetes", "", "") in info(m)
    # both pods still show as holding the GPU (neither could be matched to the UID)
    assert {(j, s) for _, j, _, s, _, _ in info(m)} == {
        (f"pod:{POD}", "kubernetes"), ("pod:ml/a", "pod-resources"), ("pod:ml/b", "pod-resources")}


def test_mig_and_other_devices_attribute_no_gpu(make, kubelet):
    kubelet.pods = [trainer("ml", "mig", "MIG-4a5b0000-1111-2222-3333-444455556666", resource="nvidia.com/mig-1g.10gb"),
                    trainer("net", "rdma", "0", resource="rdma/hca_shared_devices_a")]
    assert "gpu_job_info" not in scrape_collector(make())


def test_kubelet_down_keeps_cgroup_attribution_and_recovers(make, sim_state, sock_dir, caplog):
    sock = str(sock_dir / "later.sock")
    sim_state.gpu(0, processes=[{"pid": 3001, "used_memory_bytes": 1}])
    c = make(sock)
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.jobs"):
        m1 = scrape_collector(c)
        m2 = scrape_collector(c)
    assert info(m1) == info(m2) == {("0", f"pod:{POD}", "61003", "kubernetes", "", "")}
    assert value(m2, "gpufleet_exporter_jobs_read_errors_total", file="pod-resources", error="UNAVAILABLE") == 2
    assert sum("pod resources" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert "pod-resources: UNAVAILABLE" in c.status()
    late = FakeKubelet(sock, [trainer("ml", "train-0", U(0))]).start()
    try:
        m = wait_for(lambda: (s := scrape_collector(c)) and ("0", f"pod:{POD}", "61003", "kubernetes", "ml",
                                                              "train-0") in info(s) and s)
    finally:
        late.stop()
    assert "1 pods, 1 GPUs allocated" in c.status()
    assert len(info(m)) == 1


def test_rate_limited_list_keeps_the_names_already_linked(make, kubelet, sim_state):
    kubelet.pods = [trainer("ml", "train-0", U(0), U(1))]
    kubelet.tokens, kubelet.qps = 1, 0  # one answer, then the bucket is empty
    sim_state.gpu(0, processes=[{"pid": 3001, "used_memory_bytes": 1}])
    c = make()
    first = info(scrape_collector(c))
    assert ("1", f"pod:{POD}", "61003", "pod-resources", "ml", "train-0") in first
    m = scrape_collector(c)
    assert value(m, "gpufleet_exporter_jobs_read_errors_total", file="pod-resources",
                 error="RESOURCE_EXHAUSTED") == 1
    # The running pod keeps its name; the idle allocation is not claimed without an answer.
    assert info(m) == {("0", f"pod:{POD}", "61003", "kubernetes", "ml", "train-0")}


# -- flags ---------------------------------------------------------------------------------
def test_agent_flags_build_the_collector_with_the_kubelet_socket(kubelet, sim_state):
    assert agent.build_parser().parse_args([]).jobs_pod_resources_socket == ""  # off by default
    kubelet.pods = [trainer("ml", "train-0", U(0))]
    sim_state.gpu(0, processes=[{"pid": 3001, "used_memory_bytes": 1}])
    args = agent.build_parser().parse_args([
        "--gpu.backend=sim", f"--sim.state-file={sim_state.path}", f"--path.procfs={PROC}",
        f"--collector.jobs.pod-resources-socket={kubelet.socket_path}", "--no-collector.jobs.read-environ"])
    c = jobs.create(args)
    try:
        assert isinstance(c.pod_resources, PodResourcesClient)
        assert info(scrape_collector(c)) == {("0", f"pod:{POD}", "61003", "kubernetes", "ml", "train-0")}
    finally:
        c.close()


def test_socket_flag_without_grpc_is_a_clear_start_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    args = argparse.Namespace(jobs_pod_resources_socket="/tmp/none.sock", procfs="/proc")
    with pytest.raises(ValueError, match=r"grpcio .*gpufleet\[kubelet\]"):
        jobs.create(args)
