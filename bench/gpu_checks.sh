#!/usr/bin/env bash
# Every GPU check of the open issues in one run, for a session that is lent a GPU. The device machine has no network
# and lacks some packages: first, here, `bash bench/gpu_wheels.sh` (wheels into .whl/), then one device call:
#   command "bash bench/gpu_checks.sh $OUT", carry [".whl"], timeout_s 600
# = `python3 bench/gpu.py --out OUT_DIR [--only STEPS]` (its docstring lists the steps, ~8 min) after putting the
# carried wheels and this checkout (as the package `mixquant`, not installed: pip would fetch build tools) on the path.
#   bash bench/gpu_checks.sh [OUT_DIR] [STEPS]   (default OUT_DIR: bench/results)
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mq-site \
    .whl/*.whl && export PYTHONPATH="/tmp/mq-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import mixquant" 2>/dev/null; then
  mkdir -p /tmp/mq-pkg && ln -sfn "$PWD" /tmp/mq-pkg/mixquant && export PYTHONPATH="/tmp/mq-pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import mixquant, diffusers, torch, triton; print('mixquant', mixquant.__file__, '| diffusers',
diffusers.__version__, '| torch', torch.__version__, '| triton', triton.__version__)" \
  || echo "a package is missing (see above): bench/gpu_wheels.sh fetches what the device lacks"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_checks_device.txt"
exec "$PY" bench/gpu.py --out "$OUT" ${2:+--only "$2"}
