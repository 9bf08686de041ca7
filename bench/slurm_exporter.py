"""Benchmark of one gpufleet-slurm-exporter collection on synthetic large clusters.

What is measured, and how:

* Input: ``sinfo --json`` and ``squeue --json`` documents in Slurm 22.05's shape
  (OpenAPI v0.0.38), generated from the node and job records captured from a real
  Slurm in ``tests/fixtures/slurm/v0.0.38`` (every field Slurm prints, pretty-printed
  as Slurm prints them), scaled to N nodes (8 GPUs each, two partitions, a few
  drained/down) and M jobs (70 % running: one to four GPUs on one node, every 20th
  job on 2-16 whole nodes, with ``job_resources`` listing each node's allocated
  cores; 30 % pending with a mix of reasons).
* One collection: a fresh Python process runs ``SlurmCollector(CliSource(...)).collect()``
  once, exactly as the exporter does, against stand-in ``sinfo``/``squeue`` scripts
  that ``cat`` the documents (so reading the pipe is included): run the commands,
  ``json.loads``, parse, build every series, render the exposition text.
* Figures: wall time of that collection (median of ``--repeat`` fresh processes, with
  min-max: the host is shared) and its CPU time (user + system, with the stand-in
  commands), the parts of it (measured again, warm), series and
  bytes rendered, and the process's peak RSS (the kernel's high-water mark ``VmHWM``,
  MiB; ``ru_maxrss`` elsewhere) next to its RSS before the collection (interpreter and
  imports).

Target (issue 4): 20,000 jobs on 2,000 nodes in under 2 s and under 400 MB peak RSS.
PASS/MISS is informational: this is a benchmark, not a test, and exits 0.

    .venv/bin/python bench/slurm_exporter.py            # all cases, about a minute
    .venv/bin/python bench/slurm_exporter.py --cases 2000x20000 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "slurm" / "v0.0.38"
CASES = ("1000x5000", "1000x20000", "1000x50000", "4000x5000", "4000x20000", "4000x50000", "2000x20000")
TARGET = ("2000x20000", 2.0, 400.0)
MIB = 2**20
REASONS = ("Priority", "Resources", "Dependency", "JobHeldUser", "QOSMaxGRESPerUser",
           "ReqNodeNotAvail, UnavailableNodes:gpu[0001-0004]")


def _templates() -> tuple[dict, dict, dict, dict]:
    nodes = json.loads((FIXTURES / "sinfo.json").read_text())
    jobs = json.loads((FIXTURES / "squeue.json").read_text())
    node = next(n for n in nodes["nodes"] if n["state"] == "mixed")
    running = next(j for j in jobs["jobs"] if j["job_state"] == "RUNNING")
    pending = next(j for j in jobs["jobs"] if j["job_state"] == "PENDING")
    return nodes, node, running, pending


def _hostlist(names: list[str], width: int) -> str:
    """Slurm's compressed form: gpu0001 -> gpu0001, several -> gpu[0001-0003,0007]."""
    if len(names) == 1:
        return names[0]
    nums = sorted(int(n[3:]) for n in names)
    ranges = []
    start = prev = nums[0]
    for x in nums[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        ranges.append(f"{start:0{width}d}" if start == prev else f"{start:0{width}d}-{prev:0{width}d}")
        if x is not None:
            start = prev = x
    return f"gpu[{','.join(ranges)}]"


def generate(n_nodes: int, n_jobs: int, out: Path, seed: int = 1) -> None:
    """Write sinfo.json, squeue.json and partitions.txt for a cluster of that size."""
    rnd = random.Random(seed)
    doc, node_t, run_t, pend_t = _templates()
    width = max(4, len(str(n_nodes)))
    names = [f"gpu{i:0{width}d}" for i in range(1, n_nodes + 1)]
    free = {n: 8 for n in names}
    cpus_used = {n: 0 for n in names}
    jobs = []
    cursor = 0
    t0 = 1_790_000_000
    for jid in range(1, n_jobs + 1):
        user = f"user{rnd.randrange(400):03d}"
        account = f"acct{rnd.randrange(40):02d}"
        partition = "gpu" if rnd.random() < 0.9 else "debug"
        if rnd.random() < 0.7:
            j = copy.copy(run_t)
            if jid % 50 == 0:  # multi-node, whole nodes
                count = rnd.randrange(2, 9)
                chosen = []
                for _ in range(n_nodes):
                    nm = names[cursor % n_nodes]
                    cursor += 1
                    if free[nm] == 8:
                        chosen.append(nm)
                        if len(chosen) == count:
                            break
                per = 8
            else:
                per = rnd.choice((1, 1, 1, 2))
                chosen = []
                for _ in range(n_nodes):
                    nm = names[cursor % n_nodes]
                    if free[nm] >= per:
                        chosen = [nm]
                        break
                    cursor += 1
            if not chosen:
                j = copy.copy(pend_t)
            else:
                details = []
                alloc_nodes = []
                for nm in chosen:
                    first = 8 - free[nm]
                    free[nm] -= per
                    idx = f"{first}-{first + per - 1}" if per > 1 else str(first)
                    details.append(f"gpu:h100:{per}(IDX:{idx})")
                    cores = {str(c): "allocated" for c in range(per * 4)}
                    alloc_nodes.append({"sockets": {"0": {"cores": cores}}, "nodename": nm, "cpus_used": 0,
                                        "memory_used": 0, "memory_allocated": 0})
                    cpus_used[nm] += per * 4
                j["nodes"] = _hostlist(chosen, width)
                j["gres_detail"] = details
                j["job_resources"] = {"nodes": j["nodes"], "allocated_cores": per * 4 * len(chosen),
                                      "allocated_hosts": len(chosen), "allocated_nodes": alloc_nodes}
                j["tres_alloc_str"] = f"cpu={per * 4 * len(chosen)},node={len(chosen)},billing={per * 4}"
                j["tres_per_node"] = f"gres:gpu:{per}"
                j["node_count"] = len(chosen)
                j["start_time"] = t0 + rnd.randrange(86400)
                j["state_reason"] = "None"
        else:
            j = copy.copy(pend_t)
        if j.get("job_state") == "PENDING":
            j["state_reason"] = rnd.choice(REASONS)
            j["tres_per_node"] = f"gres:gpu:{rnd.choice((1, 2, 8))}"
        j["job_id"] = jid
        j["user_name"] = user
        j["account"] = account
        j["partition"] = partition
        j["name"] = f"train-{rnd.randrange(10**6):06d}"
        j["submit_time"] = t0 - rnd.randrange(86400)
        jobs.append(j)
    nodes = []
    for i, nm in enumerate(names):
        n = copy.copy(node_t)
        used = 8 - free[nm]
        n["name"] = n["hostname"] = nm
        n["state"] = "idle" if used == 0 else ("allocated" if used == 8 else "mixed")
        n["state_flags"] = []
        n["reason"], n["reason_set_by_user"], n["reason_changed_at"] = "", None, 0
        if i % 97 == 5:
            n["state_flags"] = ["DRAIN"]
            n["reason"], n["reason_set_by_user"], n["reason_changed_at"] = "NHC: xid 79", "root", t0
        elif i % 211 == 7 and used == 0:
            n["state"] = "down"
            n["state_flags"] = ["NOT_RESPONDING"]
            n["reason"], n["reason_set_by_user"], n["reason_changed_at"] = "Not responding", "slurm", t0
        n["gres_used"] = f"gpu:h100:{used}(IDX:0-{used - 1})" if used else "gpu:h100:0(IDX:N/A)"
        n["alloc_cpus"] = min(cpus_used[nm], n["cpus"])
        n["idle_cpus"] = n["cpus"] - n["alloc_cpus"]
        n["partitions"] = ["gpu", "debug"] if i < n_nodes // 8 else ["gpu"]
        nodes.append(n)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sinfo.json").write_text(json.dumps({"meta": doc["meta"], "errors": [], "nodes": nodes}, indent=2))
    (out / "squeue.json").write_text(json.dumps({"meta": doc["meta"], "errors": [], "jobs": jobs}, indent=2))
    (out / "partitions.txt").write_text("gpu*\x1fup\x1f\ndebug\x1fup\x1f\n")
    bindir = out / "bin"
    bindir.mkdir(exist_ok=True)
    for cmd, doc_name in (("sinfo", "sinfo.json"), ("squeue", "squeue.json")):
        script = bindir / cmd
        body = f'#!/bin/sh\ncase " $* " in *" --json "*) exec cat "{out / doc_name}";; esac\n'
        if cmd == "sinfo":
            body += f'exec cat "{out / "partitions.txt"}"\n'
        script.write_text(body)
        script.chmod(0o755)


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (per address space, so not inherited across exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the stand-in commands)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(case_dir: str) -> None:
    """One collection in this (fresh) process; prints a JSON line of figures."""
    sys.path.insert(0, str(REPO))
    from exporters.slurm import SlurmCollector, render_snapshot
    from exporters.slurm_source import CliSource

    rss_before = peak_rss_mib()
    source = CliSource(bin_dir=str(Path(case_dir) / "bin"), timeout=120)
    collector = SlurmCollector(source)
    t0, c0 = time.perf_counter(), _cpu()
    collector.collect()
    total, cpu = time.perf_counter() - t0, _cpu() - c0
    peak = peak_rss_mib()
    payload = collector.exposition()
    # The parts, once more in the same process (warm caches: indicative only).
    t1 = time.perf_counter()
    snap = source.fetch()
    t2 = time.perf_counter()
    render_snapshot(snap)
    t3 = time.perf_counter()
    series = sum(1 for line in payload.split(b"\n") if line and not line.startswith(b"#"))
    print(json.dumps({
        "seconds": round(total, 3), "cpu_seconds": round(cpu, 3), "fetch_parse_seconds": round(t2 - t1, 3),
        "build_render_seconds": round(t3 - t2, 3),
        "peak_rss_mib": round(peak, 1), "rss_before_mib": round(rss_before, 1), "series": series,
        "bytes": len(payload), "running_jobs": sum(1 for j in snap.jobs if j.state == "RUNNING"),
        "sinfo_mib": round(os.path.getsize(Path(case_dir) / "sinfo.json") / MIB, 1),
        "squeue_mib": round(os.path.getsize(Path(case_dir) / "squeue.json") / MIB, 1),
    }))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="NODESxJOBS, e.g. 2000x20000")
    ap.add_argument("--json", action="store_true", help="print one JSON object per case")
    ap.add_argument("--workdir", default="", help="keep generated documents here (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="collections per case, each in a fresh process")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--generate", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    if args.generate:
        generate(int(args.generate[0]), int(args.generate[1]), Path(args.generate[2]))
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="slurm-bench-"))
    if not args.json:
        print(f"{'case':>12} {'sinfo':>7} {'squeue':>7} {'running':>8} {'series':>8} {'seconds':>8} "
              f"{'(min-max)':>11} {'cpu':>6} {'fetch+parse':>11} {'build+render':>12} {'peak RSS':>9} {'base RSS':>9}")
    for case in args.cases:
        n_nodes, n_jobs = (int(x) for x in case.split("x"))
        d = work / case
        if not (d / "squeue.json").exists():
            # In its own process, so that this one stays small (peak RSS is not inherited, but be safe).
            subprocess.run([sys.executable, __file__, "--generate", str(n_nodes), str(n_jobs), str(d)], check=True)
        runs = []
        for _ in range(max(1, args.repeat)):
            proc = subprocess.run([sys.executable, __file__, "--child", str(d)], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                print(f"{case}: failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
                break
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if not runs:
            continue
        # Median run by time; the host is shared, so the spread is printed too.
        runs.sort(key=lambda r: r["seconds"])
        r = dict(runs[len(runs) // 2])
        r["seconds_min"], r["seconds_max"] = runs[0]["seconds"], runs[-1]["seconds"]
        r["peak_rss_mib"] = max(x["peak_rss_mib"] for x in runs)
        r["case"] = case
        verdict = ""
        if case == TARGET[0]:
            ok = r["seconds"] < TARGET[1] and r["peak_rss_mib"] < TARGET[2]
            verdict = f"  {'PASS' if ok else 'MISS'} (target < {TARGET[1]:g} s, < {TARGET[2]:g} MB)"
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{case:>12} {r['sinfo_mib']:>5.1f}MB {r['squeue_mib']:>5.1f}MB {r['running_jobs']:>8} "
                  f"{r['series']:>8} {r['seconds']:>7.2f}s {r['seconds_min']:>5.2f}-{r['seconds_max']:<5.2f} "
                  f"{r['cpu_seconds']:>5.2f}s "
                  f"{r['fetch_parse_seconds']:>10.2f}s "
                  f"{r['build_render_seconds']:>11.2f}s {r['peak_rss_mib']:>6.0f}MiB {r['rss_before_mib']:>6.0f}MiB"
                  f"{verdict}")
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
