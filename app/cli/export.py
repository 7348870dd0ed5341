"""`mixquant export FILE --to comfyui --out NATIVE.safetensors`: the quantized denoiser in ComfyUI's own per-layer
quantized format (quant/native.py), loadable by the stock Load Diffusion Model node with no MixQuant installed."""
from __future__ import annotations

import os


def add_arguments(p):
    p.add_argument("file", help="a .safetensors file written by `mixquant quantize` or the ComfyUI Save node")
    p.add_argument("--to", required=True, choices=("comfyui",), help="the target format")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--list", action="store_true", help="list the layers that stay float and why, and the joined ones")


def run(args) -> int:
    from ...quant.errors import MixQuantError
    from ...quant.native import export_file

    if os.path.abspath(args.out) == os.path.abspath(args.file):
        raise MixQuantError("--out must be a different file than the input")
    s = export_file(args.file, args.out)
    fmts = ", ".join(f"{k} x{v}" for k, v in sorted(s["native_formats"].items())) or "none"
    print(f"wrote {args.out} ({s['file_bytes'] / 1e6:.2f} MB): {s['native_layers']} layers in native form "
          f"({fmts}; {s['native_bytes'] / 1e6:.2f} MB), {s['float_quantized_layers']} quantized layers kept float")
    print(f"names: {s['naming']}")
    if s["requantized"]:
        print(f"{len(s['requantized'])} exported layers join layers planned in different formats: parts requantized "
              "to the most precise of them (--list names them)")
    if s["native_layers"] == 0:
        print("note: no layer maps to a native format; quantize with --target comfyui-native for a plan made of "
              "W8A8d / W4g64A16 layers")
    if args.list:
        for name, why in s["float_layers"].items():
            print(f"  float  {name}: {why}")
        for name, why in s["requantized"].items():
            print(f"  joined {name}: {why}")
    return 0
