"""Benchmark of the rdma and storage collectors on a synthetic GPU node: 8 HCAs, 30 mounts, 8 NVMe disks.

Method. A fixture node is built in a temporary directory: sysfs ``class/infiniband/mlx5_0..7`` (one RoCE port
each, laid out like the real mlx5 capture in /work/shared/fixtures/procfs, else generated, plus the RoCE
CNP/ECN ``hw_counters``), ``class/nvme/nvme0..7``; procfs ``1/mountinfo`` with 30 mounts (7 local, 20 NFS as
v4.2/rdma, v4.1/tcp, v3/tcp, 3 Lustre), ``1/mountstats`` with each NFS version's full per-operation table,
``diskstats`` (8 NVMe disks), Lustre llite stats; a rootfs holding every mountpoint as a directory.
Collection: both collectors are built in-process by their ``create(args)``, with the agent's garbage collector
settings (``exporters.cli.tune_gc``); after 20 warm-up runs, each of
``--runs`` samples times rdma.collect() + storage.collect() + render() of both. Files sit in the page cache,
so this is the collectors' own cost (on real HCAs each mlx5 ``hw_counters`` read is a firmware query).
Scrape: the agent runs as a subprocess with every collector on (sim GPUs, the fixture paths, jobs and progress
on empty temp dirs); once /metrics has gpu_, rdma_ and filesystem_ series, ``--scrapes`` sequential GETs go
over one keep-alive connection with Prometheus' headers (gzip), with bench/exporter.py's own helpers.
Targets (PASS/MISS are informational; exits 0): collection p99 < 20 ms, scrape p99 < 15 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The scrape method (Prometheus' headers, gzip, keep-alive) and agent lifecycle of bench/exporter.py, beside this.
from exporter import HEADERS, agent_cmd, fetch, free_port, started

from exporters import rdma, storage
from exporters.agent import build_parser, collector_modules
from exporters.cli import tune_gc
from exporters.collector import render

CAPTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/procfs/sys/class/infiniband/mlx5_0"
READY = (b"\ngpu_", b"\nrdma_port_state{", b"\nfilesystem_size_bytes{")
TARGET_COLLECT_MS, TARGET_SCRAPE_MS = 20.0, 15.0
LATENCY = "p50 {p50_ms:7.3f} ms   p99 {p99_ms:7.3f} ms   max {max_ms:.3f} ms   target p99 < {target_p99_ms:g} ms: {result}"
SERIES = "{series} series ({rdma_series} rdma_, {filesystem_series} filesystem_, {storage_series} storage_)"
ROCE_HW = ("np_cnp_sent", "np_ecn_marked_roce_packets", "rp_cnp_handled", "rp_cnp_ignored", "rx_icrc_encapsulated")
# The operations the kernel prints per NFS version (split where used); BUSY_OPS get non-zero counters.
NFS3_OPS = ("NULL GETATTR SETATTR LOOKUP ACCESS READLINK READ WRITE CREATE MKDIR SYMLINK MKNOD REMOVE RMDIR "
            "RENAME LINK READDIR READDIRPLUS FSSTAT FSINFO PATHCONF COMMIT")
NFS4_OPS = ("NULL READ WRITE COMMIT OPEN OPEN_CONFIRM OPEN_NOATTR OPEN_DOWNGRADE CLOSE SETATTR FSINFO RENEW "
            "SETCLIENTID SETCLIENTID_CONFIRM LOCK LOCKT LOCKU ACCESS GETATTR LOOKUP LOOKUP_ROOT REMOVE RENAME "
            "LINK SYMLINK CREATE PATHCONF STATFS READLINK READDIR SERVER_CAPS DELEGRETURN GETACL SETACL "
            "FS_LOCATIONS RELEASE_LOCKOWNER SECINFO FSID_PRESENT EXCHANGE_ID CREATE_SESSION DESTROY_SESSION "
            "SEQUENCE GET_LEASE_TIME RECLAIM_COMPLETE LAYOUTGET GETDEVICEINFO LAYOUTCOMMIT LAYOUTRETURN "
            "SECINFO_NO_NAME TEST_STATEID FREE_STATEID GETDEVICELIST BIND_CONN_TO_SESSION DESTROY_CLIENTID "
            "SEEK ALLOCATE DEALLOCATE LAYOUTSTATS CLONE COPY OFFLOAD_CANCEL LOOKUPP LAYOUTERROR")
BUSY_OPS = {"NULL", "READ", "WRITE", "COMMIT", "OPEN", "CLOSE", "SETATTR", "ACCESS", "GETATTR", "LOOKUP",
            "READDIR", "READDIRPLUS", "FSSTAT", "SEQUENCE"}
NFS_KINDS = (("nfs4", "4.2", "rdma"), ("nfs4", "4.1", "tcp"), ("nfs", "3", "tcp"))
LOCAL = [("259:2", "/dev/nvme0n1p2", "/", "ext4"), ("259:1", "/dev/nvme0n1p1", "/boot", "ext4"),
         ("9:0", "/dev/md0", "/raid", "xfs"), ("259:11", "/dev/nvme1n1p1", "/scratch", "xfs"),
         ("259:12", "/dev/nvme1n1p2", "/var/log", "ext4"), ("259:13", "/dev/nvme1n1p3", "/var/lib/docker", "xfs"),
         ("259:14", "/dev/nvme1n1p4", "/opt", "ext4")]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def build_rdma(sysfs: Path, rng: random.Random) -> None:
    for i in range(8):
        port = (dev := sysfs / f"class/infiniband/mlx5_{i}") / "ports/1"
        if CAPTURE.is_dir():
            shutil.copytree(CAPTURE, dev)
        else:  # the capture's layout: every PMA counter, mlx5 hw_counters
            for f in (*(f"counters/{c}" for c in rdma.PMA_COUNTERS), *(f"hw_counters/{c}" for c in (
                    *rdma.HW_COUNTERS, "duplicate_request", "req_cqe_error", "resp_cqe_error", "rx_read_requests"))):
                write(port / f, "0")
        for f, text in (("fw_ver", "28.39.1002"), ("board_id", "MT_0000000838"), ("hca_type", "MT4129"),
                        ("node_guid", f"946d:ae03:00{i:02x}:1a2b"), ("ports/1/link_layer", "Ethernet"),
                        ("ports/1/state", "4: ACTIVE"), ("ports/1/phys_state", "5: LinkUp"),
                        ("ports/1/rate", "400 Gb/sec (4X NDR)"), ("ports/1/hw_counters/lifespan", "10"),
                        *((f"ports/1/gid_attrs/ndevs/{g}", f"ens{i + 10}np0") for g in (0, 1)),
                        *((f"ports/1/hw_counters/{c}", "0") for c in ROCE_HW)):
            write(dev / f, text)
        for f in [*(port / "counters").iterdir(), *(port / "hw_counters").iterdir()]:
            if f.name != "lifespan":
                big = any(k in f.name for k in ("data", "packets", "requests"))
                f.write_text(f"{rng.randrange(10**12 if big else 5000)}\n")


def nfs_entry(src: str, mp: str, fstype: str, opts: str, proto: str, rng: random.Random) -> str:
    r, v4 = rng.randrange, fstype == "nfs4"
    lines = [f"device {src} mounted on {mp} with fstype {fstype} statvers=1.1", f"\topts:\t{opts}",
             f"\tage:\t{r(10**6)}", "\tcaps:\tcaps=0x3ffbffff,wtmult=512,dtsize=1048576,bsize=0,namlen=255",
             *(["\tnfsv4:\tbm0=0xfdffbfff,bm1=0x40f9be3e,bm2=0x60801,acl=0x3,sessions,pnfs=not configured"] if v4 else [])]
    sends = r(10**6, 10**8)  # port bind connects connect_time idle sends recvs bad_xids req_u bklog_u ...
    xprt = [0, 1, r(5), 0, r(100), sends, sends - r(10), 0, r(10**9), 0, r(100), r(10**6), r(10**5)]
    xprt += [r(10**6) for _ in range(12 if proto == "rdma" else 0)]
    lines += ["\tsec:\tflavor=1,pseudoflavor=1", "\tevents:\t" + " ".join(str(r(10**6)) for _ in range(27)),
              "\tbytes:\t" + " ".join(str(r(10**12)) for _ in range(8)),
              f"\tRPC iostats version: 1.1  p/v: 100003/{4 if v4 else 3} (nfs)",
              f"\txprt:\t{proto} " + " ".join(map(str, xprt)), "\tper-op statistics"]
    for op in (NFS4_OPS if v4 else NFS3_OPS).split():
        n = r(1, 10**6) if op in BUSY_OPS else 0
        vals = [n, n + r(3), 0, n * 200, n * 300, r(10**5), r(10**6), r(10**6), r(10)] if n else [0] * 9
        lines.append(f"\t{op:>12}: " + " ".join(map(str, vals)))
    return "\n".join(lines) + "\n\n"


def build_storage(tmp: Path, rng: random.Random) -> None:
    r = rng.randrange
    mounts: list[tuple[str, ...]] = [*LOCAL, *((f"0:{60 + i}", f"nas{i % 4}:/export/proj{i:02d}",
                                                f"/nfs/proj{i:02d}", *NFS_KINDS[i % 3]) for i in range(20))]
    for i, fs in enumerate(("scratch", "home", "datasets")):
        mounts.append((f"0:{90 + i}", f"10.0.0.1@o2ib:/{fs}", f"/lustre/{fs}", "lustre"))
        write(tmp / f"proc/fs/lustre/llite/{fs}-ffff8f2a{i:04x}c800/stats", "snapshot_time 1700000000.1 secs.usecs\n"
              + "".join(f"{k}_bytes {r(10**6)} samples [bytes] 4096 1048576 {r(10**12)}\n" for k in ("read", "write"))
              + "".join(f"{op} {r(10**6)} samples [usecs] 1 900 {r(10**8)}\n"
                        for op in ("open", "close", "getattr", "setattr", "statfs", "inode_permission")))
    info, stats = list[str](), list[str]()
    for n, (dev, src, mp, fstype, *nfs) in enumerate(mounts):
        (tmp / "root" / mp.lstrip("/")).mkdir(parents=True, exist_ok=True)
        opts = (f"rw,vers={nfs[0]},rsize=1048576,wsize=1048576,namlen=255,hard,proto={nfs[1]},timeo=600,"
                f"retrans=2,sec=sys,local_lock=none,addr=10.1.0.{2 + n % 4}") if nfs else "rw,relatime"
        info.append(f"{100 + n} {100 if n else 1} {dev} / {mp} rw,relatime shared:{n + 1} - {fstype} {src} {opts}\n")
        stats.append(nfs_entry(src, mp, fstype, opts, nfs[1], rng) if nfs
                     else f"device {src} mounted on {mp} with fstype {fstype}\n")
    write(tmp / "proc/1/mountinfo", "".join(info))
    write(tmp / "proc/1/mountstats", "".join(stats))
    disks = [(259, 20 + i, f"nvme{i}n1") for i in range(8)] + [(9, 0, "md0")] + [(7, j, f"loop{j}") for j in range(4)]
    disks += [(259, 10 * d + j, f"nvme{d}n1p{j}") for d, n in ((0, 2), (1, 4)) for j in range(1, n + 1)]
    write(tmp / "proc/diskstats", "\n".join(f"{ma:4d} {mi:7d} {name} " + " ".join(
        str(r(10**9)) for _ in range(17)) for ma, mi, name in disks))
    for i in range(8):
        for f, text in (("model", "SAMSUNG MZWLR7T6HALA-00007".ljust(40)), ("serial", f"S6EYNA0T{i:06d}".ljust(20)),
                        ("firmware_rev", "MPK7525Q"), ("state", "live")):
            write(tmp / f"sys/class/nvme/nvme{i}/{f}", text)
    for sub in ("jobs", "progress"):
        (tmp / sub).mkdir()


def agent_args(tmp: Path) -> list[str]:
    return ["--gpu.backend=sim", "--sim.gpus=8", f"--path.sysfs={tmp / 'sys'}", f"--path.procfs={tmp / 'proc'}",
            f"--path.rootfs={tmp / 'root'}", f"--collector.jobs.mapping-dir={tmp / 'jobs'}",
            f"--collector.progress.dir={tmp / 'progress'}",
            *(f"--collector.{m.COLLECTOR_NAME}" for m in collector_modules())]


def summary(samples: list[float], body: bytes, target_ms: float) -> dict[str, Any]:
    """p50/p99/max of the samples against the p99 target; series in the body, in all and by prefix."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    lines = [ln for ln in body.splitlines() if ln and not ln.startswith(b"#")]
    return {"p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3), "max_ms": round(max(samples), 3),
            "target_p99_ms": target_ms, "result": "PASS" if q[98] < target_ms else "MISS", "series": len(lines),
            **{f"{p}series": sum(ln.startswith(p.encode()) for ln in lines) for p in ("rdma_", "filesystem_", "storage_")}}


