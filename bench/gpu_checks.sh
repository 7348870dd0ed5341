#!/usr/bin/env bash
# Every GPU check of the open issues in one run, for a session that is lent a GPU (the device machine has no network:
# nothing is installed beyond this checkout):
#   bash bench/gpu_checks.sh [OUT_DIR] [STEPS]   (default OUT_DIR: bench/results; $OUT on the device machine)
# = `python bench/gpu.py --out OUT_DIR [--only STEPS]` (its docstring lists the steps) after installing the checkout.
# Two device calls: `bash bench/gpu_checks.sh $OUT` (#21/#22, ~8 min), then `bash bench/gpu_checks.sh $OUT dit` (#23).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
python -c "import mixquant" 2>/dev/null || pip install -q --no-deps -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_checks_device.txt"
exec python bench/gpu.py --out "$OUT" ${2:+--only "$2"}
