"""gpufleet-slurm-exporter without a Slurm: parsing, every data shape, failure handling, HTTP.

Fixtures in tests/fixtures/slurm: ``v0.0.38`` was captured from a real Slurm 22.05
(capture.py describes the cluster: six nodes, a mixed, a draining, a drained and a down
node, five running and two pending jobs); ``v0.0.41`` is the same state in the newer
layouts (make_newer.py). Real-Slurm tests are in test_slurm_exporter_integration.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from exporters import slurm as slurm_exporter
from exporters.collector import SampleBuilder
from exporters.slurm import SPECS, SlurmCollector, SlurmExporter, parse_args, render_snapshot
from exporters.slurm_data import (
    NODE_STATES,
    ParseError,
    Snapshot,
    expand_hostlist,
    gpu_count,
    job_gpus,
    jobs_from_json,
    nodes_from_json,
    normalise_node_state,
    pending_reason,
    slurm_version,
    tres_gpus,
    utc_epoch,
)
from exporters.slurm_source import CliSource, RestSource, SourceError, read_token
from tests.conftest import need_binary, parse, value, wait_for

FIX = Path(__file__).resolve().parent / "fixtures" / "slurm"
V38, V41 = FIX / "v0.0.38", FIX / "v0.0.41"
EXPECTED = json.loads((FIX / "expected.json").read_text())
JOB = EXPECTED["jobs"]  # name in capture.py -> job id
SNAPSHOT_NAMES = {s.name for s in SPECS if not s.name.startswith("slurm_exporter_")}


# -- pure parsing ----------------------------------------------------------------------------
@pytest.mark.parametrize(("gres", "gpus"), [
    ("gpu:h100:8(IDX:0-7)", 8),
    ("gpu:h100:8(S:0-1)", 8),
    ("gpu:(null):3", 3),
    ("gpu:(null):3(IDX:0-2)", 3),
    ("gpu:8", 8),
    ("gpu:2(S:0)", 2),
    ("gpu:h100:4(IDX:0-1,4-5),gpu:a100:2(IDX:6-7)", 6),
    ("tmpsize:7T,gpu:l40s:4(S:0-1)", 4),
    ("gpu:l40s:1(IDX:0),tmpsize:10737418240", 1),
    ("gpu:1g.10gb:7", 7),
    ("gpu:h100:0(IDX:N/A)", 0),
    ("gpu:fake1:0(IDX:N/A),gpu:fake2:0(IDX:N/A)", 0),
    ("gpu:h100", 1),
    ("gpu", 1),
    ("gres:gpu:2", 2),
    ("gres/gpu:h100:4", 4),
    ("mps:100,shard:8", 0),
    ("", 0),
    ("N/A", 0),
    ("(null)", 0),
    (None, 0),
])
def test_gres_gpu_count(gres, gpus):
    assert gpu_count(gres) == gpus


def test_gres_with_an_unreadable_count_is_an_error():
    with pytest.raises(ParseError, match="gpu:h100:lots"):
        gpu_count("gpu:h100:lots")


@pytest.mark.parametrize(("tres", "gpus"), [
    ("cpu=2,mem=4G,node=1,billing=2,gres/gpu=1,gres/gpu:l40s=1", 1),
    ("cpu=1536,mem=184320G,gres/gpu=128,gres/gpu:h100=128", 128),
    ("cpu=1,node=1,billing=1", None),
    ("", None),
])
def test_tres_gpus(tres, gpus):
    assert tres_gpus(tres) == gpus


def test_job_gpus_prefers_gres_detail_then_tres_then_request_times_nodes():
    assert job_gpus(["gpu:h100:4(IDX:4-7)", "gpu:h100:4(IDX:0-3)"], "gres/gpu=99", "gres:gpu:1", 2) == 8
    assert job_gpus([], "cpu=4,gres/gpu=3", "gres:gpu:1", 3) == 3
    assert job_gpus(None, "cpu=4", "gres/gpu:2", 3) == 6
    assert job_gpus(None, "cpu=4", "", 3) == 0


@pytest.mark.parametrize(("state", "flags", "expected"), [
    ("IDLE+DRAIN", None, ("drained", False)),
    ("MIXED+DRAIN", None, ("draining", False)),
    ("ALLOCATED+DRAIN", None, ("draining", False)),
    ("allocated+drain", None, ("draining", False)),  # sinfo -O StateComplete
    ("IDLE+COMPLETING+DRAIN", None, ("draining", False)),
    ("DOWN+NOT_RESPONDING", None, ("down", True)),
    ("DOWN+DRAIN+NOT_RESPONDING", None, ("down", True)),
    ("IDLE+NOT_RESPONDING", None, ("idle", True)),
    ("idle+drain+not_responding", None, ("drained", True)),
    (["IDLE", "DRAIN"], None, ("drained", False)),  # 23.02+ JSON
    (["MIXED", "DRAIN"], None, ("draining", False)),
    (["DOWN", "NOT_RESPONDING"], None, ("down", True)),
    (["IDLE", "DYNAMIC_NORM"], None, ("idle", False)),
    ("mixed", ["DRAIN"], ("draining", False)),  # 22.05 JSON: state + state_flags
    ("idle", ["DRAIN"], ("drained", False)),
    ("down", [], ("down", False)),
    ("idle", ["NOT_RESPONDING"], ("idle", True)),
    ("IDLE+FAIL", None, ("fail", False)),
    ("ALLOCATED+FAIL", None, ("fail", False)),
    ("IDLE+MAINT", None, ("maint", False)),
    ("IDLE+RESERVED", None, ("reserved", False)),
    ("ALLOCATED+RESERVED", None, ("allocated", False)),
    ("IDLE+POWERED_DOWN", None, ("idle", False)),
    ("FUTURE", None, ("unknown", False)),
    ("UNKNOWN+NOT_RESPONDING", None, ("unknown", True)),
    ("", None, ("unknown", False)),
    # sinfo's short and long spellings (formatted output of older Slurm)
    ("down*", None, ("down", True)),
    ("drained", None, ("drained", False)),
    ("drained*", None, ("drained", True)),
    ("draining", None, ("draining", False)),
    ("drng", None, ("draining", False)),
    ("drain", None, ("drained", False)),
    ("alloc", None, ("allocated", False)),
    ("mix", None, ("mixed", False)),
    ("resv", None, ("reserved", False)),
    ("maint", None, ("maint", False)),
    ("idle$", None, ("maint", False)),
    ("idle~", None, ("idle", False)),
    ("failing", None, ("fail", False)),
    ("comp", None, ("allocated", False)),
])
def test_node_state_normalisation(state, flags, expected):
    assert normalise_node_state(state, flags) == expected
    assert expected[0] in NODE_STATES


@pytest.mark.parametrize(("hostlist", "names"), [
    ("gpu-node-1", ["gpu-node-1"]),
    ("gpu-node-[1,5]", ["gpu-node-1", "gpu-node-5"]),
    ("gpu-node-[1-3,7]", ["gpu-node-1", "gpu-node-2", "gpu-node-3", "gpu-node-7"]),
    ("gpu[0098-0101]", ["gpu0098", "gpu0099", "gpu0100", "gpu0101"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("", []),
    ("(null)", []),
])
def test_hostlist_expansion(hostlist, names):
    assert expand_hostlist(hostlist) == names


@pytest.mark.parametrize("bad", ["n[1-", "n[3-1]", "n[a-b]"])
def test_bad_hostlists_are_errors(bad):
    with pytest.raises(ParseError):
        expand_hostlist(bad)


@pytest.mark.parametrize(("reason", "code"), [
    ("ReqNodeNotAvail, UnavailableNodes:gpu-node-[2-4]", "ReqNodeNotAvail"),
    ("(ReqNodeNotAvail, UnavailableNodes:gpu-node-[2-4])", "ReqNodeNotAvail"),
    ("(JobHeldUser)", "JobHeldUser"),
    ("Resources", "Resources"),
    ("", "None"),
])
def test_pending_reason_is_a_bounded_code(reason, code):
    assert pending_reason(reason) == code


# -- the captured cluster, through every backend and shape -----------------------------------
def fake_bin(tmp_path: Path, fixtures: Path = V38) -> Path:
    """sinfo/squeue stand-ins that print fixture output; ``mode`` switches their behaviour.

    mode: ok | fail (exit 1 as when slurmctld is down) | hang | garbage | nojson (``--json``
    rejected like Slurm before 21.08). Every call is appended to ``calls``.
    """
    d = tmp_path / "fakebin"
    d.mkdir(exist_ok=True)
    (d / "mode").write_text("ok")
    for cmd in ("sinfo", "squeue"):
        other = "partitions.txt" if cmd == "sinfo" else "squeue.txt"
        script = d / cmd
        script.write_text(f"""#!/bin/sh
