#!/usr/bin/env bash
# Interim demo (until the full-stack demo lands): one simulator-backed node agent on
# loopback, with a fault-injection file you can edit while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tmp
state=.tmp/demo-state.yaml
[ -f "$state" ] || cat > "$state" <<'YAML'
# Edit me while the agent runs (docs/simulator.md). For example, raise a Xid 79 on GPU 3:
#   gpus: {"3": {xid: {"79": 1}}}
gpus: {}
YAML
addr=${GPUFLEET_DEMO_ADDRESS:-127.0.0.1:9845}
cat <<TXT
gpufleet demo: a node agent with 8 simulated H100 GPUs.
  metrics:      http://$addr/metrics
  status page:  http://$addr/
  fault file:   $state   (edit it; the agent re-reads it)
  try:          echo 'gpus: {"3": {xid: {"79": 1}, lost: true}}' > $state
                curl -s http://$addr/metrics | grep -E '^gpu_(up|xid)'
Ctrl-C stops it.
TXT
exec .venv/bin/gpufleet-exporter --gpu.backend=sim --sim.state-file="$state" --gpu.expected-count=8 \
  --gpu.dcgm-compat --collector.interval=1s --web.listen-address="$addr"
