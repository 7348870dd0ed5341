"""`mixquant inspect FILE` — what a quantized file holds: base model, architecture, per-layer formats and sizes.
`mixquant inspect --kernels` — which compute path each quantized op takes on this machine."""
from __future__ import annotations

import json
import os
from collections import Counter


def add_arguments(p):
    p.add_argument("file", nargs="?", help="a .safetensors file written by `mixquant quantize`")
    p.add_argument("--layers", action="store_true", help="list every layer")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.add_argument("--kernels", action="store_true", help="show the kernel backends and what they accept here")


def _layer_bytes(e: dict) -> tuple[int, int]:
    from ...quant.formats import LayerFormat

    fmt = LayerFormat.from_dict(e["format"])
    k = e["in"] * (e["kernel_size"][0] * e["kernel_size"][1] if e["kind"] == "conv2d" else 1)
    return k * e["out"], fmt.weight_bytes(e["out"], k)


def run(args) -> int:
    from ...quant.errors import MixQuantError
    from ...quant.fileformat import read_header
    from ...quant.formats import LayerFormat

    if args.kernels:
        from ...kernels import dispatch

        print(dispatch.describe())  # backends, this CPU's measured plan, the path each kind of layer takes
        if not args.file:
            return 0
    if not args.file:
        raise MixQuantError("give a file to inspect (or --kernels)")
    meta = read_header(args.file)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    arch = meta["architecture"]
    layers = meta["layers"]
    print(f"file:          {args.file} ({os.path.getsize(args.file) / 1e6:.2f} MB on disk)")
    print(f"format:        mixquant v{meta['format_version']}")
    print(f"architecture:  {arch.get('library', '?')} {arch.get('class', '?')}")
    print(f"base model:    fingerprint {meta['base_model'].get('id', '?')}")
    extra = meta.get("extra", {})
    if extra.get("model"):
        print(f"made from:     {extra['model']}")
    counts = Counter()
    params = wbytes = 0
    for e in layers.values():

        counts[LayerFormat.from_dict(e["format"]).name] += 1
        n, b = _layer_bytes(e)
        params += n
        wbytes += b
    print(f"quantized:     {len(layers)} layers, {params / 1e6:.2f} M weights in {wbytes / 1e6:.2f} MB "
          f"({wbytes / max(1, 2 * params):.3f} x fp16), avg {8 * wbytes / max(1, params):.2f} bits/weight incl. scales")
    print("formats:       " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if isinstance(extra.get("speed"), dict):
        from ...quant.speed import speed_text
        try:
            print("when made:     " + speed_text(extra["speed"]).replace("\n", "\n               "))
        except (KeyError, TypeError, ValueError):
            pass  # a file from another version: its speed summary is not shown
    times = extra.get("layer_times_ms") if isinstance(extra.get("layer_times_ms"), dict) else {}
    if args.layers:
        for name, e in layers.items():
            n, b = _layer_bytes(e)
            t = times.get(name)
            timed = (f"  {t[0]:.3f} ms ({t[1] / t[0]:.2f}x its float time)" if isinstance(t, list) and len(t) == 2
                     and all(isinstance(v, (int, float)) and v > 0 for v in t) else "")
            print(f"  {name:<70} {e['kind']:<7} {LayerFormat.from_dict(e['format']).name:<10} {b:>10,d} B{timed}")
    return 0