echo "{cmd} $*" >> "{d}/calls"
mode=$(cat "{d}/mode")
case "$mode" in
  fail) echo "slurm_load_node error: Unable to contact slurm controller (connect failure)" >&2; exit 1;;
  hang) sleep 30; exit 0;;
  garbage) echo "<html>proxy error</html>"; exit 0;;
  nojson) case " $* " in *" --json "*) echo "{cmd}: unrecognized option '--json'" >&2; exit 1;; esac;;
esac
case " $* " in
  *" --json "*) exec cat "{fixtures}/{cmd}.json";;
  *" -O "*) exec cat "{fixtures}/{cmd}.txt";;
  *) exec cat "{fixtures}/{other}";;
esac
""")
        script.chmod(0o755)
    return d


def collect(source) -> dict:
    collector = SlurmCollector(source)
    collector.collect()
    return parse(collector.exposition())


def series(m: dict, skip: tuple[str, ...] = ()) -> set[tuple]:
    """Every snapshot sample as (name, sorted labels, value), for comparing backends."""
    out = set()
    for name, samples in m.items():
        if name not in SNAPSHOT_NAMES or name in skip:
            continue
        for labels, v in samples:
            out.add((name, tuple(sorted(labels.items())), v))
    return out


@pytest.fixture
def v38(tmp_path) -> dict:
    return collect(CliSource(bin_dir=str(fake_bin(tmp_path))))


def test_node_metrics_match_the_captured_sinfo(v38):
    m = v38
    for node, info in EXPECTED["sinfo"].items():
        state = normalise_node_state(info["state"])[0]
        assert value(m, "slurm_node_state", node=node, state=state) == 1
        assert sum(v for lab, v in m["slurm_node_state"] if lab["node"] == node) == 1
        assert value(m, "slurm_node_gpus", node=node) == 8
        assert value(m, "slurm_node_gpus_allocated", node=node) == gpu_count(info["gres_used"])
        assert value(m, "slurm_node_cpus_allocated", node=node) == int(info["cpus"].split("/")[0])
        assert value(m, "slurm_node_not_responding", node=node) == 0
    states = {n: s for lab, v in m["slurm_node_state"] if v for n, s in [(lab["node"], lab["state"])]}
    assert states == {"gpu-node-1": "mixed", "gpu-node-2": "draining", "gpu-node-3": "drained",
                      "gpu-node-4": "down", "gpu-node-5": "mixed", "gpu-node-6": "mixed"}
    drains = {lab["node"]: lab for lab, _ in m["slurm_node_drain_info"]}
    assert set(drains) == {"gpu-node-2", "gpu-node-3", "gpu-node-4"}
    assert drains["gpu-node-3"]["reason"] == "NHC: xid 79"
    assert drains["gpu-node-2"]["reason"] == "NHC: ecc errors"
    assert drains["gpu-node-4"]["reason"] == "hardware check"
    assert all(d["reason_user"] == "root" for d in drains.values())
    raw = json.loads((V38 / "sinfo.json").read_text())
    changed = next(n["reason_changed_at"] for n in raw["nodes"] if n["name"] == "gpu-node-3")
    assert utc_epoch(drains["gpu-node-3"]["reason_time"]) == changed


def test_partition_metrics(v38):
    m = v38
    assert value(m, "slurm_partition_info", partition="gpu") == 1
    assert value(m, "slurm_partition_info", partition="gpu", state="up", default="true") == 1
    assert value(m, "slurm_partition_info", partition="debug", state="up", default="false") == 1
    assert value(m, "slurm_partition_nodes", partition="gpu") == 6
    assert value(m, "slurm_partition_nodes", partition="debug") == 3
    assert value(m, "slurm_partition_gpus", partition="gpu") == 48
    # node-1 8 + node-2 8 + node-5 4 + node-6 1; debug holds nodes 1-3.
    assert value(m, "slurm_partition_gpus_allocated", partition="gpu") == 21
    assert value(m, "slurm_partition_gpus_allocated", partition="debug") == 16
    assert value(m, "slurm_partition_nodes_state", partition="gpu", state="mixed") == 3
    assert value(m, "slurm_partition_nodes_state", partition="debug", state="drained") == 1
    assert value(m, "slurm_partition_nodes_state", partition="debug", state="down") == 0
    assert len([1 for lab, _ in m["slurm_partition_nodes_state"] if lab["partition"] == "gpu"]) == len(NODE_STATES)
    assert {(lab["node"], lab["partition"]) for lab, _ in m["slurm_node_partition_info"]} == {
        *((f"gpu-node-{i}", "gpu") for i in range(1, 7)), *((f"gpu-node-{i}", "debug") for i in range(1, 4))}


def test_job_metrics_match_the_captured_squeue(v38):
    m = v38
    running = {jid: j for jid, j in EXPECTED["squeue"].items() if j["state"] == "RUNNING"}
    info = {lab["job_id"]: lab for lab, v in m["slurm_job_info"]}
    assert set(info) == set(running)
    for jid, j in running.items():
        assert info[jid] == {"job_id": jid, "user": j["user"], "account": j["account"],
                             "partition": j["partition"], "name": j["name"]}
        nodes = {lab["node"] for lab, _ in m["slurm_job_node_info"] if lab["job_id"] == jid}
        assert nodes == set(expand_hostlist(j["nodes"]))
        assert value(m, "slurm_job_start_timestamp_seconds", job_id=jid) > 1.7e9
    assert info[JOB["weird"]]["name"] == 'we"ird\\name'
    assert value(m, "slurm_job_gpus", job_id=JOB["multi"]) == 8
    assert value(m, "slurm_job_gpus", job_id=JOB["big"]) == 8
    assert value(m, "slurm_job_gpus", job_id=JOB["train-b"]) == 2
    # GPUs by account/user/partition: ml/root = 2 + 8 + 1, ml/nobody = 2, research/root = 8.
    assert value(m, "slurm_job_gpus_allocated", account="ml", user="root", partition="gpu") == 11
    assert value(m, "slurm_job_gpus_allocated", account="ml", user="nobody", partition="gpu") == 2
    assert value(m, "slurm_job_gpus_allocated", account="research", user="root", partition="gpu") == 8
    assert sum(v for _, v in m["slurm_job_gpus_allocated"]) == sum(
        v for lab, v in m["slurm_node_gpus_allocated"])
    assert value(m, "slurm_jobs", state="running", partition="gpu") == 5
    assert value(m, "slurm_jobs", state="pending", partition="gpu") == 2
    assert value(m, "slurm_jobs", state="running", partition="debug") == 0
    assert value(m, "slurm_jobs_pending_reason", reason="ReqNodeNotAvail", partition="gpu") == 1
    assert value(m, "slurm_jobs_pending_reason", reason="JobHeldUser", partition="gpu") == 1
    assert value(m, "slurm_account_jobs", account="research", state="pending") == 2
    assert value(m, "slurm_account_jobs", account="ml", state="running") == 4
    assert value(m, "slurm_user_jobs", user="nobody", state="running") == 1
    # Pending jobs have no per-job series.
    assert JOB["wide"] not in {lab["job_id"] for lab, _ in m["slurm_job_start_timestamp_seconds"]}


def test_finished_jobs_get_no_series(tmp_path):
    doc = json.loads((V38 / "squeue.json").read_text())
    for j in doc["jobs"]:
        if j["job_id"] == int(JOB["train-a"]):
            j["job_state"] = "COMPLETED"
        if j["job_id"] == int(JOB["big"]):
            j["job_state"] = "CANCELLED"
    jobs = jobs_from_json(doc)
    assert {j.job_id for j in jobs} == set(EXPECTED["squeue"]) - {JOB["train-a"], JOB["big"]}


def rest_fixture_server(root: Path, **kwargs) -> FakeSlurmrestd:
    server = FakeSlurmrestd(root, **kwargs)
    server.serve()
    return server


@pytest.mark.parametrize("backend", ["cli-text", "rest-v0.0.38", "cli-json-v0.0.41", "rest-v0.0.41"])
def test_the_same_cluster_gives_the_same_metrics_in_every_shape(tmp_path, v38, backend):
    """22.05 JSON is the reference; the formatted fallback and the newer layouts must agree."""
    skip: tuple[str, ...] = ()
    server = None
    try:
        if backend == "cli-text":
            source = CliSource(bin_dir=str(fake_bin(tmp_path)), fmt="text")
        elif backend == "cli-json-v0.0.41":
            source = CliSource(bin_dir=str(fake_bin(tmp_path, V41)))
            skip = ("slurm_node_drain_info",)  # 23.02+ sinfo records carry the reason only
        else:
            server = rest_fixture_server((V38 if backend == "rest-v0.0.38" else V41) / "rest")
            source = RestSource(server.url)
            if backend == "rest-v0.0.41":
                skip = ("slurm_partition_info",)  # where newer partitions mark the default is not captured
        m = collect(source)
    finally:
        if server:
            server.stop()
    assert series(m, skip) == series(v38, skip)
    if "slurm_node_drain_info" in skip:
        assert {(lab["node"], lab["reason"]) for lab, _ in m["slurm_node_drain_info"]} == {
            (lab["node"], lab["reason"]) for lab, _ in v38["slurm_node_drain_info"]}
    if "slurm_partition_info" in skip:
        assert {(lab["partition"], lab["state"]) for lab, _ in m["slurm_partition_info"]} == {
            ("gpu", "up"), ("debug", "up")}


def test_grouped_sinfo_records_are_split_per_node():
    """23.02+ sinfo without -N groups identical nodes: totals are per record."""
    doc = {"sinfo": [
        {"node": {"state": ["IDLE"]}, "nodes": {"nodes": ["n1", "n2"], "total": 2},
         "cpus": {"allocated": 0, "total": 128}, "gres": {"total": "gpu:a100:4", "used": "gpu:a100:0(IDX:N/A)"},
         "partition": {"name": "p1", "partition": {"state": ["UP"]}}, "reason": ""},
        {"node": {"state": ["IDLE", "DRAIN"]}, "nodes": {"nodes": ["n3"], "total": 1},
         "cpus": {"allocated": 0, "total": 64}, "gres": {"total": "gpu:a100:4", "used": "gpu:a100:0(IDX:N/A)"},
         "partition": {"name": "p1"},
         "reason": {"description": "NHC: bad", "user": "root", "time": {"set": True, "number": 1700000000}}},
        {"node": {"state": ["IDLE"]}, "nodes": {"nodes": ["n1"], "total": 1}, "cpus": {"total": 64},
         "gres": {"total": "gpu:a100:4"}, "partition": {"name": "p2"}},
    ]}
    nodes, parts = nodes_from_json(doc)
    by = {n.name: n for n in nodes}
    assert by["n1"].cpus == 64 and by["n2"].cpus == 64 and by["n1"].gpus == 4
    assert by["n1"].partitions == ["p1", "p2"]
    assert (by["n3"].state, by["n3"].reason, by["n3"].reason_user, by["n3"].reason_time) == (
        "drained", "NHC: bad", "root", 1700000000)
    assert [p.name for p in parts] == ["p1", "p2"]


@pytest.mark.parametrize(("fixture", "expected"), [
    (V38 / "sinfo.json", ("22.05.8", "v0.0.38")),
    (V41 / "sinfo.json", ("24.05.4", "v0.0.41")),
    (V41 / "rest" / "slurm_v0.0.41_nodes.json", ("24.05.4", "v0.0.41")),
])
def test_slurm_release_and_data_format_from_meta(fixture, expected):
    assert slurm_version(json.loads(fixture.read_text())) == expected


def test_unknown_documents_are_errors_naming_the_keys():
    with pytest.raises(ParseError, match="no 'nodes' or 'sinfo' list"):
        nodes_from_json({"meta": {}, "errors": []})
    with pytest.raises(ParseError, match="no 'jobs' list"):
        jobs_from_json({"job": []})


# -- rendering ---------------------------------------------------------------------------------
def fixture_snapshot() -> Snapshot:
    nodes, _ = nodes_from_json(json.loads((V38 / "sinfo.json").read_text()))
    return Snapshot(nodes, jobs_from_json(json.loads((V38 / "squeue.json").read_text())), [])


def test_label_values_are_escaped_and_read_back_intact():
    snap = fixture_snapshot()
    snap.jobs[0].name = 'multi\nline "quoted" back\\slash'
    text = render_snapshot(snap)
    assert b'name="multi\\nline \\"quoted\\" back\\\\slash"' in text
    m = parse(text)
    assert [lab["name"] for lab, _ in m["slurm_job_info"] if lab["job_id"] == snap.jobs[0].job_id] == [
        'multi\nline "quoted" back\\slash']


def test_undocumented_names_and_wrong_labels_are_programming_errors():
    b = SampleBuilder(slurm_exporter._SPEC)
    with pytest.raises(ValueError, match="expected labels"):
        b.add("slurm_node_cpus", ("n1", "extra"), 1)
    with pytest.raises(KeyError):
        b.add("slurm_not_documented", (), 1)


def test_every_metric_is_documented_and_named_by_convention(v38):
    names = {s.name for s in SPECS}
    assert set(v38) <= names
    assert SNAPSHOT_NAMES - set(v38) == set()  # the fixture exercises every snapshot metric
    for s in SPECS:
        assert s.name.startswith("slurm_") and s.help.endswith(".")
        assert (s.type == "counter") == s.name.endswith("_total")
        if s.name.endswith("_info"):
            assert "value 1" in s.help.lower()


def test_promtool_check_metrics_is_clean(tmp_path):
    promtool = need_binary("promtool")
    exp = make_exporter(tmp_path)
    try:
        exp.start()
        text = wait_for(lambda: (t := exp.exposition()) and b"slurm_job_info{" in t and t)
        text = requests.get(url(exp), timeout=5).content
    finally:
        exp.stop()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"" and proc.stderr == b"", (proc.stdout + proc.stderr).decode()


# -- commands failing, hanging, missing --json -------------------------------------------------
def test_failing_command_is_a_clear_error(tmp_path):
    d = fake_bin(tmp_path)
    (d / "mode").write_text("fail")
    with pytest.raises(SourceError) as err:
        CliSource(bin_dir=str(d)).fetch()
    assert err.value.source == "nodes"
    assert str(err.value) == ("nodes: sinfo exited 1: slurm_load_node error: Unable to contact slurm controller "
                              "(connect failure)")


def test_hanging_command_is_killed_with_its_children_after_the_timeout(tmp_path):
    d = fake_bin(tmp_path)
    (d / "mode").write_text("hang")
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="sinfo timed out after 0.5s"):
        CliSource(bin_dir=str(d), timeout=0.5).fetch()
    assert time.monotonic() - t0 < 5  # the shell's `sleep 30` child did not hold the pipe open


def test_output_that_is_not_json_is_an_error(tmp_path):
    d = fake_bin(tmp_path)
    (d / "mode").write_text("garbage")
    with pytest.raises(SourceError, match="nodes: output is not JSON .*<html>proxy error"):
        CliSource(bin_dir=str(d)).fetch()


def test_missing_program_is_an_error(tmp_path):
    with pytest.raises(SourceError, match=f"cannot run {tmp_path}/sinfo: No such file"):
        CliSource(bin_dir=str(tmp_path)).fetch()


def test_without_json_support_falls_back_to_formatted_output_once(tmp_path, caplog, v38):
    d = fake_bin(tmp_path)
    (d / "mode").write_text("nojson")
    (d / "calls").unlink(missing_ok=True)  # the v38 fixture's calls
    source = CliSource(bin_dir=str(d))
    with caplog.at_level(logging.WARNING, logger="gpufleet.slurm"):
        first = collect(source)
        collect(source)
    assert source.backend == "cli-text"
    assert [r.getMessage() for r in caplog.records].count(
        "sinfo/squeue --json unavailable; using formatted output from now on") == 1
    assert sum("--json" in line for line in (d / "calls").read_text().splitlines()) == 1
    assert series(first) == series(v38)


def test_forced_json_does_not_fall_back(tmp_path):
    d = fake_bin(tmp_path)
    (d / "mode").write_text("nojson")
    with pytest.raises(SourceError, match="unrecognized option"):
        CliSource(bin_dir=str(d), fmt="json").fetch()


def test_slurm_conf_is_passed_to_the_commands(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "sinfo").write_text(f'#!/bin/sh\necho "$SLURM_CONF" > {tmp_path}/seen\nexit 1\n')
    (d / "sinfo").chmod(0o755)
    with pytest.raises(SourceError):
        CliSource(bin_dir=str(d), conf="/etc/other/slurm.conf").fetch()
    assert (tmp_path / "seen").read_text().strip() == "/etc/other/slurm.conf"


# -- the exporter process: last good snapshot, self metrics, HTTP ------------------------------
def make_exporter(tmp_path: Path, *flags: str, fixtures: Path = V38) -> SlurmExporter:
    args = parse_args(["--web.listen-address=127.0.0.1:0", "--slurm.poll-interval=0.1s", "--slurm.allow-fast-poll",
                       f"--slurm.bin-dir={fake_bin(tmp_path, fixtures)}", "--slurm.timeout=1s", *flags])
    return SlurmExporter(args)


def url(exp: SlurmExporter, path: str = "/metrics") -> str:
    host, port = exp.server.server_address[:2]
    return f"http://{host}:{port}{path}"


def scrape(exp: SlurmExporter) -> dict:
    return parse(requests.get(url(exp), timeout=5).text)


def test_scrapes_serve_the_last_good_snapshot_while_slurm_fails(tmp_path):
    exp = make_exporter(tmp_path)
    exp.start()
    try:
        m = wait_for(lambda: (s := scrape(exp)) and "slurm_job_info" in s and s)
        assert value(m, "gpufleet_exporter_collector_success", collector="slurm") == 1
        assert value(m, "slurm_exporter_errors_total", source="nodes") == 0
        assert value(m, "slurm_exporter_backend_info", backend="cli-json", api_version="v0.0.38",
                     slurm_version="22.05.8") == 1
        good = series(m)
        last_ok = value(m, "slurm_exporter_last_success_timestamp_seconds")
        assert time.time() - 10 < last_ok <= time.time()
        (tmp_path / "fakebin" / "mode").write_text("fail")
        m = wait_for(lambda: (s := scrape(exp)) and s["slurm_exporter_errors_total"] and
                     value(s, "slurm_exporter_errors_total", source="nodes") >= 2 and s)
        assert series(m) == good  # every node and job series still there
        assert value(m, "gpufleet_exporter_collector_success", collector="slurm") == 0
        assert value(m, "gpufleet_exporter_collector_errors_total", collector="slurm") >= 2
        assert value(m, "slurm_exporter_last_success_timestamp_seconds") == last_ok
        age = value(m, "slurm_exporter_snapshot_age_seconds")
        assert age >= 0.1 and abs(age - (time.time() - last_ok)) < 1
        page = requests.get(url(exp, "/"), timeout=5).text
        assert "failing" in page and "Unable to contact slurm controller" in page
        (tmp_path / "fakebin" / "mode").write_text("ok")
        wait_for(lambda: value(scrape(exp), "gpufleet_exporter_collector_success", collector="slurm") == 1)
    finally:
        exp.stop()


def test_before_the_first_success_there_is_no_snapshot_and_no_age(tmp_path):
    exp = make_exporter(tmp_path)
    (tmp_path / "fakebin" / "mode").write_text("fail")
    exp.start()
    try:
        m = wait_for(lambda: (s := scrape(exp)) and value(s, "slurm_exporter_errors_total", source="nodes") and s)
        assert "slurm_node_state" not in m and "slurm_exporter_snapshot_age_seconds" not in m
        assert value(m, "slurm_exporter_last_success_timestamp_seconds") == 0
    finally:
        exp.stop()


def test_poll_interval_has_a_floor_unless_fast_polling_is_allowed(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--slurm.poll-interval=1s"])
    assert exit_.value.code == 2
    assert "below 5s" in capsys.readouterr().err
    assert parse_args(["--slurm.poll-interval=1s", "--slurm.allow-fast-poll"]).poll_interval == 1
    assert parse_args([]).poll_interval == 30
    with pytest.raises(SystemExit):
        parse_args(["--slurm.token-file=/x"])


def test_main_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    script = Path(sys.executable).parent / "gpufleet-slurm-exporter"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "exporters.slurm"]
    proc = subprocess.Popen([*cmd, f"--web.listen-address=127.0.0.1:{port}", "--slurm.poll-interval=0.2s",
                             "--slurm.allow-fast-poll", f"--slurm.bin-dir={fake_bin(tmp_path)}", "--log.format=json"],
                            stderr=subprocess.PIPE, text=True)
    try:
        m = wait_for(lambda: (s := _try_scrape(port)) and "slurm_job_info" in s and s, timeout=15)
        assert value(m, "slurm_node_state", node="gpu-node-3", state="drained") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert [x["msg"] for x in logs if x["msg"] in ("listening", "stopped")] == ["listening", "stopped"]


def test_main_refuses_a_bad_rest_url():
    assert slurm_exporter.main(["--slurm.rest-url=ftp://x", "--web.listen-address=127.0.0.1:0"]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _try_scrape(port: int) -> dict | None:
    try:
        return parse(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
    except requests.RequestException:
        return None


# -- slurmrestd ----------------------------------------------------------------------------
class FakeSlurmrestd:
    """Serves captured slurmrestd bodies at their real paths (files named slurm_<v>_<what>.json).

    Like slurmrestd: unknown paths get 404 with its plain-text message; with ``token``
    set, a request without the right X-SLURM-USER-TOKEN/NAME gets 401.
    """

    def __init__(self, root: Path, *, token: str = "", user: str = "", delay: float = 0.0, openapi: bool = True,
                 unix_path: str = ""):
        self.root, self.token, self.user, self.delay, self.openapi = root, token, user, delay, openapi
        self.requests: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def address_string(self) -> str:
                return "local"

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append((self.path, dict(self.headers)))
                if fake.delay:
                    time.sleep(fake.delay)
                if fake.token and (self.headers.get("X-SLURM-USER-TOKEN") != fake.token
                                   or self.headers.get("X-SLURM-USER-NAME") != fake.user):
                    return self._send(401, b'{"errors":[{"description":"Authentication failure"}]}')
                name = self.path.strip("/").replace("/", "_") + ".json"
                path = fake.root / name
                if (self.path == "/openapi/v3" and not fake.openapi) or not path.is_file():
                    return self._send(404, b"Unable find requested URL. Please view /openapi/v3 for API reference.",
                                      "text/plain")
                return self._send(200, path.read_bytes())

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Quiet:
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that timed out and hung up (the timeout test) is expected

        if unix_path:
            class UnixServer(Quiet, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
                pass

            self.server = UnixServer(unix_path, Handler)
            self.url = f"unix://{unix_path}"
        else:
            class TcpServer(Quiet, ThreadingHTTPServer):
                pass

            self.server = TcpServer(("127.0.0.1", 0), Handler)
            self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self) -> None:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def restd():
    servers: list[FakeSlurmrestd] = []

    def start(root: Path = V41 / "rest", **kwargs) -> FakeSlurmrestd:
        s = FakeSlurmrestd(root, **kwargs)
        s.serve()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_rest_negotiates_the_best_version_the_server_lists(restd):
    server = restd(V41 / "rest")
    source = RestSource(server.url)
    snap = source.fetch()
    assert source.version == "v0.0.41"
    assert snap.api_version == "v0.0.41" and snap.slurm_version == "24.05.4"
    assert [p for p, _ in server.requests] == ["/openapi/v3", "/slurm/v0.0.41/nodes", "/slurm/v0.0.41/jobs",
                                               "/slurm/v0.0.41/partitions"]
    server = restd(V38 / "rest")
    source = RestSource(server.url)
    assert source.fetch().slurm_version == "22.05.8" and source.version == "v0.0.38"


def test_rest_probes_ping_when_openapi_is_not_served(restd):
    server = restd(V38 / "rest", openapi=False)
    source = RestSource(server.url)
    source.fetch()
    assert source.version == "v0.0.38"
    assert [p for p, _ in server.requests][:5] == ["/openapi/v3", "/slurm/v0.0.41/ping", "/slurm/v0.0.40/ping",
                                                   "/slurm/v0.0.39/ping", "/slurm/v0.0.38/ping"]


def test_rest_renegotiates_after_a_server_upgrade(restd, tmp_path):
    root = tmp_path / "rest"
    shutil.copytree(V38 / "rest", root)
    server = restd(root)
    source = RestSource(server.url)
    source.fetch()
    assert source.version == "v0.0.38"
    shutil.rmtree(root)
    shutil.copytree(V41 / "rest", root)  # slurmrestd upgraded under us
    with pytest.raises(SourceError, match="nodes: HTTP 404 for /slurm/v0.0.38/nodes; renegotiating"):
        source.fetch()
    source.fetch()
    assert source.version == "v0.0.41"


def test_rest_sends_the_token_and_user_and_rereads_a_rotated_token(restd, tmp_path):
    token = tmp_path / "token"
    token.write_text("SLURM_JWT=first-token\n")
    server = restd(token="first-token", user="slurm-exporter")
    source = RestSource(server.url, token_file=str(token), user="slurm-exporter")
    source.fetch()
    _, headers = server.requests[-1]
    assert headers["X-SLURM-USER-TOKEN"] == "first-token" and headers["X-SLURM-USER-NAME"] == "slurm-exporter"
    server.token = "second-token"
    token.write_text("second-token\n")
    os.utime(token, (time.time() + 5, time.time() + 5))
    source.fetch()
    assert server.requests[-1][1]["X-SLURM-USER-TOKEN"] == "second-token"


def test_rest_auth_failure_names_the_flags(restd, tmp_path):
    token = tmp_path / "token"
    token.write_text("wrong")
    server = restd(token="right", user="u")
    with pytest.raises(SourceError) as err:
        RestSource(server.url, token_file=str(token), user="u").fetch()
    assert err.value.source == "api_version"
    assert "HTTP 401" in str(err.value) and "Authentication failure" in str(err.value)
    assert "--slurm.token-file" in str(err.value)


def test_rest_timeout_and_refused_connection(restd):
    server = restd(delay=1.0)
    with pytest.raises(SourceError, match="timed out after 0.2s"):
        RestSource(server.url, timeout=0.2).fetch()
    with pytest.raises(SourceError, match="api_version: GET /openapi/v3 failed: ConnectionError"):
        RestSource(f"http://127.0.0.1:{free_port()}", timeout=1).fetch()


def test_rest_over_a_unix_socket(restd, tmp_path):
    sock = tmp_path / "slurmrestd.socket"
    server = restd(V38 / "rest", unix_path=str(sock))
    m = collect(RestSource(f"unix://{sock}"))
    assert value(m, "slurm_node_state", node="gpu-node-3", state="drained") == 1
    assert {p for p, _ in server.requests} >= {"/slurm/v0.0.38/nodes", "/slurm/v0.0.38/jobs"}


def test_rest_url_must_be_http_or_unix():
    with pytest.raises(ValueError, match="not http"):
        RestSource("slurmrestd:6820")


def test_token_file_formats(tmp_path):
    f = tmp_path / "t"
    f.write_text("SLURM_JWT=abc.def.ghi\n")
    assert read_token(str(f)) == "abc.def.ghi"
    f.write_text("  abc.def.ghi  \n")
    assert read_token(str(f)) == "abc.def.ghi"


def test_errors_inside_a_json_document_are_failures_not_an_empty_cluster():
    """22.05's sinfo --json exits 0 with an errors list and no nodes when slurmctld is down."""
    from exporters.slurm_data import ParseError, jobs_from_json, nodes_from_json

    down = {"errors": [{"error": "Unspecified error", "errno": -1}], "nodes": [], "jobs": []}
    with pytest.raises(ParseError, match="Unspecified error"):
        nodes_from_json(down)
    with pytest.raises(ParseError, match="Unspecified error"):
        jobs_from_json(down)
    assert nodes_from_json({"errors": [], "nodes": []}) == ([], [])
