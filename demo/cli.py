"""``gpufleet demo``: the whole loop on this machine, a scripted fault scenario, a table.

Starts, on loopback only: a real Slurm (munged, slurmctld, one slurmd per simulated
node), a simulator-backed node agent per node, the Slurm exporter, Prometheus,
Alertmanager and the remediation service, plus a training job per node. Then it
injects faults (Xid 79, an InfiniBand link flap, a storm of row-remap failures), prints
a timeline of what every component did, clears the faults, and ends with a table:
fault, detected after, acted after, action, outcome. See docs/demo.md.

Afterwards it keeps running with the URLs printed until Ctrl-C, which stops every
process it started. ``--once`` exits after the table instead.

exit status: 0 every step met its expectation; 1 a step missed it (or the stack did
not start); 2 a prerequisite is missing (the demo ran what it could and said what to
install); 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from demo import config
from demo.fleet import REPO, Fleet
from demo.scenario import WAIT, Scenario, summary
from demo.timeline import Timeline

HELP = "run the whole loop on this machine with a scripted fault scenario"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, metavar="N",
                   help="simulated GPU nodes, gpu-node-1..N (default 4, at least 2)")
    p.add_argument("--gpus", type=int, default=8, metavar="N", help="simulated GPUs per node (default 8)")
    p.add_argument("--once", action="store_true",
                   help="run the scenario, print the table and exit: non-zero if any step missed its expectation")
    p.add_argument("--workdir", type=Path, default=REPO / ".tmp" / "demo", metavar="DIR",
                   help="where configs, logs and state go; emptied at start if an earlier demo made it (default .tmp/demo)")
    p.add_argument("--wait", type=float, default=WAIT, metavar="SECONDS",
                   help=f"how long each expectation may take before it counts as missed (default {WAIT:g})")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the timeline: auto (only on a terminal, and not with NO_COLOR set), always, never")


def _colour(choice: str) -> bool | None:
    return {"auto": None, "always": True, "never": False}[choice]


def run(args: argparse.Namespace) -> int:
    tl = Timeline(colour=_colour(args.color))
    if args.nodes < 2:
        print("gpufleet demo: --nodes must be at least 2", file=sys.stderr)
        return 1
    fleet = Fleet(args.workdir, nodes=args.nodes, gpus=args.gpus, say=lambda m: tl.event("info", m))
    for m in fleet.missing:
        tl.note(f"missing: {m.what} -> no {m.disables}. To get it: {m.fix}")
    if fleet.missing:
        tl.note("running what can run without it.")
    tl.note("demo settings (differences from the shipped alerts/ and policy, in the demo's own copies):")
    for line in config.demo_changes(args.nodes):
        tl.note(f"  - {line}")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    # Explicit handlers: a demo started in the background of a script inherits an
    # ignored SIGINT, and Ctrl-C / SIGTERM must still stop every process it started.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            fleet.start()
        except (RuntimeError, OSError) as exc:
            tl.event("miss", f"the stack did not start: {exc}")
            tl.note(f"logs: {args.workdir}")
            return 1
        tl.note("")
        scenario = Scenario(fleet, tl, wait_s=args.wait)
        results = scenario.run()
        tl.note("")
        tl.note(summary(results))
        missed = [r for r in results if r.ok is False]
        skipped = [r for r in results if r.ok is None]
        if fleet.service is not None and fleet.slurm is not None:
            tl.note("\nThe breaker stays open until a human resets it: "
                    f"gpufleet remediation --url {fleet.service.url} --token-file {fleet.admin_token_file} "
                    "reset-breaker")
        code = 1 if missed else (2 if skipped or fleet.missing else 0)
        if args.once:
            return code
        tl.note("\nStill running (Ctrl-C stops every process the demo started):")
        for name, url in fleet.urls().items():
            tl.note(f"  {name:<24} {url}")
        while not stop.is_set():
            time.sleep(0.5)
        return code
    except KeyboardInterrupt:
        tl.note("\nstopping every process the demo started ...")
        return 130
    finally:
        # A second Ctrl-C (an impatient user, or `timeout` passing its signal on) must not cut
        # the clean-up short and leave daemons behind: stopping is bounded (SIGTERM, then SIGKILL).
        def still_stopping(_signum: int, _frame: object) -> None:
            tl.note("still stopping: every process gets SIGTERM, then SIGKILL after a few seconds")

        for sig in previous:
            signal.signal(sig, still_stopping)
        fleet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpufleet demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
