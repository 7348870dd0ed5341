"""Host-side (Python) cost of one quantized call on the Triton path, without a GPU.

    python bench/overhead.py [--calls N] [--out FILE]

Without CUDA graphs (ComfyUI's default) every quantized layer pays this per call before its kernels start; on an
H100 it made small layers 10-50x slower than cuBLAS (bench/results/kernels_h100.md, eager column). The Python part
does not need a GPU to be measured: this runs the dispatcher and the Triton wrappers on CPU tensors under
TRITON_INTERPRET=1 (so the Triton backend accepts them) with the kernel launches replaced by no-ops, and the
content fingerprint the CPU adds to cache keys switched off (a GPU has none). What is left out: Triton's own
launcher (binding ~40 arguments) and the CUDA launch itself. Baseline in the same process: one eager F.linear call
on tiny tensors (the floor of any PyTorch op call). Numbers are per call, best of 9 rounds run in turns.

Rows: the kernel call through dispatch (`dispatch.linear` / `conv2d`, resolved on every call); the same call
through the torch.library custom op (the form torch.compile sees; eager calls skip it); and the whole quantized
layer's forward as a model calls it on a GPU, through the GPU backend (its route decided, here Triton) and the call
the layer bound at its first call (#22 item 4): what a layer pays per call in an eager UNet step besides its
launches. Every row runs under torch.inference_mode, as ComfyUI runs its nodes.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton backend accepts CPU tensors
os.environ.setdefault("MIXQUANT_CPU_CACHE", "")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_name  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _loop(fn, calls: int):
    def run():
        for _ in range(calls):
            fn()
    return run


def measure(calls: int) -> list[str]:
    from mixquant.kernels import cache as kernel_cache
    from mixquant.kernels import cpu_routes as cpu
    from mixquant.kernels import dispatch, triton_conv, triton_gemm
    from mixquant.kernels.synthetic import conv_geometry, random_call
    if not triton_gemm.HAVE_TRITON:
        return ["Triton is not installed: nothing to measure."]
    triton_gemm._qgemm_kernel = _NoLaunch()
    triton_gemm._quant_rows_kernel = _NoLaunch()
    triton_conv._qconv_kernel = _NoLaunch()
    kernel_cache.fingerprint = lambda t: None  # as on a GPU
    a, b = torch.randn(1, 1), torch.randn(1, 1)
    fns = {"baseline": lambda: F.linear(a, b)}
    geo = conv_geometry(3, 1, 1)
    cases = [("linear W8A8 static, M=512, K=N=1280", "linear", dict(bits=8, a_mode="static"), (512, 1280), 1280),
             ("linear W8A8 dynamic, M=512, K=N=1280", "linear", dict(bits=8, a_mode="dynamic"), (512, 1280), 1280),
             ("linear W4A16 g64, M=512, K=N=1280", "linear", dict(bits=4, group_size=64, a_mode="none"),
              (512, 1280), 1280),
             ("conv 3x3 W8A8 static, 2x640x16x16", "conv", dict(bits=8, a_mode="static"), (2, 640, 16, 16), 640)]
    for label, op, fmt, shape, n in cases:
        x = torch.randn(*shape)
        k = shape[1] * (9 if op == "conv" else 1)
        call = random_call(n, k, **fmt)
        cache = {"epoch": (1, 0)}
        if op == "linear":
            fns[label] = lambda x=x, call=call, cache=cache: dispatch.linear(x, cache=cache, **call)
        else:
            fns[label] = lambda x=x, call=call, cache=cache: dispatch.conv2d(x, cache=cache, **call, **geo)
        assert dispatch.path(op if op == "linear" else "conv2d", x, **call,
                             **({} if op == "linear" else geo)).startswith("triton")
    x = torch.randn(512, 1280)
    call = random_call(1280, 1280, bits=8, a_mode="static")
    op = triton_gemm.linear_op()
    fns["the first row's linear through the custom op (as under torch.compile)"] = \
        lambda: op(x, **call, wsum=None)
    fns.update(_layer_calls())
    # best of 9 rounds, every row and the baseline in turns (a noisy neighbour slows all alike)
    with torch.inference_mode():  # (as ComfyUI runs every node)
        us = {k: v * 1e3 / calls for k, v in cpu.race({k: _loop(f, calls) for k, f in fns.items()},
                                                       rounds=9).items()}
    base = us.pop("baseline")
    lines = [f"CPU: {cpu_name()}, torch {torch.__version__}, 1 thread. Baseline: eager F.linear on 1x1 tensors "
             f"{base:.1f} us per call.", "",
             "| call | us per call | × baseline |", "|---|---|---|"]
    lines += [f"| {label} | {v:.1f} | {v / base:.1f}× |" for label, v in us.items()]
    return lines


def _layer_calls() -> dict:
    """Whole quantized layers called as a model calls them on a GPU (module docstring): the GPU backend registered
    for CPU tensors, its route forced to Triton (the one that binds the launches; the others are torch calls)."""
    import torch.nn as nn

    from mixquant.kernels import dispatch, gpu_routes
    from mixquant.kernels.registry import Backend, Constraints
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.layers import QuantConv2d, QuantLinear

    gpu = dispatch.REGISTRY.backends()[0]
    dispatch.register(Backend("gpu", lambda: None, gpu.ops,
                              dict.fromkeys(gpu.ops, Constraints(devices=frozenset(("cpu",))))))
    gpu_routes.plan().forced = "triton"
    torch.manual_seed(0)
    layers = {}
    for label, make, shape in [("linear", lambda: nn.Linear(1280, 1280), (2, 256, 1280)),
                               ("conv 3x3", lambda: nn.Conv2d(640, 640, 3, padding=1), (2, 640, 16, 16))]:
        for fname, fmt in [("W8A8 static", LayerFormat(8, 8)), ("W4A8 g64", LayerFormat(4, 8, 64)),
                           ("W8A8 dynamic", LayerFormat(8, 8, None, "dynamic"))]:
            if label.startswith("conv") and fname.endswith("dynamic"):
                continue  # (its per-image scale is a real reduction on the CPU: not host overhead)
            q = (QuantLinear if label == "linear" else QuantConv2d).from_float(make(), fmt)
            q.set_act_range(torch.tensor(-3.0), torch.tensor(3.0))
            x = torch.randn(*shape)
            with torch.inference_mode():
                q(x)
                assert dispatch.path("linear" if label == "linear" else "conv2d", x,
                                     **q._kernel_args(q.weight, q.bias, x.device),
                                     **({} if label == "linear" else dict(kernel_size=q.kernel_size, stride=q.stride,
                                                                         padding=q.padding, dilation=q.dilation))
                                     ) == "gpu:triton"
            layers[f"{label} layer {fname}, {'x'.join(map(str, shape))} (GPU backend)"] = (q, x)

    return {label: (lambda q=q, x=x: q(x)) for label, (q, x) in layers.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", help="write the table (markdown) here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = measure(args.calls)
    text = "\n".join(["## Host-side cost of a quantized call (Triton path, launches stubbed)", ""] + lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
