"""Every dashboard panel against a real Prometheus fed by the real agents, Slurm and remediation.

The stack: two simulator-backed node agents (``gpu-node-1``, ``gpu-node-2``), each with
its own fault state file, its own copy of an InfiniBand sysfs tree and its own procfs
tree (mountinfo of real directories, NFS mountstats, Lustre stats, diskstats), the jobs
and progress collectors reading the Slurm prolog's directories of that node; the Slurm
exporter against the session's real Slurm; the remediation service acting on that Slurm.
A real Prometheus scrapes them every second with target labels ``cluster`` and ``node``
(coord: compose does the same) and evaluates copies of alerts/rules/*.yml every second
(group intervals dropped, every ``for:`` cut to 0s: this test pins which panels see
data, the rules' timing is pinned by promtool's unit tests).

Baseline: a healthy fleet running one two-node training job (reporting progress). After
warm-up every panel of every dashboard must return data: at least one target yields a
sample that is not NaN (instant queries for instant targets, the last 30 s for range
targets), with the dashboards' variables set to this stack's values. The panels in
FAULTED are empty on a healthy fleet by design; they must be empty at baseline and
return data once their fault is injected: Xid, uncorrectable ECC with a pending remap,
a lost GPU, an IB port down, a stuck (FUSE) mount, an idle allocated GPU, NFS traffic,
a human drain and a drain by the remediation service.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from exporters.agent import Exporter, build_parser
from exporters.progress import ProgressReporter
from exporters.slurm import SlurmExporter, parse_args
from tests.conftest import REPO, SimState, need_binary, wait_for
from tests.fusefs import FuseFS, fuse_available
from tests.promstack import Prometheus
from tests.remediation_proc import ServiceProcess, alert, payload, policy_file
from tests.slurm_fixture import reset
from tests.test_dashboards import DASHBOARDS, GRAFANA_VARS, VAR_RE, data_links, variables, visual
from tests.test_storage import mountinfo_line

pytestmark = pytest.mark.integration

CLUSTER = "demo"
NODES = ("gpu-node-1", "gpu-node-2")
RDMA_SYSFS = REPO / "tests" / "fixtures" / "rdma" / "sys"
STORAGE = REPO / "tests" / "fixtures" / "storage"
WINDOW = 30  # seconds of range data looked at for range targets

# (dashboard file, panel title) -> the fault that makes the panel non-empty.
FAULTED: dict[tuple[str, str], str] = {
    ("fleet-overview.json", "Xid errors in the range"): "xid",
    ("fleet-overview.json", "GPUs not answering NVML"): "lost GPU",
    ("fleet-overview.json", "ECC errors and row remapping"): "ECC",
    ("fleet-overview.json", "InfiniBand/RoCE ports not active"): "IB port down",
    ("fleet-overview.json", "Stuck filesystems"): "stuck mount",
    ("fleet-overview.json", "Idle allocated GPUs and their jobs"): "idle allocated GPU",
    ("node.json", "Xid history"): "xid",
    ("node.json", "Drain reason"): "drain",
    ("fabric.json", "Link flaps in the range"): "IB port down",
    ("storage.json", "Stuck or failing mounts"): "stuck mount",
    ("storage.json", "NFS round-trip time per operation"): "NFS traffic",
    ("remediation.json", "Alert received to drain done"): "remediation drain",
    ("remediation.json", "Drained nodes, reasons and owners"): "drain",
    ("usage.json", "Top idle jobs now"): "idle allocated GPU",
}


# ---- the stack ------------------------------------------------------------------------------

def rules_for_test(dest: Path) -> list[Path]:
    """Copies of alerts/rules/*.yml: every group at the global interval, every `for:` 0s."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted((REPO / "alerts" / "rules").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group.pop("interval", None)
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "0s"
        (dest / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(dest / path.name)
    return out


def node_trees(root: Path) -> SimpleNamespace:
    """A node's own sysfs (IB ports, NVMe, Lustre) and procfs (mounts, NFS, disks) trees."""
    sysfs, procfs, mnt = root / "sys", root / "proc", root / "mnt"
    shutil.copytree(RDMA_SYSFS, sysfs)
    shutil.copytree(STORAGE / "sys", sysfs, dirs_exist_ok=True)
    shutil.copytree(STORAGE / "proc", procfs)
    for name in ("scratch", "home"):
        (mnt / name).mkdir(parents=True)
    (procfs / "1" / "mountinfo").write_text(
        mountinfo_line(900, "259:9", mnt / "scratch", "ext4", "/dev/nvme9n1")
        + mountinfo_line(901, "0:90", mnt / "home", "nfs4", "nas1:/home"))
    # The NFS capture's /home mount, moved to this node's directory.
    stats = (procfs / "1" / "mountstats").read_text()
    (procfs / "1" / "mountstats").write_text(stats.replace(" mounted on /home ", f" mounted on {mnt / 'home'} "))
    return SimpleNamespace(sysfs=sysfs, procfs=procfs, mnt=mnt)


def start_agent(node: str, seed: int, trees: SimpleNamespace, state: SimState, slurm) -> Exporter:
    args = build_parser().parse_args([
        "--gpu.backend=sim", f"--sim.state-file={state.path}", f"--sim.seed={seed}", "--gpu.expected-count=8",
        "--web.listen-address=127.0.0.1:0", "--collector.interval=0.5s",
        f"--path.sysfs={trees.sysfs}", f"--path.procfs={trees.procfs}",
        f"--collector.storage.mountpoint-include=^{re.escape(str(trees.mnt))}/.*",
        "--collector.storage.statfs-timeout=0.2s",
        f"--collector.jobs.mapping-dir={slurm.node_dir(node) / 'jobs'}",
        f"--collector.progress.dir={slurm.node_dir(node) / 'progress'}"])
    agent = Exporter(args)
    agent.start()
    return agent


def address(server) -> str:
    host, port = server.server_address[:2]
    return f"{host}:{port}"


class Trainer(threading.Thread):
    """A training loop's progress reports: one rank per node, a step every 0.2 s."""

    def __init__(self, job_id: int, spools: list[Path]):
        super().__init__(name="trainer", daemon=True)
        self.reporters = [ProgressReporter(job_id=job_id, rank=r, spool_dir=s, min_interval=0.5)
                          for r, s in enumerate(spools)]
        self.halt = threading.Event()

    def run(self) -> None:
        step = 0
        while not self.halt.wait(0.2):
            step += 1
            for r in self.reporters:
                r.report(step=step, loss=2.0 / (1 + step / 100), samples_per_second=512.0,
                         tokens_per_second=1.05e6)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)
        for r in self.reporters:
            r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, slurm_cluster):
    prometheus_bin = need_binary("prometheus")
    slurm = slurm_cluster
    reset(slurm)
    tmp = tmp_path_factory.mktemp("dash-live")
    started: list[Any] = []
    try:
        states = {n: SimState(tmp / f"{n}.yaml") for n in NODES}
        trees = {n: node_trees(tmp / n) for n in NODES}
        agents = {}
        for i, n in enumerate(NODES):
            agents[n] = start_agent(n, i + 1, trees[n], states[n], slurm)
            started.append(agents[n])
        slurm_exp = SlurmExporter(parse_args(["--web.listen-address=127.0.0.1:0", "--slurm.poll-interval=0.3s",
                                              "--slurm.allow-fast-poll", f"--slurm.conf={slurm.conf_path}"]))
        slurm_exp.start()
        started.append(slurm_exp)
        svc = ServiceProcess(tmp / "remediation", policy=policy_file(tmp / "policy.yml"), slurm_conf=slurm.conf_path)
        svc.start()
        started.append(svc)

        job = slurm.submit("sleep 300", gres="gpu:2", nodes=2, name="llm-pretrain",
                           extra=["-w", ",".join(NODES)])
        slurm.wait_job_state(job, "RUNNING", timeout=30)
        spools = [slurm.node_dir(n) / "progress" for n in NODES]
        wait_for(lambda: all((s / str(job)).is_dir() for s in spools), timeout=30, interval=0.1)  # prolog done
        trainer = Trainer(job, spools)
        trainer.start()
        started.append(trainer)

        labels = {"cluster": CLUSTER}
        prom = Prometheus(tmp / "prom", binary=prometheus_bin, rule_files=rules_for_test(tmp / "rules"),
                          scrape_configs=[
                              {"job_name": "gpufleet-exporter", "static_configs": [
                                  {"targets": [address(agents[n].server)], "labels": {**labels, "node": n}}
                                  for n in NODES]},
                              {"job_name": "gpufleet-slurm-exporter",
                               "static_configs": [{"targets": [address(slurm_exp.server)], "labels": labels}]},
                              {"job_name": "gpufleet-remediation",
                               "static_configs": [{"targets": [svc.url.removeprefix("http://")],
                                                   "labels": labels}]}])
        prom.start()
        started.append(prom)
        yield SimpleNamespace(prom=prom, slurm=slurm, job=job, states=states, trees=trees, svc=svc, tmp=tmp)
    finally:
        for thing in reversed(started):
            thing.stop()
        reset(slurm)


# ---- asking the panels ----------------------------------------------------------------------

def values_for(name: str, stack) -> dict[str, str]:
    """This stack's values for a dashboard's variables (multi-value variables: All)."""
    out = {}
    for var, spec in variables(DASHBOARDS[name]).items():
        concrete = {"cluster": CLUSTER, "node": NODES[0], "job": str(stack.job)}.get(var)
        out[var] = concrete if concrete and not spec.get("multi") else ".*"
    return out


def run_target(stack, name: str, target: dict[str, Any]) -> list[dict[str, Any]]:
    vals = values_for(name, stack)
    expr = VAR_RE.sub(lambda m: {**vals, **{**GRAFANA_VARS, "__rate_interval": "5s", "__range": "2m",
                                              "__range_s": "120"}}[m[1] or m[2]], target["expr"])
    if target["instant"]:
        return stack.prom.api("query", query=expr)["result"]
    now = time.time()
    return stack.prom.api("query_range", query=expr, start=now - WINDOW, end=now, step=1)["result"]


def samples(result: list[dict[str, Any]]) -> list[float]:
    out = []
    for series in result:
        pairs = series["values"] if "values" in series else [series["value"]]
        out += [float(v) for _, v in pairs]
    return out


def panel_data(stack, name: str, panel: dict[str, Any]) -> list[dict[str, Any]]:
    """The series of the panel's targets that carry at least one non-NaN sample."""
    out = []
    for t in panel["targets"]:
        out += [s for s in run_target(stack, name, t) if any(not math.isnan(v) for v in samples([s]))]
    return out


def all_panels() -> list[tuple[str, dict[str, Any]]]:
    return [(name, p) for name, dash in sorted(DASHBOARDS.items()) for p in visual(dash)]


def check_linked_columns(name: str, panel: dict[str, Any], data: list[dict[str, Any]]) -> None:
    """A data link needs its column in the result: some returned series carries that label."""
    for title, field, _ in data_links(DASHBOARDS[name]):
        if title == panel["title"]:
            optional = field == "job_id" and any("ALERTS" in t["expr"] for t in panel["targets"])  # few alerts name a job
            assert any(field in s["metric"] for s in data) or optional, \
                f"{name}: {title}: link on {field!r} but no series has that label: {data[:2]}"


def warm(stack) -> None:
    prom = stack.prom

    def ready():
        return (len(prom.query('up{cluster="demo"} == 1')) == 4
                and len(prom.query("gpufleet_exporter_xid_source_up == 1")) == 2
                and prom.query(f'job_id:gpus_used:sum{{job_id="{stack.job}"}}')
                and len(prom.query(f'count by (node) (gpu_job_info{{job_id="{stack.job}"}})')) == 2
                and prom.query(f'count_over_time(training_step{{job_id="{stack.job}"}}[10s]) >= 5')
                and prom.query('count_over_time(node:gpus_healthy:count[10s]) >= 5'))

    wait_for(ready, timeout=45, interval=0.5)


# ---- faults ---------------------------------------------------------------------------------

def inject_faults(stack) -> list[str]:
    """Every fault of FAULTED; returns those that could not be injected here (with why)."""
    missing = []
    n1, n2 = NODES
    s1, s2 = stack.states[n1], stack.states[n2]
    s1.gpu(3, xid={"79": 1})
    s1.gpu(2, ecc_uncorrected=2, remap_pending=True)
    s2.gpu(6, lost=True)
    held = stack.prom.query(f'gpu_job_info{{node="{n1}", job_id="{stack.job}"}}')
    s1.gpu(int(held[0]["metric"]["gpu"]), utilization=0.0)
    port = stack.trees[n2].sysfs / "class/infiniband/mlx5_8/ports/1"
    (port / "state").write_text("1: DOWN\n")
    (port / "phys_state").write_text("3: Disabled\n")
    # NFS traffic: every per-operation counter of the /home mount grows.
    stats = stack.trees[n1].procfs / "1" / "mountstats"
    stats.write_text(re.sub(r"(?m)^(\s+[A-Z_]+:)((?: \d+)+)$",
                            lambda m: m[1] + "".join(f" {int(x) * 3 + 7}" for x in m[2].split()), stats.read_text()))
    # Stuck mount: a FUSE filesystem whose statfs never answers, listed in the node's mountinfo.
    why = fuse_available()
    if why is None:
        mnt = stack.trees[n1].mnt / "hung"
        mnt.mkdir()
        fs = FuseFS(mnt)
        try:
            fs.mount()
        except OSError as exc:
            missing.append(f"stuck mount: {exc}")
        else:
            stack.fuse = fs
            fs.block_statfs()
            info = stack.trees[n1].procfs / "1" / "mountinfo"
            info.write_text(info.read_text() + fs.mountinfo_line())
    else:
        missing.append(f"stuck mount: FUSE unavailable ({why})")
    # A human drain, and a drain by the remediation service through its webhook.
    stack.slurm.drain("gpu-node-3", "disk replaced, burn-in pending")
    r = stack.svc.post(payload(alert(n1, "GpuRowRemapFailed", gpu="2")))
    assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "acted", r.text
    return missing


# ---- the test -------------------------------------------------------------------------------

def test_every_panel_returns_data_and_faulted_panels_after_their_fault(stack):
    assert set(FAULTED) <= {(n, p["title"]) for n, p in all_panels()}, "FAULTED names a panel that does not exist"
    warm(stack)
    empty, early = [], []
    for name, panel in all_panels():
        data = panel_data(stack, name, panel)
        key = (name, panel["title"])
        if key in FAULTED:
            if data:
                early.append((key, FAULTED[key], data[:2]))
        elif not data:
            empty.append(key)
        else:
            check_linked_columns(name, panel, data)
    assert not empty, f"panels without data on a healthy fleet: {empty}"
    assert not early, f"panels with data on a healthy fleet, before their fault: {early}"

    stack.fuse = None
    try:
        missing = inject_faults(stack)
        skipped = {f.split(":")[0] for f in missing}
        pending = {k: v for k, v in FAULTED.items() if v not in skipped}
        panels = dict(((n, p["title"]), (n, p)) for n, p in all_panels())

        def all_have_data():
            for key in list(pending):
                name, panel = panels[key]
                data = panel_data(stack, name, panel)
                if data:
                    check_linked_columns(name, panel, data)
                    del pending[key]
            return not pending

        try:
            wait_for(all_have_data, timeout=40, interval=1.0)
        except AssertionError:
            raise AssertionError(f"panels still empty after their fault: {json.dumps(list(pending.items()))}") from None
        assert not missing, f"faults not injected here: {missing}"  # on this machine every fault must run
    finally:
        if stack.fuse is not None:
            stack.fuse.unmount()
