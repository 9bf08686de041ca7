#!/usr/bin/env bash
# Hardware validation of the GPU collector on a machine with an NVIDIA GPU (H100/H200 expected).
#
#   tests/gpu/run.sh [extra pytest arguments]
#
# Creates .venv at the repository root if it is missing (python3 -m venv; pip install -e '.[test]'),
# prints nvidia-smi, runs `pytest -v tests/gpu` under a timeout and exits with pytest's status.
# The JSON report (GPU model, driver, CUDA driver, timings, metric families present/absent) is
# written to ${OUT:-.}/gpu-report.json for docs/hardware-validation.md.
#
# Environment:
#   OUT                          directory of gpu-report.json (default: the repository root)
#   PYTHON                       interpreter that creates .venv (default: python3)
#   GPUFLEET_GPU_TESTS_TIMEOUT   seconds before pytest is stopped (default: 300)
#   GPUFLEET_GPU_TESTS_REQUIRED  1 (default here): no usable GPU fails the run instead of skipping it
#   GPUFLEET_GPU_TESTS_BACKEND   sim: run the suite against the simulator (no GPU needed)
#   GPUFLEET_GPU_TESTS_INTERVAL  seconds between the collections compared (default: 3)
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
out="${OUT:-.}"
mkdir -p "$out" || exit 2
report="$(cd "$out" && pwd)/gpu-report.json"

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 60 nvidia-smi || echo "(nvidia-smi exited with status $?)"
else
    echo "(nvidia-smi not found)"
fi

venv_ok() { .venv/bin/python -c 'import pynvml, pytest, prometheus_client, yaml' >/dev/null 2>&1; }
if ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
    echo "== creating .venv"
    "${PYTHON:-python3}" -m venv --clear .venv || { echo "cannot create .venv" >&2; exit 2; }
    .venv/bin/python -m pip install --quiet -e '.[test]' \
        || { echo "pip install -e '.[test]' failed (no network? preinstall the dependencies)" >&2; exit 2; }
elif ! venv_ok; then
    echo "== installing into the existing .venv"
    .venv/bin/python -m pip install --quiet -e '.[test]' || { echo "pip install failed" >&2; exit 2; }
fi
venv_ok || { echo ".venv lacks pynvml/pytest/prometheus_client/PyYAML" >&2; exit 2; }
.venv/bin/python -c 'import importlib.metadata as m; print("== nvidia-ml-py", m.version("nvidia-ml-py"))' || true

export GPUFLEET_GPU_REPORT="$report"
export GPUFLEET_GPU_TESTS_REQUIRED="${GPUFLEET_GPU_TESTS_REQUIRED:-1}"
limit="${GPUFLEET_GPU_TESTS_TIMEOUT:-300}"
echo "== pytest -v tests/gpu (timeout ${limit}s, report ${report})"
if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=15 "$limit" .venv/bin/python -m pytest -v tests/gpu "$@"
else
    .venv/bin/python -m pytest -v tests/gpu "$@"
fi
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "pytest stopped after ${limit}s (GPUFLEET_GPU_TESTS_TIMEOUT)" >&2
fi
exit "$rc"
