"""Instructions per rdma + storage collection on bench/collectors.py's fixture node, counted by callgrind.

Why. Wall time on a shared VM moves with the host (the same build measured 12 ms and 22 ms
within an hour here), so it cannot tell a 5 % change from noise. The number of instructions
the process executes for one collection is the same on every run (the hash seed is fixed), so
it compares two versions of the code on any machine. It does not count the kernel's side
(the ~450 sysfs/procfs file reads and 30 statfs calls), which wall time does.

Method. The fixture node of bench/collectors.py (8 RoCE HCAs, 30 mounts with 20 NFS and 3 Lustre,
13 disks, 8 NVMe) is built in a temporary directory. This script then runs itself twice under
``valgrind --tool=callgrind``, with PYTHONHASHSEED=0: once doing the set-up and warm-up only,
once doing the same plus ``--runs`` calls of the stage; the difference divided by ``--runs`` is
the cost of one call. Stages: ``all`` (rdma.collect() + storage.collect() + render(), as
bench/collectors.py times it), ``rdma``, ``storage``, ``render`` (of one collection's families).
Needs valgrind (Debian package ``valgrind``); about a minute per stage.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("all", "rdma", "storage", "render")


def child(fixture: Path, stage: str, runs: int) -> None:
    """The measured process: set-up and 10 warm-up calls, then ``runs`` more."""
    from collectors import agent_args

    from exporters import rdma, storage
    from exporters.agent import build_parser
    from exporters.cli import tune_gc
    from exporters.collector import render

    args = build_parser().parse_args(agent_args(fixture))
    rd, st = rdma.create(args), storage.create(args)
    tune_gc()
    families = rd.collect() + st.collect()
    call = {"all": lambda: render(rd.collect() + st.collect()), "rdma": rd.collect, "storage": st.collect,
            "render": lambda: render(families)}[stage]
    try:
        for _ in range(10 + runs):
            call()
    finally:
        rd.close()
        st.close()


def count(valgrind: str, fixture: Path, stage: str, runs: int) -> int:
    cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
           "--child", str(fixture), "--stage", stage, "--runs", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                          timeout=1800, check=False)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"valgrind run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", action="append", choices=STAGES,
                   help="What to count (repeatable; default: all). all = rdma + storage collection and render.")
    p.add_argument("--runs", type=int, default=10, help="Calls counted per stage (after 10 warm-up calls).")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stages = args.stage or ["all"]
    if args.child is not None:
        child(args.child, stages[0], args.runs)
        return 0
    if args.runs < 1:
        p.error("--runs must be >= 1")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("error: valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 1
    from collectors import build_rdma, build_storage

    with tempfile.TemporaryDirectory(prefix="gpufleet-icount-") as d:
        fixture, rng = Path(d), random.Random(42)
        build_rdma(fixture / "sys", rng)
        build_storage(fixture, rng)
        for stage in stages:
            try:
                base, full = count(valgrind, fixture, stage, 0), count(valgrind, fixture, stage, args.runs)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"{stage:8s} {(full - base) / args.runs / 1e6:8.2f} M instructions per call "
                  f"(callgrind, {args.runs} calls, PYTHONHASHSEED=0)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/collectors.py's fixture builders
    sys.exit(main())
