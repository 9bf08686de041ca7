"""The Kubernetes actuator, through the official client, against tests/fake_kube.py.

No API server runs here; the fake serves the real REST paths and bodies (Node GET,
list and PATCH, pod lists by field selector, policy/v1 Evictions with 429/500
answers, Status objects) and records every request, which is also how the RBAC
list is checked.
"""

from __future__ import annotations

import socket

import pytest
from kubernetes import client as k8s

from remediation.actuators.base import ActuatorError
from remediation.actuators.kubernetes import (
    MIRROR_ANNOTATION,
    RBAC_VERBS,
    REASON_ANNOTATION,
    KubernetesActuator,
)
from tests.fake_kube import FakeKube

KEY = "gpufleet.io/remediation"
POOL = "node.kubernetes.io/instance-type"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


class FakeTime:
    """sleep() advances clock(): backoff without waiting, and a record of the waits."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def kube():
    with FakeKube() as f:
        f.add_node("gpu-1", labels={POOL: "p5.48xlarge"}, taints=[GPU_TAINT])
        f.add_node("gpu-2", labels={POOL: "p5.48xlarge"})
        f.add_node("gpu-3", labels={POOL: "a3-highgpu-8g"}, unschedulable=True)  # an admin's cordon
        f.add_node("gpu-4", ready=False)
        yield f


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def make(kube: FakeKube, fake_time: FakeTime | None = None, **kw) -> KubernetesActuator:
    t = fake_time or FakeTime()
    kw.setdefault("backoff_initial", 1.0)
    return KubernetesActuator(configuration=kube.configuration(), sleep=t.sleep, clock=t.clock, **kw)


def pods_on_gpu1(kube: FakeKube) -> None:
    kube.add_pod("ml", "train-0", "gpu-1")                        # ReplicaSet/Job-like: evicted
    kube.add_pod("ml", "notebook", "gpu-1", owner_kind=None)      # bare pod: evicted
    kube.add_pod("kube-system", "dcgm-exporter-x", "gpu-1", owner_kind="DaemonSet")
    kube.add_pod("kube-system", "kube-proxy-gpu-1", "gpu-1", mirror=True)
    kube.add_pod("ml", "done", "gpu-1", phase="Succeeded")
    kube.add_pod("ml", "leaving", "gpu-1", terminating=True)
    kube.add_pod("ml", "elsewhere", "gpu-2")


# -- the live view ------------------------------------------------------------------
def test_view_counts_cordoned_notready_and_ours_as_unavailable(kube):
    kube.add_node("gpu-5", taints=[{"key": KEY, "value": "drain", "effect": "NoSchedule"}], unschedulable=True,
                  annotations={REASON_ANNOTATION: "gpufleet: xid 79"})
    view = make(kube, page_size=2).nodes()  # paged: 5 nodes, 2 per page
    assert sorted(view) == ["gpu-1", "gpu-2", "gpu-3", "gpu-4", "gpu-5"]
    assert not view["gpu-1"].unavailable and view["gpu-1"].state == "Ready"
    assert view["gpu-1"].partitions == ("p5.48xlarge",) and view["gpu-4"].partitions == ()
    assert view["gpu-3"].unavailable and not view["gpu-3"].ours and view["gpu-3"].state == "Ready,SchedulingDisabled"
    assert view["gpu-4"].unavailable and not view["gpu-4"].ours and view["gpu-4"].state == "NotReady"
    assert view["gpu-5"].unavailable and view["gpu-5"].ours and view["gpu-5"].reason == "gpufleet: xid 79"
    pages = [r for r in kube.requests if r.path == "/api/v1/nodes"]
    assert len(pages) == 3 and pages[1].query["continue"] == ["2"]


def test_custom_partition_label(kube):
    kube.add_node("gpu-6", labels={"cloud.google.com/gke-nodepool": "h100-pool"})
    st = make(kube, partition_label="cloud.google.com/gke-nodepool").node("gpu-6")
    assert st.partitions == ("h100-pool",)


def test_unknown_and_invalid_node_names(kube):
    a = make(kube)
    assert a.node("gpu-99").exists is False
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-99", "gpufleet: x")
    assert err.value.transient is False
    for bad in ("GPU-1", "gpu-1,gpu-2", "spec.nodeName=gpu-1", "", "a" * 254):
        with pytest.raises(ActuatorError) as err:
            a.drain(bad, "gpufleet: x")
        assert err.value.transient is False
    assert not [r for r in kube.requests if r.method != "GET"]


# -- drain ------------------------------------------------------------------------------
def test_drain_cordons_taints_annotates_and_evicts(kube):
    pods_on_gpu1(kube)
    st = make(kube).drain("gpu-1", "gpufleet: XidCritical xid=79\nnext line")
    assert st.ours and st.unavailable and st.state == "Ready,SchedulingDisabled"
    assert st.reason == "gpufleet: XidCritical xid=79 next line"
    assert st.extra["evicted"] == "2" and st.extra["skipped"] == "4"

    node = kube.node_obj("gpu-1")
    assert node["spec"]["unschedulable"] is True
    assert node["spec"]["taints"] == [GPU_TAINT, {"key": KEY, "value": "drain", "effect": "NoSchedule"}]
    assert node["metadata"]["annotations"][REASON_ANNOTATION] == "gpufleet: XidCritical xid=79 next line"

    assert sorted(kube.evicted) == [("ml", "notebook"), ("ml", "train-0")]
    evictions = kube.evictions()
    assert sorted(r.path for r in evictions) == ["/api/v1/namespaces/ml/pods/notebook/eviction",
                                                 "/api/v1/namespaces/ml/pods/train-0/eviction"]
    for r in evictions:  # a policy/v1 Eviction naming the pod
        assert r.body["apiVersion"] == "policy/v1" and r.body["kind"] == "Eviction"
        assert r.body["metadata"]["name"] == r.path.split("/")[-2]
        assert r.body["metadata"]["namespace"] == "ml"
    assert ("ml", "elsewhere") in kube.pods
    listing = [r for r in kube.requests if r.path == "/api/v1/pods"]
    assert listing and listing[0].query["fieldSelector"] == ["spec.nodeName=gpu-1"]
    patch = [r for r in kube.requests if r.method == "PATCH"][0]
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert patch.body["metadata"]["resourceVersion"]  # optimistic concurrency


def test_daemonset_and_mirror_pods_are_never_evicted(kube):
    pods_on_gpu1(kube)
    make(kube).drain("gpu-1", "gpufleet: x")
    asked = {r.path.split("/")[-2] for r in kube.evictions()}
    assert asked.isdisjoint({"dcgm-exporter-x", "kube-proxy-gpu-1", "done", "leaving"})
    assert ("kube-system", "dcgm-exporter-x") in kube.pods and ("kube-system", "kube-proxy-gpu-1") in kube.pods
    assert MIRROR_ANNOTATION in kube.pods[("kube-system", "kube-proxy-gpu-1")]["metadata"]["annotations"]


def test_pdb_429_is_retried_with_backoff_until_it_succeeds(kube, fake_time):
    pods_on_gpu1(kube)
    kube.script_eviction("ml", "train-0", 429, 429, 429)
    st = make(kube, fake_time, backoff_initial=1.0, backoff_max=3.0, eviction_deadline=600).drain("gpu-1", "gpufleet: x")
    assert st.extra["evicted"] == "2"
    assert [r.path for r in kube.evictions()].count("/api/v1/namespaces/ml/pods/train-0/eviction") == 4
    assert [r.path for r in kube.evictions()].count("/api/v1/namespaces/ml/pods/notebook/eviction") == 1
    assert fake_time.sleeps == [1.0, 2.0, 3.0]  # exponential, capped


def test_pdb_429_past_the_deadline_is_a_transient_error_and_the_node_stays_ours(kube, fake_time):
    pods_on_gpu1(kube)
    kube.script_eviction("ml", "train-0", *[429] * 100)
    a = make(kube, fake_time, backoff_initial=1.0, backoff_max=8.0, eviction_deadline=20)
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-1", "gpufleet: x")
    assert err.value.transient is True
    assert "ml/train-0" in str(err.value) and "PodDisruptionBudget" in str(err.value)
    assert sum(fake_time.sleeps) <= 20
    assert ("ml", "notebook") in kube.evicted and ("ml", "train-0") in kube.pods
    st = a.node("gpu-1")
    assert st.ours and st.unavailable  # cordoned and tainted: a retry is ours to make

    kube._script.clear()  # the budget allows it now: the retried drain finishes the job
    st = a.drain("gpu-1", "gpufleet: x")
    assert ("ml", "train-0") in kube.evicted and st.extra["evicted"] == "1"


def test_several_pdbs_500_is_reported_not_retried(kube, fake_time):
    pods_on_gpu1(kube)
    kube.script_eviction("ml", "train-0", 500)
    with pytest.raises(ActuatorError) as err:
        make(kube, fake_time).drain("gpu-1", "gpufleet: x")
    assert err.value.transient is False and "more than one PodDisruptionBudget" in str(err.value)
    assert [r.path for r in kube.evictions()].count("/api/v1/namespaces/ml/pods/train-0/eviction") == 1
    assert ("ml", "notebook") in kube.evicted  # the other pods still went
    assert fake_time.sleeps == []


def test_drain_refuses_a_node_cordoned_by_someone_else(kube):
    kube.add_pod("ml", "p", "gpu-3")
    a = make(kube)
    with pytest.raises(ActuatorError) as err:
        a.drain("gpu-3", "gpufleet: x")
    assert err.value.transient is False and "someone else" in str(err.value)
    assert not [r for r in kube.requests if r.method != "GET"]
    node = kube.node_obj("gpu-3")
    assert "taints" not in node["spec"] and REASON_ANNOTATION not in node["metadata"]["annotations"]


def test_drain_refuses_a_notready_node(kube):
    with pytest.raises(ActuatorError) as err:
        make(kube).drain("gpu-4", "gpufleet: x")
    assert err.value.transient is False
    assert not [r for r in kube.requests if r.method != "GET"]


def test_concurrent_change_conflict_is_retried_on_fresh_state(kube):
    seen = []

    def other_writer(fake: FakeKube, name: str) -> None:
        if not seen:
            seen.append(name)
            fake.update_node(name, lambda n: n["metadata"]["labels"].update({"team": "infra"}))

    kube.on_patch = other_writer
    st = make(kube).drain("gpu-2", "gpufleet: x")
    assert st.ours
    patches = [r for r in kube.requests if r.method == "PATCH"]
    assert len(patches) == 2  # 409, then again on what the other writer left
    assert kube.node_obj("gpu-2")["metadata"]["labels"]["team"] == "infra"


def test_an_admin_cordoning_between_read_and_patch_wins(kube):
    def admin(fake: FakeKube, name: str) -> None:
        if not fake.nodes[name]["spec"].get("unschedulable"):
            fake.update_node(name, lambda n: n["spec"].update({"unschedulable": True}))

    kube.on_patch = admin
    with pytest.raises(ActuatorError) as err:
        make(kube).drain("gpu-2", "gpufleet: x")
    assert err.value.transient is False
    assert "taints" not in kube.node_obj("gpu-2")["spec"]


# -- resume and reboot ----------------------------------------------------------------------
def test_resume_only_undoes_our_own_drain(kube):
    a = make(kube)
    for name in ("gpu-3", "gpu-2"):  # an admin's cordon; a node in service
        with pytest.raises(ActuatorError) as err:
            a.resume(name)
        assert err.value.transient is False
    assert kube.node_obj("gpu-3")["spec"]["unschedulable"] is True
    assert not [r for r in kube.requests if r.method == "PATCH"]

    a.drain("gpu-1", "gpufleet: x")
    st = a.resume("gpu-1")
    assert not st.unavailable and not st.ours and st.state == "Ready"
    node = kube.node_obj("gpu-1")
    assert node["spec"]["taints"] == [GPU_TAINT]  # someone else's taint stays
    assert "unschedulable" not in node["spec"]
    assert REASON_ANNOTATION not in node["metadata"]["annotations"]


def test_reboot_is_not_supported_on_kubernetes(kube):
    with pytest.raises(ActuatorError) as err:
        make(kube).reboot("gpu-1", "gpufleet: x")
    assert err.value.transient is False and "reboot" in str(err.value)
    assert kube.requests == []


# -- errors and RBAC ------------------------------------------------------------------------
def test_unreachable_api_server_is_transient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    cfg.retries = 0
    a = KubernetesActuator(configuration=cfg, request_timeout=2)
    for call in (a.nodes, a.ping, lambda: a.node("gpu-1"), lambda: a.drain("gpu-1", "gpufleet: x")):
        with pytest.raises(ActuatorError) as err:
            call()
        assert err.value.transient is True


def test_unauthorized_is_not_transient():
    with FakeKube(token="right") as f:
        f.add_node("gpu-1")
        cfg = f.configuration()
        cfg.api_key = {"authorization": "Bearer wrong"}
        with pytest.raises(ActuatorError) as err:
            KubernetesActuator(configuration=cfg).nodes()
        assert err.value.transient is False and "401" in str(err.value)
        assert "gpu-1" in KubernetesActuator(configuration=f.configuration()).nodes()


def test_rbac_verbs_are_exactly_what_the_actuator_uses(kube, fake_time):
    pods_on_gpu1(kube)
    kube.script_eviction("ml", "train-0", 429)
    a = make(kube, fake_time)
    a.ping()
    a.nodes()
    a.node("gpu-1")
    a.node("gpu-99")
    a.drain("gpu-1", "gpufleet: x")
    a.resume("gpu-1")
    for refused in (lambda: a.drain("gpu-3", "gpufleet: x"), lambda: a.resume("gpu-2"),
                    lambda: a.reboot("gpu-2", "gpufleet: x")):
        with pytest.raises(ActuatorError):
            refused()
    assert kube.rbac() == set(RBAC_VERBS)
    assert len(RBAC_VERBS) == len(set(RBAC_VERBS))
