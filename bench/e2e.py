"""Fault-to-alert and fault-to-drain latency of the whole loop, with the demo's intervals.

Starts the demo stack (demo/fleet.py: real Slurm, simulator-backed agents, Prometheus,
Alertmanager, the remediation service; collection, scrape and evaluation every 1 s,
Alertmanager group_wait 1 s), then REPEATS times: raise Xid 79 on a GPU of a node
(rotating through the nodes), and time

- fault -> alert: Prometheus reports GpuXidRebootRequired firing for that node;
- fault -> Alertmanager: the alert is in Alertmanager;
- fault -> drained: ``sinfo`` shows the node drained with gpufleet's reason.

Between faults the node's agent restarts with a clean GPU and the service resumes the
node (demo policy: auto-resume after 5 s). Cooldown and flap limits are lifted for the
benchmark (the same node may be drained again). Prints median and max of each.
Needs root and the Debian packages (make setup). Usage: python bench/e2e.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.fleet import Fleet, prerequisites  # noqa: E402


def poll(pred, timeout: float = 120.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="faults to inject (default 5)")
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (default 4)")
    args = p.parse_args(argv)
    missing = prerequisites()
    if missing:
        for m in missing:
            print(f"missing: {m.what} ({m.fix})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-e2e-") as tmp:
        fleet = Fleet(Path(tmp) / "demo", nodes=args.nodes, jobs=False, say=lambda m: print(f"  {m}"),
                      policy_overrides={"cooldown": "0s", "flap_max_drains": 1000})
        fleet.start()
        assert fleet.prom is not None and fleet.am is not None
        to_alert, to_am, to_drain = [], [], []
        try:
            for i in range(args.repeats):
                node = fleet.node_names[(i + 2) % args.nodes]
                gpu = i % fleet.gpus
                t0 = time.monotonic()
                fleet.nodes[node].xid(gpu, 79)
                t_alert = poll(lambda n=node: any(
                    a["labels"].get("alertname") == "GpuXidRebootRequired" and a["labels"].get("node") == n
                    and a["state"] == "firing" for a in fleet.prom.alerts()))
                t_am = poll(lambda n=node: fleet.am.find(alertname="GpuXidRebootRequired", node=n))
                t_drain = poll(lambda n=node: "drain" in fleet.sinfo()[n][0]
                               and fleet.sinfo()[n][1].startswith("gpufleet:"))
                to_alert.append(t_alert - t0)
                to_am.append(t_am - t0)
                to_drain.append(t_drain - t0)
                print(f"fault {i + 1}: Xid 79 on {node} GPU {gpu}: alert {t_alert - t0:.2f}s, "
                      f"Alertmanager {t_am - t0:.2f}s, drained {t_drain - t0:.2f}s")
                fleet.restart_agent(node)  # the GPU reset: the Xid series starts over
                poll(lambda n=node: "drain" not in fleet.sinfo()[n][0]
                     and not fleet.sinfo()[n][0].startswith(("down", "unknown")), timeout=180, interval=0.5)
                poll(lambda n=node: not fleet.am.find(alertname="GpuXidRebootRequired", node=n), timeout=60)
        finally:
            fleet.stop()
    print(f"\n{args.repeats} faults, {args.nodes} nodes, 1 s collection/scrape/evaluation, group_wait 1 s:")
    for name, xs in (("fault -> alert firing", to_alert), ("fault -> in Alertmanager", to_am),
                     ("fault -> node drained", to_drain)):
        print(f"  {name:<26} median {statistics.median(xs):5.2f}s   max {max(xs):5.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
