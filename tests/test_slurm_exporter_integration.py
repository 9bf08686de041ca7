"""gpufleet-slurm-exporter against a real Slurm (munged, slurmctld, four slurmds on loopback).

The expected values come from Slurm's own commands (sinfo, squeue, scontrol), read
with their formatted output, not through the exporter's parsers.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from exporters.localslurm import LocalSlurm
from exporters.slurm import SlurmExporter, parse_args
from tests.conftest import need_binary, parse, value, wait_for
from tests.slurm_fixture import NODES
from tests.test_slurm_exporter import free_port, series

pytestmark = pytest.mark.integration


class Running:
    """Exporters started by a test, stopped at its end."""

    def __init__(self) -> None:
        self.started: list[SlurmExporter] = []

    def start(self, cluster: LocalSlurm, *flags: str) -> SlurmExporter:
        args = parse_args(["--web.listen-address=127.0.0.1:0", "--slurm.poll-interval=0.3s",
                           "--slurm.allow-fast-poll", f"--slurm.conf={cluster.conf_path}", *flags])
        exp = SlurmExporter(args)
        exp.start()
        self.started.append(exp)
        return exp


@pytest.fixture
def exporters():
    running = Running()
    yield running
    for exp in running.started:
        exp.stop()


def scrape(exp: SlurmExporter) -> dict:
    host, port = exp.server.server_address[:2]
    return parse(requests.get(f"http://{host}:{port}/metrics", timeout=5).text)


def settled(exp: SlurmExporter, predicate, timeout: float = 15.0) -> dict:
    """The first scrape whose snapshot is fresh (taken after now) and satisfies ``predicate``."""
    since = time.time()

    def check():
        m = scrape(exp)
        fresh = m.get("slurm_exporter_last_success_timestamp_seconds") and value(
            m, "slurm_exporter_last_success_timestamp_seconds") > since
        return m if fresh and predicate(m) else None

    return wait_for(check, timeout=timeout, interval=0.1)


def hostnames(cluster: LocalSlurm, hostlist: str) -> set[str]:
    return set(cluster.run("scontrol", "show", "hostnames", hostlist).stdout.split())


def gres_used_gpus(text: str) -> int:
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", text))


def on(m: dict, name: str) -> dict[str, str]:
    """node -> state of the one-hot series that is 1."""
    return {lab["node"]: lab["state"] for lab, v in m[name] if v == 1}


def test_metrics_match_sinfo_and_squeue(slurm, exporters):
    a = slurm.submit(gres="gpu:2", name="train-a", account="ml", extra=["-w", NODES[0]])
    b = slurm.submit(gres="gpu:2", name="train-b", account="ml", uid="nobody", extra=["-w", NODES[0]])
    c = slurm.submit(gres="gpu:8", name="big", account="research", extra=["-w", NODES[1]])
    d = slurm.submit(gres="gpu:4", name="two nodes", account="ml", nodes=2, extra=["-w", f"{NODES[2]},{NODES[3]}"])
    for job in (a, b, c, d):
        slurm.wait_job_state(job, "RUNNING")
    waiting = slurm.submit(gres="gpu:8", name="waits", account="research", extra=["-w", NODES[0]])
    held = slurm.submit(gres="gpu:1", name="held", account="research", extra=["--hold"])
    slurm.drain(NODES[2], "NHC: xid 79")
    exp = exporters.start(slurm)
    m = settled(exp, lambda m: "slurm_job_info" in m and len(m["slurm_job_info"]) == 4
                and value(m, "slurm_jobs", state="pending", partition="gpu") == 2
                and all(lab["reason"] != "None" for lab, _ in m["slurm_jobs_pending_reason"]))  # scheduled once

    # Nodes: states, GPUs and CPUs as sinfo prints them.
    # All GPUs but one core of gpu-node-2 are taken: Slurm calls it mixed (states follow CPUs).
    assert on(m, "slurm_node_state") == {NODES[0]: "mixed", NODES[1]: "mixed", NODES[2]: "draining",
                                         NODES[3]: "mixed"}
    assert [slurm.node_state(n) for n in NODES] == ["mixed", "mixed", "allocated+drain", "mixed"]  # sinfo says so
    for line in slurm.run("sinfo", "-h", "-N", "-p", "gpu", "-O", "NodeList:|,GresUsed:|,CPUsState:|,Gres:|"
                          ).stdout.splitlines():
        node, used, cpus, gres = line.split("|")[:4]
        assert value(m, "slurm_node_gpus_allocated", node=node) == gres_used_gpus(used), line
        assert value(m, "slurm_node_gpus", node=node) == gres_used_gpus(gres) == 8
        assert value(m, "slurm_node_cpus_allocated", node=node) == int(cpus.split("/")[0])
        assert value(m, "slurm_node_cpus", node=node) == int(cpus.split("/")[3])
    reasons = [line.split("|") for line in slurm.run("sinfo", "-h", "-R", "-o", "%n|%E|%u").stdout.splitlines()]
    assert [(lab["node"], lab["reason"], lab["reason_user"]) for lab, _ in m["slurm_node_drain_info"]] == [
        tuple(r) for r in reasons] == [(NODES[2], "NHC: xid 79", "root")]

    # Partitions: GPUs of their nodes.
    members: dict[str, set[str]] = {}
    for line in slurm.run("sinfo", "-h", "-N", "-o", "%N|%R").stdout.splitlines():
        node, part = line.split("|")
        members.setdefault(part, set()).add(node)
    for part, nodes in members.items():
        assert value(m, "slurm_partition_nodes", partition=part) == len(nodes)
        assert value(m, "slurm_partition_gpus_allocated", partition=part) == sum(
            value(m, "slurm_node_gpus_allocated", node=n) for n in nodes)
    assert value(m, "slurm_partition_info", partition="gpu", state="up", default="true") == 1

    # Jobs: one info series and one series per node for each running job, as squeue lists them.
    running = [line.split("|") for line in slurm.run("squeue", "-h", "-t", "RUNNING", "-o", "%i|%u|%a|%P|%j|%N"
                                                     ).stdout.splitlines()]
    assert {lab["job_id"]: (lab["user"], lab["account"], lab["partition"], lab["name"])
            for lab, _ in m["slurm_job_info"]} == {r[0]: tuple(r[1:5]) for r in running}
    for jid, *_, nodelist in running:
        assert {lab["node"] for lab, _ in m["slurm_job_node_info"] if lab["job_id"] == jid} == hostnames(
            slurm, nodelist)
    assert value(m, "slurm_job_gpus", job_id=d) == 8
    assert value(m, "slurm_job_gpus_allocated", account="ml", user="root", partition="gpu") == 2 + 8
    assert value(m, "slurm_job_gpus_allocated", account="ml", user="nobody", partition="gpu") == 2
    assert value(m, "slurm_job_gpus_allocated", account="research", user="root", partition="gpu") == 8
    pending = dict(line.split("|") for line in slurm.run("squeue", "-h", "-t", "PENDING", "-o", "%i|%r"
                                                         ).stdout.splitlines())
    assert pending[str(held)] == "JobHeldUser" and pending[str(waiting)] in ("Resources", "Priority")
    for reason in set(pending.values()):
        assert value(m, "slurm_jobs_pending_reason", reason=reason, partition="gpu") == list(
            pending.values()).count(reason)
    assert value(m, "slurm_jobs", state="running", partition="gpu") == 4
    assert value(m, "slurm_account_jobs", account="research", state="pending") == 2
    assert value(m, "slurm_user_jobs", user="nobody", state="running") == 1

    # The drain lifts and a job ends: their series go, none stays behind for the finished job.
    slurm.resume(NODES[2])
    slurm.cancel(c)
    m = settled(exp, lambda m: on(m, "slurm_node_state").get(NODES[2]) == "mixed" and not any(
        lab["job_id"] == str(c) for lab, _ in m["slurm_job_info"]))
    assert "slurm_node_drain_info" not in m
    assert str(c) not in {lab["job_id"] for lab, _ in m["slurm_job_node_info"]}
    assert str(c) not in {lab["job_id"] for lab, _ in m["slurm_job_start_timestamp_seconds"]}


def test_promtool_accepts_the_real_clusters_output(slurm, exporters):
    promtool = need_binary("promtool")
    slurm.wait_job_state(slurm.submit(gres="gpu:2", name='quote" and \\ backslash'))
    slurm.drain(NODES[3], 'reason with "quotes"')
    exp = exporters.start(slurm)
    settled(exp, lambda m: "slurm_job_info" in m and "slurm_node_drain_info" in m)
    host, port = exp.server.server_address[:2]
    text = requests.get(f"http://{host}:{port}/metrics", timeout=5).content
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"", (proc.stdout + proc.stderr).decode()


def test_formatted_fallback_and_slurmrestd_agree_with_json(slurm, exporters):
    slurm.wait_job_state(slurm.submit(gres="gpu:4", name="agree", account="ml", nodes=2))
    slurm.wait_job_state(slurm.submit(gres="gpu:1", name="small", uid="nobody", account="ops"))
    slurm.submit(gres="gpu:1", name="held", extra=["--hold"])
    slurm.drain(NODES[3], "NHC: compare")
    sock = slurm.start_rest()
    json_exp = exporters.start(slurm)
    text_exp = exporters.start(slurm, "--slurm.cli-format=text")
    rest_exp = exporters.start(slurm, f"--slurm.rest-url=unix://{sock}")
    ready = lambda m: "slurm_job_info" in m and len(m["slurm_job_info"]) == 2 and "slurm_node_drain_info" in m  # noqa: E731
    reference = series(settled(json_exp, ready))
    text = settled(text_exp, ready)
    rest = settled(rest_exp, ready)
    assert series(text) == reference
    assert series(rest) == reference
    assert value(rest, "slurm_exporter_backend_info", backend="rest", api_version="v0.0.38",
                 slurm_version="22.05.8") == 1
    assert value(text, "slurm_exporter_backend_info", backend="cli-text") == 1


def test_the_console_script_against_real_slurm_stops_on_sigterm(slurm_cluster):
    port = free_port()
    script = Path(sys.executable).parent / "gpufleet-slurm-exporter"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "exporters.slurm"]
    proc = subprocess.Popen([*cmd, f"--web.listen-address=127.0.0.1:{port}", "--slurm.poll-interval=0.5s",
                             "--slurm.allow-fast-poll", f"--slurm.conf={slurm_cluster.conf_path}"],
                            stderr=subprocess.DEVNULL)
    try:
        def nodes():
            try:
                m = parse(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
            except requests.RequestException:
                return None
            return m.get("slurm_node_gpus")

        assert {lab["node"] for lab, _ in wait_for(nodes, timeout=15)} == set(NODES)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
