"""Benchmark of the gpufleet node agent (simulator backend) against Debian's node_exporter.

What is measured, and how:

* Scrape latency: the agent (``--gpu.backend=sim --sim.gpus=8``) runs as a subprocess on a free
  loopback port. After /metrics answers with ``gpu_up`` series and a warm-up, ``--scrapes``
  sequential GETs go over one persistent ``http.client`` connection with Prometheus' own request
  headers (``Accept-Encoding: gzip``). Each sample is the wall time from sending the request to
  having read the whole (compressed) body; p50/p99 are reported in ms. Series per scrape counts the
  non-comment lines of the decompressed body; bytes are reported on the wire and uncompressed.
* CPU: for ``--collector.interval`` 1s and 5s, a fresh agent settles, then ``user+system`` CPU time
  of the process (psutil ``cpu_times``) is read at both ends of a ``--measure-seconds`` window with
  NO scrapes inside it, and scaled to CPU seconds per minute and to % of one core.
* Memory: psutil ``memory_info().rss`` is sampled every 0.25 s during every agent run (max kept);
  on Linux ``VmHWM`` (the kernel's own RSS high-water mark) from /proc/PID/status is read too.
  MB here means MiB (2**20 bytes).
* node_exporter: /usr/bin/prometheus-node-exporter with its default collectors is scraped the same
  way in the same run, and the agent/node_exporter latency ratio is printed. Skipped if missing.

Targets (PASS/MISS are informational, this is a benchmark and not a test): agent scrape p99 < 10 ms,
CPU < 1 % of one core at the 5 s interval, peak RSS < 80 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
HEADERS = {"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1", "Accept-Encoding": "gzip",
           "User-Agent": "gpufleet-bench"}
TARGET_P99_MS, TARGET_CPU_PCT, TARGET_RSS_MB = 10.0, 1.0, 80.0
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_cmd(port: int, interval: str, gpus: int) -> list[str]:
    script = Path(sys.executable).parent / "gpufleet-exporter"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "exporters.agent"]
    return base + ["--gpu.backend=sim", f"--sim.gpus={gpus}", f"--web.listen-address=127.0.0.1:{port}",
                   f"--collector.interval={interval}", "--log.level=warn"]


@contextlib.contextmanager
def started(cmd: list[str], port: int, ready_marker: bytes, timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """Start ``cmd``, wait until /metrics on ``port`` contains ``ready_marker``; always stop it afterwards."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"{cmd[0]} did not become ready (exit={proc.poll()}):\n{tail}")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                with contextlib.suppress(OSError, http.client.HTTPException), contextlib.closing(conn):
                    if ready_marker in fetch(conn)[0]:
                        break
                time.sleep(0.1)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def fetch(conn: http.client.HTTPConnection) -> tuple[bytes, int]:
    """GET /metrics; returns (decompressed body, bytes on the wire)."""
    conn.request("GET", "/metrics", headers=HEADERS)
    resp = conn.getresponse()
    raw = resp.read()
    if resp.status != 200:
        raise http.client.HTTPException(f"HTTP {resp.status}")
    body = gzip.decompress(raw) if resp.getheader("Content-Encoding") == "gzip" else raw
    return body, len(raw)


def scrape_bench(port: int, scrapes: int, warmup: int = 20) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(warmup):
            body, wire = fetch(conn)
        samples: list[float] = []
        for _ in range(scrapes):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics", headers=HEADERS)
            resp = conn.getresponse()
            resp.read()
            samples.append((time.perf_counter() - t0) * 1000.0)
    finally:
        conn.close()
    q = statistics.quantiles(samples, n=100, method="inclusive")
    series = sum(1 for line in body.splitlines() if line.strip() and not line.startswith(b"#"))
    return {"p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3), "max_ms": round(max(samples), 3),
            "series": series, "bytes_uncompressed": len(body), "bytes_wire": wire, "scrapes": scrapes}


