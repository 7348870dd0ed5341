"""Choose an implementation for each quantized op: a fast backend whose constraints accept the call, else the
reference. `MIXQUANT_KERNELS=reference` (or `use_backend("reference")`) forces the reference everywhere;
`MIXQUANT_KERNELS=cpu` / `triton` forces one backend (calls it does not accept still fall back to the reference).

A backend is a name plus two callables per op: `accepts(**call) -> str | None` (None = accepted, else why not) and
the op itself. Backends register in priority order; `explain()` says, per backend and op, what it would take, and
`describe()` which path each kind of quantized layer takes on this machine.

Registered here, in priority order:
- "triton" (kernels/triton_gemm.py, triton_conv.py): CUDA tensors on compute capability >= 8.0 (or CPU tensors
  under TRITON_INTERPRET=1, for the tests);
- "cpu" (kernels/cpu.py): CPU tensors; the int8 route or float dtype measured fastest on this CPU.

`cache`: a layer may pass a dict it owns (`dispatch.linear(x, cache=self._kernel_cache, ...)`); backends keep
per-layer prepared data in it (the CPU int8 routes: one prepacked int8 copy of the weight), keyed by the weight's
data pointer and version counter so an in-place update (a LoRA patch) invalidates it, and by `cache["epoch"]`, a
value the layer changes whenever its weight may have changed where pointer and version do not show it (a new
weight at a freed one's address, a write through `.data`, an inference tensor). Without it nothing is cached.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .reference import dequantize_weight


@dataclass
class Backend:
    name: str
    available: Callable[[], str | None]  # None when usable on this machine, else the reason
    ops: dict = field(default_factory=dict)  # op name -> (accepts, impl)


_BACKENDS: list[Backend] = []
_forced: list[str | None] = [None]


def register(backend: Backend, first: bool = True) -> None:
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def backends() -> list[Backend]:
    return list(_BACKENDS)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force one backend ("reference" included) inside the block."""
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _forced_name() -> str | None:
    return _forced[-1] or os.environ.get("MIXQUANT_KERNELS") or None


def select(op: str, **call) -> tuple[str, Callable]:
    forced = _forced_name()
    if forced != "reference":
        for b in _BACKENDS:
            if forced and b.name != forced:
                continue
            if op not in b.ops or b.available() is not None:
                continue
            accepts, impl = b.ops[op]
            if accepts(**call) is None:
                return b.name, impl
    return "reference", _REFERENCE[op]


def _ref_linear(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                cache=None):
    w = dequantize_weight(qweight, scale, zero, bits, k, group_size)
    return reference.linear(x, w, bias, a_bits, a_mode, a_scale, a_zero, a_split)


def _ref_conv2d(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                kernel_size, stride, padding, dilation, cache=None):
    w = dequantize_weight(qweight, scale, zero, bits, k, group_size)
    return reference.conv2d(x, w, bias, kernel_size, stride, padding, dilation, a_bits, a_mode, a_scale, a_zero,
                            a_split)


_REFERENCE = {"linear": _ref_linear, "conv2d": _ref_conv2d}


def linear(x: torch.Tensor, cache: dict | None = None, **call) -> torch.Tensor:
    """Quantized linear. `call` holds qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale,
    a_zero, a_split (see kernels/reference.py for the layouts); `cache` is optional (module docstring)."""
    _, impl = select("linear", x=x, cache=cache, **call)
    return impl(x, cache=cache, **call)


def conv2d(x: torch.Tensor, cache: dict | None = None, **call) -> torch.Tensor:
    """Quantized conv2d over NCHW x; `call` as for linear plus kernel_size, stride, padding, dilation."""
    _, impl = select("conv2d", x=x, cache=cache, **call)
    return impl(x, cache=cache, **call)


def path(op: str, x: torch.Tensor, cache: dict | None = None, **call) -> str:
    """Which implementation this call would run, e.g. "triton", "cpu:onednn_split", "cpu:float", "reference"."""
    name, _ = select(op, x=x, cache=cache, **call)
    if name == "cpu":
        from . import cpu
        route = cpu.choose(op, x=x, cache=cache, **call)
        if route == "measure":
            route = " | ".join(cpu.candidates(op, cache=cache, **call)) + " (raced per shape on first use)"
        return "cpu:" + route
    return name


# --- the backends ----------------------------------------------------------------------------------------------------
# Imported lazily: `import triton` costs a second, and neither backend's module is needed to use the reference.

_TRITON_WHY: list = []  # fixed for the process (CUDA devices, Triton installed, interpreter mode): probed once


def _triton_available():
    if not _TRITON_WHY:
        _TRITON_WHY.append(_probe_triton())
    return _TRITON_WHY[0]


def _probe_triton():
    from . import triton_gemm
    if not triton_gemm.HAVE_TRITON:
        return "triton is not installed"
    if triton_gemm.interpreting():
        return None
    return triton_gemm.available()


def _triton_linear_accepts(**call):
    from . import triton_gemm
    return triton_gemm.accepts(**call)


def _triton_conv_accepts(**call):
    from . import triton_conv
    return triton_conv.accepts(**call)


def _triton_wsum(cache, call):
    """The weight column sums a static zero point needs, kept in the layer's cache (else summed in the K loop)."""
    from .cpu import _cache_key, _cached, weight_keeps_moving
    if cache is None or call.get("a_mode") != "static" or weight_keeps_moving(cache) \
            or torch.compiler.is_compiling():  # (data pointers and version counters are not traceable)
        return None  # the K loop sums the weight tiles itself
    from . import triton_gemm
    q, scale = call["qweight"], call["scale"]
    return _cached(cache, "triton_wsum", _cache_key(q, scale, (str(q.device),)),
                   lambda: triton_gemm.weight_sums(q, call["zero"], call["bits"], call["k"], call["group_size"],
                                                   scale.shape[1]))


