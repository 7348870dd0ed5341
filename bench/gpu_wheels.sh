#!/usr/bin/env bash
# Here, before a device call: the Python packages the GPU checks need that the device machine's image lacks, as
# wheels in .whl/ (.gitignore lists it; the call carries it):
#   bash bench/gpu_wheels.sh
#   device run: command "bash bench/gpu_checks.sh $OUT", carry [".whl"]
# The image (Python 3.12 with torch, triton, transformers, safetensors, scipy, ...) has no diffusers or torchao.
# comfy-kitchen's wheel (68 MB) is over the 64 MiB a call carries: the comfy-kitchen int8 columns skip there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==0.42.1" "importlib_metadata" "torchao==0.17.0"
ls -l .whl
