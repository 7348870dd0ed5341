#!/usr/bin/env bash
# Every GPU check of the open issues in one run, under 8 minutes on an H100/H200, for a session that is lent one:
#   bash bench/gpu_checks.sh [OUT_DIR]        (default OUT_DIR: bench/results; $OUT on the device machine)
# Assumes torch with CUDA and triton are installed (the device machine has no network: nothing is installed here
# beyond this checkout, `pip install --no-deps -e .`). Each step has its own time limit, so one that hangs or fails
# leaves the others' tables; the log of each step is written next to its table.
#  1. #21: the method at SDXL scale: bench/scale.py on the SDXL-architecture UNet (real widths, random weights) at
#     1024x1024, 8 prompts x 20 steps, fp16: seconds and CUDA peak of each phase vs plain FP sampling.
#  2. #22: kernel and UNet-step speed vs FP16 (bench/kernels.py --device cuda --quick).
#  3. #22: plans made with the speed target on the GPU (bench/speed.py --device cuda --models sd15: the
#     SD1.5-architecture UNet at 128x128 latents, batch 2: predicted vs measured speed, W8A8 and the avg-W4 plan vs
#     FP16; the layers run the raced GPU routes, kernels/gpu_routes.py).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python -c "import mixquant" 2>/dev/null || pip install -q --no-deps -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_checks_device.txt"
step() {  # step NAME SECONDS command...
  local name=$1 secs=$2
  shift 2
  echo "== $name (at most ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/${name}.log" 2>&1
  echo "   exit $? after $((SECONDS - t0))s; log: $OUT/${name}.log"
  tail -n 25 "$OUT/${name}.log"
}
step scale_gpu 260 python bench/scale.py --models sdxl --real --size 1024 --prompts 8 --steps 20 \
  --out "$OUT/scale_gpu.md"
step kernels_gpu 100 python bench/kernels.py --device cuda --quick --out "$OUT/kernels_gpu_quick.md"
step speed_gpu 120 python bench/speed.py --device cuda --models sd15 --out "$OUT/speed_gpu.md"