# Under torch.compile the kernels run as torch.library custom ops (opaque to the compiler, no graph break); eager
# calls go to the wrappers directly: the custom-op machinery (autograd wrapper, redispatch, dynamo-disable guard)
# cost ~50 us per call of host time, about a third of the whole call (bench/overhead.py), which every layer pays
# without CUDA graphs. Both forms run the same wrapper and kernels.

def _triton_linear(x, cache=None, **call):
    from . import triton_gemm
    wsum = _triton_wsum(cache, call)
    if torch.compiler.is_compiling():
        return triton_gemm.linear_op()(x, **call, wsum=wsum)
    return triton_gemm.qlinear(x, **call, wsum=wsum)


def _triton_conv2d(x, cache=None, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), **call):
    from . import triton_conv
    wsum = _triton_wsum(cache, call)
    if torch.compiler.is_compiling():
        return triton_conv.conv2d_op()(x, **call, wsum=wsum, kernel_size=list(kernel_size), stride=list(stride),
                                       padding=list(padding), dilation=list(dilation))
    return triton_conv.qconv2d(x, **call, wsum=wsum, kernel_size=tuple(kernel_size), stride=tuple(stride),
                               padding=tuple(padding), dilation=tuple(dilation))


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _cpu_accepts(*, x, bits, **call):
    if x.device.type != "cpu":
        return "tensor is not on the CPU"
    if x.dtype not in _FLOATS:
        return f"activation dtype {x.dtype}"
    if call.get("qweight") is not None and call["qweight"].device.type != "cpu":
        return "weight is not on the CPU"
    return None


def _cpu_linear(x, **call):
    from . import cpu
    return cpu.linear(x, **call)


def _cpu_conv2d(x, **call):
    from . import cpu
    return cpu.conv2d(x, **call)


register(Backend("cpu", lambda: None, {"linear": (_cpu_accepts, _cpu_linear),
                                       "conv2d": (_cpu_accepts, _cpu_conv2d)}), first=False)
register(Backend("triton", _triton_available, {"linear": (_triton_linear_accepts, _triton_linear),
                                               "conv2d": (_triton_conv_accepts, _triton_conv2d)}), first=True)


def explain() -> list[dict]:
    """Per backend: available or why not, and the ops it implements."""
    rows = []
    for b in _BACKENDS:
        why = b.available()
        rows.append({"backend": b.name, "available": why is None, "why_not": why, "ops": sorted(b.ops)})
    rows.append({"backend": "reference", "available": True, "why_not": None, "ops": sorted(_REFERENCE)})
    return rows


# representative layers for describe(): (label, op, format kwargs, layer geometry)
_KINDS = [("W8A8 static", dict(bits=8, a_mode="static")), ("W8A8 dynamic", dict(bits=8, a_mode="dynamic")),
          ("W4A8 g64", dict(bits=4, group_size=64, a_mode="static")),
          ("W4A8 per-channel", dict(bits=4, a_mode="dynamic")),
          ("W8A16", dict(bits=8, a_mode="none")), ("W4A16 g64", dict(bits=4, group_size=64, a_mode="none")),
          ("W2A16 g64", dict(bits=2, group_size=64, a_mode="none"))]


def path_table(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, cache: bool = True) -> list:
    """Per kind of quantized layer (format x linear / conv 3x3): the path a call takes on `device`, as the layer
    would call it (with a cache dict when `cache`)."""
    from .synthetic import conv_geometry, random_call

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    rows = []
    for label, fmt in _KINDS:
        for op in ("linear", "conv2d"):
            k = 64 * 9 if op == "conv2d" else 640
            call = random_call(64, k, device=device, **fmt)
            if op == "linear":
                x = torch.zeros(8, k, device=device, dtype=dtype)
                extra = {}
            else:
                x = torch.zeros(1, 64, 8, 8, device=device, dtype=dtype)
                extra = conv_geometry(3, 1, 1)
            rows.append({"layer": label, "op": op,
                         "path": path(op, x, cache={} if cache else None, **call, **extra)})
    return rows


def describe(device: str | torch.device | None = None) -> str:
    """Text for `mixquant inspect --kernels`: backends, the CPU's measured plan, and the path per layer kind."""
    lines = []
    for row in explain():
        state = "available" if row["available"] else f"unavailable ({row['why_not']})"
        lines.append(f"{row['backend']:<10} {state}; ops: {', '.join(row['ops'])}")
    forced = _forced_name()
    if forced:
        lines.append(f"forced: {forced} (MIXQUANT_KERNELS / use_backend)")
    from . import triton_gemm
    if triton_gemm.HAVE_TRITON and torch.cuda.is_available():
        lines.append("triton launch configs: " + ("autotuned per shape (MIXQUANT_AUTOTUNE=1)" if triton_gemm.autotuning()
                                                  else "one heuristic config per call (MIXQUANT_AUTOTUNE=1 to tune)"))
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    if any(d.type == "cpu" for d in devices):
        from . import cpu
        lines.append("")
        lines.append(cpu.plan().describe())
    for d in devices:
        lines.append("")
        lines.append(f"paths on {d}:")
        for r in path_table(d):
            lines.append(f"  {r['layer']:<18} {r['op']:<7} -> {r['path']}")
    return "\n".join(lines)
