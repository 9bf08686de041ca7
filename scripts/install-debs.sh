#!/usr/bin/env bash
# Install the Debian packages gpufleet's tests and demo use, only those missing.
# Idempotent: a second run installs nothing. Without root it lists what is missing
# and how to install it, and exits 0 so the rest of the setup can go on.
set -euo pipefail

PACKAGES=(python3-venv prometheus prometheus-alertmanager prometheus-node-exporter slurm-wlm munge slurmrestd)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

# kubectl renders deploy/kubernetes (`kubectl kustomize`, kustomize v5 built in). Debian 12's
# kubernetes-client is 1.20 (kustomize v2, too old for these overlays), so it is not
# installed here: say so, and the manifest tests skip with the same message.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: note: no kubectl on PATH; tests/test_kubernetes_manifests.py will skip" \
       "(install kubectl >= 1.27 from the Kubernetes project's packages to run them)" >&2
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: Debian packages present (${PACKAGES[*]})"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing Debian packages: ${missing[*]}" >&2
  echo "setup: as root run: apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo "setup: tests that need them will be skipped (and fail under CI=true)" >&2
  exit 0
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Debian starts packaged daemons on install where an init system runs; the tests and
# the demo start their own on loopback, so keep the packaged ones from starting.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -q --no-install-recommends "${missing[@]}"
