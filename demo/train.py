"""A pretend training job for the demo's Slurm jobs: reports progress like a real one.

Run inside a Slurm job (``python -m demo.train``): it reports step, a falling loss and
a throughput through ``exporters.progress.ProgressReporter`` into
``$GPUFLEET_PROGRESS_DIR/<job id>/<rank>.json`` (the prolog made the directory), which
the node agent's progress collector turns into ``training_*`` series. It uses no GPU:
the GPUs are simulated; the allocation (``gpu_job_info``) is Slurm's.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from exporters.progress import ProgressReporter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-seconds", type=float, default=0.5, help="seconds per training step (default 0.5)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (default 0: until cancelled)")
    p.add_argument("--batch", type=int, default=256, help="samples per step, for the throughput (default 256)")
    args = p.parse_args(argv)
    progress = ProgressReporter()
    rng = random.Random()
    step = 0
    while not args.steps or step < args.steps:
        time.sleep(args.step_seconds)
        step += 1
        loss = 2.5 * math.exp(-step / 400) + 0.3 + rng.uniform(-0.02, 0.02)
        progress.report(step=step, loss=loss, samples_per_second=args.batch / args.step_seconds)
    progress.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
