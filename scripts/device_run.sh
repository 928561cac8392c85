#!/usr/bin/env bash
# The one call on a lent GPU machine (docs/device.md): installs the wheels that
# scripts/device_wheels.sh put in .whl/ (carried with the call) into a temporary folder,
# then runs the device benchmark, its log under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
site="$(mktemp -d)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 scripts/bench_device.py "$@" 2>&1 | tee "${OUT:-.}/bench_device.log"