class RssTracker:
    """Max RSS over calls to ``sample``, plus VmHWM read from /proc at the end of each run."""

    def __init__(self) -> None:
        self.peak_rss = 0
        self.peak_hwm: int | None = None

    def sample(self, p: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, p.memory_info().rss)

    def read_hwm(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_hwm = max(self.peak_hwm or 0, int(line.split()[1]) * 1024)

    def sleep(self, p: psutil.Process, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sample(p)
            time.sleep(min(0.25, left))


def cpu_window(p: psutil.Process, seconds: float, rss: RssTracker) -> dict[str, float]:
    """CPU seconds (user+system) used by ``p`` over an idle window (no scrapes), scaled to a minute."""
    t0, c0 = time.monotonic(), p.cpu_times()
    rss.sleep(p, seconds)
    t1, c1 = time.monotonic(), p.cpu_times()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    per_min = used * 60.0 / (t1 - t0)
    return {"cpu_s_per_min": round(per_min, 3), "pct_of_core": round(per_min / 60.0 * 100.0, 3),
            "window_s": round(t1 - t0, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rss = RssTracker()
    out: dict[str, Any] = {"gpus": args.gpus, "cpu": {}}
    for interval in ("1s", "5s"):
        port = free_port()
        with started(agent_cmd(port, interval, args.gpus), port, b"gpu_up{") as proc:
            p = psutil.Process(proc.pid)
            rss.sleep(p, args.settle_seconds)  # let the first collections, imports and caches settle
            out["cpu"][interval] = cpu_window(p, args.measure_seconds, rss)
            if interval == "5s":  # scrape latency at the default interval, after the idle window
                out["agent_scrape"] = scrape_bench(port, args.scrapes)
                rss.sample(p)
            rss.read_hwm(proc.pid)
    out["rss_mb"] = round(rss.peak_rss / MIB, 1)
    out["vmhwm_mb"] = round(rss.peak_hwm / MIB, 1) if rss.peak_hwm is not None else None
    if shutil.which(args.node_exporter):
        port = free_port()
        cmd = [args.node_exporter, f"--web.listen-address=127.0.0.1:{port}"]
        with started(cmd, port, b"node_exporter_build_info"):
            ne = out["node_exporter_scrape"] = scrape_bench(port, args.scrapes)
        for q in ("p50", "p99"):
            out[f"ratio_{q}"] = round(out["agent_scrape"][f"{q}_ms"] / ne[f"{q}_ms"], 2)
    else:
        out["node_exporter_scrape"] = None
        out["node_exporter_missing"] = f"{args.node_exporter} not found; comparison skipped"
    out["targets"] = {"scrape_p99_ms_lt_10": out["agent_scrape"]["p99_ms"] < TARGET_P99_MS,
                      "cpu_pct_at_5s_lt_1": out["cpu"]["5s"]["pct_of_core"] < TARGET_CPU_PCT,
                      "rss_mb_lt_80": max(out["rss_mb"], out["vmhwm_mb"] or 0.0) < TARGET_RSS_MB}
    return out


def word(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(r: dict[str, Any]) -> None:
    a, ne, t = r["agent_scrape"], r["node_exporter_scrape"], r["targets"]
    print(f"gpufleet-exporter, simulator, {r['gpus']} GPUs ({a['scrapes']} sequential scrapes, keep-alive, gzip)")
    print(f"  scrape latency   p50 {a['p50_ms']:7.3f} ms   p99 {a['p99_ms']:7.3f} ms   max {a['max_ms']:.3f} ms"
          f"   target p99 < {TARGET_P99_MS:g} ms: {word(t['scrape_p99_ms_lt_10'])}")
    print(f"  per scrape       {a['series']} series, {a['bytes_uncompressed']} bytes "
          f"({a['bytes_wire']} bytes gzip on the wire)")
    for interval, c in r["cpu"].items():
        tgt = f"   target < {TARGET_CPU_PCT:g}% of a core: {word(t['cpu_pct_at_5s_lt_1'])}" if interval == "5s" else ""
        print(f"  CPU @ {interval:<3}       {c['cpu_s_per_min']:.3f} CPU-s/min = {c['pct_of_core']:.3f}% of one core"
              f" (idle window {c['window_s']} s){tgt}")
    hwm = f", VmHWM {r['vmhwm_mb']} MB" if r["vmhwm_mb"] is not None else ""
    print(f"  peak RSS         {r['rss_mb']} MB (sampled){hwm}   target < {TARGET_RSS_MB:g} MB: "
          f"{word(t['rss_mb_lt_80'])}")
    if ne is None:
        print(f"node_exporter: {r['node_exporter_missing']}")
        return
    print("prometheus-node-exporter, default collectors")
    print(f"  scrape latency   p50 {ne['p50_ms']:7.3f} ms   p99 {ne['p99_ms']:7.3f} ms   max {ne['max_ms']:.3f} ms")
    print(f"  per scrape       {ne['series']} series, {ne['bytes_uncompressed']} bytes "
          f"({ne['bytes_wire']} bytes gzip on the wire)")
    print(f"ratio agent / node_exporter: p50 {r['ratio_p50']}x, p99 {r['ratio_p99']}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scrapes", type=int, default=500, help="Sequential scrapes per exporter.")
    p.add_argument("--measure-seconds", type=float, default=60.0, help="Idle CPU window per interval.")
    p.add_argument("--settle-seconds", type=float, default=3.0, help="Wait after start before the CPU window.")
    p.add_argument("--gpus", type=int, default=8, help="Simulated GPUs (--sim.gpus).")
    p.add_argument("--node-exporter", default=NODE_EXPORTER, help="node_exporter binary to compare with.")
    p.add_argument("--json", action="store_true", help="Print a JSON object instead of the table.")
    args = p.parse_args(argv)
    if args.scrapes < 2 or args.measure_seconds <= 0:
        p.error("--scrapes must be >= 2 and --measure-seconds > 0")
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop every subprocess.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("interrupted; subprocesses stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