def collect_bench(tmp: Path, runs: int) -> dict[str, Any]:
    args = build_parser().parse_args(agent_args(tmp))
    rd, st = rdma.create(args), storage.create(args)
    tune_gc()  # as the agent runs them (exporters/cli.py)
    parts: dict[str, list[float]] = {"total": [], "rdma": [], "storage": [], "render": []}
    cpu: list[float] = []
    try:
        for i in range(20 + runs):  # the first 20 are warm-up (statfs threads, caches)
            c0 = time.process_time()
            t0 = time.perf_counter()
            fams = rd.collect()
            t1 = time.perf_counter()
            fams += st.collect()
            t2 = time.perf_counter()
            body = render(fams)
            t3 = time.perf_counter()
            if i >= 20:
                cpu.append((time.process_time() - c0) * 1e3)
            for k, ms in zip(parts, (t3 - t0, t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[k] += [ms * 1e3] if i >= 20 else []
    finally:
        rd.close()
        st.close()
    return {**summary(parts.pop("total"), body, TARGET_COLLECT_MS), "runs": runs,
            "status": f"{rd.status()}; {st.status()}",
            "cpu_p50_ms": round(statistics.median(cpu), 3),
            "cpu_p99_ms": round(statistics.quantiles(cpu, n=100, method="inclusive")[98], 3),
            "median_ms_by_part": {k: round(statistics.median(v), 3) for k, v in parts.items()}}


def scrape_bench(tmp: Path, scrapes: int) -> dict[str, Any]:
    """Start the agent, wait for every READY marker, time sequential scrapes; the agent is always stopped."""
    port = free_port()
    with started(agent_cmd(port, "5s", 8) + agent_args(tmp), port, READY[-1], timeout=60.0), \
            contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as conn:
        deadline = time.monotonic() + 30.0
        while not all(m in fetch(conn)[0] for m in READY):
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent never showed all of {READY} in /metrics")
            time.sleep(0.2)
        for _ in range(20):
            body, wire = fetch(conn)
        samples: list[float] = []
        for _ in range(scrapes):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics", headers=HEADERS)
            conn.getresponse().read()
            samples.append((time.perf_counter() - t0) * 1e3)
    failing = [ln.split(b'"')[1].decode() for ln in body.splitlines()
               if ln.startswith(b"gpufleet_exporter_collector_success{") and ln.endswith(b" 0")]
    return {**summary(samples, body, TARGET_SCRAPE_MS), "scrapes": scrapes, "bytes_uncompressed": len(body),
            "bytes_wire": wire, "failing_collectors": failing}


def print_table(r: dict[str, Any]) -> None:
    c, s = r["collect"], r["scrape"]
    print(f"host: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in r['loadavg'])} at start")
    print(f"rdma + storage collection, in-process ({c['runs']} runs; {c['status']})")
    print(f"  collect+render   {LATENCY.format(**c)}")
    print(f"  cpu time         p50 {c['cpu_p50_ms']:7.3f} ms   p99 {c['cpu_p99_ms']:7.3f} ms   (the process, all "
          "threads; near the wall time: the spread is the host's, not waits)")
    print("  median by part   " + ", ".join(f"{k} {v:.3f} ms" for k, v in c["median_ms_by_part"].items()))
    print(f"  per collection   {SERIES.format(**c)}")
    print(f"agent, all collectors, sim 8 GPUs ({s['scrapes']} sequential scrapes, keep-alive, gzip)")
    print(f"  scrape latency   {LATENCY.format(**s)}")
    print(f"  per scrape       {SERIES.format(**s)}, {s['bytes_uncompressed']} bytes ({s['bytes_wire']} gzip)")
    print(f"  failing collectors: {', '.join(s['failing_collectors']) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="In-process rdma+storage collections timed.")
    p.add_argument("--scrapes", type=int, default=500, help="Sequential scrapes of the agent.")
    p.add_argument("--json", action="store_true", help="Print a JSON object instead of the table.")
    args = p.parse_args(argv)
    if args.runs < 2 or args.scrapes < 2:
        p.error("--runs and --scrapes must be >= 2")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: finally blocks clean up
    try:
        with tempfile.TemporaryDirectory(prefix="gpufleet-bench-") as d:
            tmp, rng = Path(d), random.Random(42)
            loadavg = os.getloadavg()
            build_rdma(tmp / "sys", rng)
            build_storage(tmp, rng)
            r: dict[str, Any] = {"loadavg": loadavg, "collect": collect_bench(tmp, args.runs),
                                 "scrape": scrape_bench(tmp, args.scrapes)}
    except KeyboardInterrupt:
        print("interrupted; agent stopped, temp files removed", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
