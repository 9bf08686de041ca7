#!/usr/bin/env bash
# `make demo`: the whole gpufleet loop on this machine (docs/demo.md).
# Real Slurm, Prometheus, Alertmanager and the remediation service on loopback,
# simulator-backed node agents, a scripted fault scenario with a live timeline, then
# the URLs until Ctrl-C. Arguments go to `gpufleet demo` (e.g. --once, --nodes 6);
# `gpufleet demo --help` lists them. Without root or the Debian packages it says what
# is missing and how to get it, and runs what it can.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/gpufleet ]; then
  echo "demo: .venv is missing; run: make setup" >&2
  exit 1
fi
exec .venv/bin/gpufleet demo "$@"
