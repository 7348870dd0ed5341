"""Real bytes of the quantized layers of an SD1.5-architecture UNet (local config, random weights, no download):
FP16 vs W8 per-channel, W4 group-128 / group-64, W2 group-64. Measured from tensor storage, not bit counts.

    python bench/memory.py [--out bench/results/memory.md]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_name, sd15_unet  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "memory.md"))
    args = ap.parse_args(argv)
    from mixquant.quant.apply import quantize_model, tensor_bytes, uniform_plan
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.roles import discover_layers

    unet = sd15_unet()
    layers = [li for li in discover_layers(unet) if not li.protected]
    modules = dict(unet.named_modules())
    fp16 = tensor_bytes(t for li in layers for t in modules[li.name].state_dict(keep_vars=True).values())
    rows = [("FP16", fp16, 0.0)]
    for label, fmt in [("W8 per-channel", LayerFormat(8, 16)), ("W4 group-128", LayerFormat(4, 16, 128)),
                       ("W4 group-64", LayerFormat(4, 16, 64)), ("W2 group-64", LayerFormat(2, 16, 64))]:
        t0 = time.time()
        q, stats = quantize_model(unet, uniform_plan(layers, fmt), search="minmax")
        qm = dict(q.named_modules())
        real = tensor_bytes(t for li in layers for t in qm[li.name].state_dict(keep_vars=True).values())
        assert real == stats.bytes_after
        rows.append((label, real, time.time() - t0))
        del q
        gc.collect()
    n_params = sum(li.params for li in layers)
    lines = [f"# Quantized-layer memory, SD1.5-architecture UNet ({len(layers)} layers, {n_params / 1e6:.1f} M weights;"
             f" conv_in/conv_out kept FP16)", "",
             f"Measured with `python bench/memory.py` on {cpu_name()}, torch "
             f"{torch.__version__}. Bytes are the storage of every tensor of the quantized layers (packed codes, fp16 "
             "scales, uint8 zero points, fp16 bias).", "",
             "| format | bytes | MB | ratio vs FP16 | bits/weight (all tensors) |", "|---|---|---|---|---|"]
    for label, b, _ in rows:
        lines.append(f"| {label} | {b:,} | {b / 2**20:.1f} | {b / fp16:.3f} | {8 * b / n_params:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
