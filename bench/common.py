"""Shared bits of the benchmarks: which machine, and the SD1.5-architecture UNet with random weights."""
from __future__ import annotations

import json
import os
import platform

import mixquant  # noqa: F401  (first: it hides our kernels/, bench/kernels.py, ... from `import kernels` etc., #20)
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SD15_CONFIG = os.path.join(HERE, "..", "configs", "sd15_unet.json")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
                    isa = [x for x in ("avx512_vnni", "avx512f", "amx_tile", "avx2") if f" {x}" in flags]
                    return f"{name} ({os.cpu_count()} cores; {', '.join(isa) or 'no AVX2'})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sd15_unet(dtype=torch.float16, device="cpu"):
    """SD1.5-architecture UNet2DConditionModel from the local config, random weights (seeded)."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.load(open(SD15_CONFIG)).items() if not k.startswith("_")}
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(cfg).to(device=device, dtype=dtype).eval()
