"""Choose an implementation for each quantized op: the first backend, in priority order, whose constraints accept
the call, else the reference. `MIXQUANT_KERNELS=reference` (or `use_backend("reference")`) forces the reference
everywhere; `MIXQUANT_KERNELS=cpu` / `triton` forces one backend (calls it does not accept still fall back to the
reference).

The registry (kernels/registry.py) holds the priority list, each backend's availability (probed once) and per op
its `Constraints` (data: devices, dtypes, weight bits, group sizes, activation modes and bits; plus rules for shapes
and the device's capability). This module declares the backends, in priority order:
- "gpu" (kernels/gpu_routes.py): CUDA tensors; per layer shape the fastest of the Triton kernels, int8
  `torch._int_mm`, fp8 `torch._scaled_mm` (fp8 formats, compute capability >= 8.9) and the float floor (dequantized
  weight, cuBLAS / cuDNN), raced on first use;
- "triton" (kernels/triton_gemm.py, triton_conv.py): CUDA tensors on compute capability >= 8.0 when forced
  (MIXQUANT_KERNELS=triton), or CPU tensors under TRITON_INTERPRET=1, for the tests;
- "cpu" (kernels/cpu_routes.py, cpu_ops.py): CPU tensors; the int8 route or float dtype measured fastest on this CPU;
- "reference" (kernels/reference.py): every call.
`explain()` says, per backend, whether it is available and what it takes; `path()` which implementation a call
would run; `describe()` which path each kind of quantized layer takes on this machine.

`cache`: a layer may pass a dict it owns (`dispatch.linear(x, cache=self._kernel_cache, ...)`); backends keep
per-layer prepared data in it (the CPU int8 routes: one prepacked int8 copy of the weight; Triton: the weight sums),
keyed as kernels/cache.py says: by the weight's data pointer and version counter so an in-place update (a LoRA
patch) invalidates it, and by `cache["epoch"]`, a value the layer changes whenever its weight may have changed where
pointer and version do not show it (a new weight at a freed one's address, a write through `.data`, an inference
tensor). Without it nothing is cached.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import cpu_routes, gpu_routes, reference  # (cpu_routes registers its compiled ops on import, before any trace)
from .reference import dequantize_weight
from .registry import OP_ARGS, Backend, Constraints, Registry

REGISTRY = Registry(priority=["gpu", "triton", "cpu", "reference"], fallback="reference")
register = REGISTRY.register
backends = REGISTRY.backends
use_backend = REGISTRY.use_backend  # force one backend ("reference" included) inside the block


select: Callable[..., tuple[str, Callable]] = REGISTRY.select  # select(op, **call) -> (backend name, implementation)
_forced_name = REGISTRY.forced


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


def linear(x: torch.Tensor, cache: dict | None = None, codes=None, **call) -> torch.Tensor:
    """Quantized linear. `call` holds qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale,
    a_zero, a_split (see kernels/reference.py for the layouts); `cache` is optional (module docstring). `codes`:
    x's int8 codes as the op that produced x wrote them (kernels/triton_fused.py): the Triton GEMM reads them
    instead of quantizing x; every other route ignores them."""
    return _call("linear", x, cache, codes, call)


def conv2d(x: torch.Tensor, cache: dict | None = None, codes=None, **call) -> torch.Tensor:
    """Quantized conv2d over NCHW x; `call` as for linear plus kernel_size, stride, padding, dilation. `codes`: as
    for linear (static codes of x zero-padded by the conv's padding, written by a fused GroupNorm + SiLU)."""
    return _call("conv2d", x, cache, codes, call)


def _call(op: str, x, cache, codes, call: dict):
    """The selected backend's `op`; fused codes go only to the backends that read them (Triton, the GPU race)."""
    name, impl = select(op, x=x, cache=cache, **call)
    if codes is not None and name in ("triton", "gpu"):
        return impl(x, cache=cache, codes=codes, **call)
    return impl(x, cache=cache, **call)


def bind(op: str, x: torch.Tensor, cache: dict | None = None, **call):
    """`op` (linear or conv2d, `call` as for them) resolved once for inputs of x's shape, strides, dtype and device:
    a callable f(x, codes=None) -> y that runs what `linear` / `conv2d` would run for such an input with these
    arguments while `state()` is unchanged, without choosing again (the backend, the GPU route, the Triton launch
    are fixed now). None where the choice cannot be fixed yet (a CUDA graph capture or a compile trace: those calls
    go through `linear` / `conv2d`). A quantized layer keeps it per input shape (quant/layers.py): the per-call
    Python of an eager call is then its launches (#22 item 4)."""
    name, impl = select(op, x=x, cache=cache, **call)
    if name == "gpu":
        return gpu_routes.bind(op, x, cache, call)
    if name == "triton":
        return bind_triton(op, x, cache, call)
    return lambda x, codes=None: impl(x, cache=cache, **call)


def bind_triton(op: str, x: torch.Tensor, cache: dict | None, call: dict):
    """The Triton kernels' call bound (as `bind`); None under torch.compile."""
    if torch.compiler.is_compiling():
        return None
    from . import triton_conv, triton_gemm
    wsum = triton_gemm.cached_weight_sums(cache, call)
    if op == "linear":
        return triton_gemm.bind_linear(x, **call, wsum=wsum)
    geometry = {g: tuple(call[g]) for g in ("kernel_size", "stride", "padding", "dilation")}
    return triton_conv.bind_conv2d(x, **(call | geometry), wsum=wsum)


def state() -> tuple:
    """What decides which implementation a call runs besides the call itself: the forced backend (use_backend /
    MIXQUANT_KERNELS) and the GPU's route plan. A bound call (`bind`) holds while this is the same."""
    return REGISTRY.forced(), gpu_routes.plan_serial()


def path(op: str, x: torch.Tensor, cache: dict | None = None, **call) -> str:
    """Which implementation this call would run, e.g. "triton", "cpu:onednn_split", "cpu:float", "reference"."""
    name, _ = select(op, x=x, cache=cache, **call)
    if name == "gpu":
        from . import gpu_routes
        route = gpu_routes.choose(op, x, cache=cache, **call)
        if route == "measure":
            route = " | ".join(gpu_routes.candidates(op, x, cache=cache, **call)) + " (raced per shape on first use)"
        return "gpu:" + route
    if name == "cpu":
        from . import cpu_routes
        route = cpu_routes.choose(op, x=x, cache=cache, **call)
        if route == "measure":
            route = " | ".join(cpu_routes.candidates(op, cache=cache, **call)) + " (raced per shape on first use)"
        return "cpu:" + route
    return name


# --- the backends ----------------------------------------------------------------------------------------------------
# Imported lazily: `import triton` costs a second, and neither backend's module is needed to use the reference.

def _triton_available():
    """Fixed for the process (CUDA devices, Triton installed, interpreter mode): the registry probes it once."""
    from . import triton_gemm
    if not triton_gemm.HAVE_TRITON:
        return "triton is not installed"
    if triton_gemm.interpreting():
        return None
    return triton_gemm.available()


def _on_a_triton_device(call):
    """the tensor's device runs the kernels (CUDA compute capability >= 8.0, or CPU under TRITON_INTERPRET=1)"""
    from . import triton_gemm
    return triton_gemm.available(call["x"].device)


def _width_matches(call):
    """input width == K"""
    return None if call["x"].shape[-1] == call["k"] else "input width does not match the weight"


def _conv_k_matches(call):
    """K == kh * kw * cin"""
    ks = call["kernel_size"]
    return None if call["k"] == ks[0] * ks[1] * call["x"].shape[1] else "weight K does not match kh * kw * cin"


def _integer_codes(call):
    """integer weight codes (not float8)"""
    from . import fp8
    return "float8 weights" if fp8.is_fp8(call["qweight"]) else None


def _rows_contiguous(call):
    """weight and scale rows contiguous along K"""
    if call["qweight"].stride(-1) != 1 or call["scale"].stride(-1) != 1:
        return "weight rows must be contiguous along K"
    return None


_FLOATS = frozenset((torch.float32, torch.float16, torch.bfloat16))
# the int8 dot's K step is 32: group-wise scales need groups of a multiple of it
_TRITON_FORMATS = dict(dtypes=_FLOATS, weight_on_x_device=True, bits=frozenset((2, 4, 8)), group_multiple=32,
                       a_modes=frozenset(("none", "static", "dynamic")), max_a_bits=8)
TRITON_CONSTRAINTS = {
    "linear": Constraints(rules=(_width_matches, _on_a_triton_device, _rows_contiguous, _integer_codes),
                          **_TRITON_FORMATS),
    "conv2d": Constraints(x_dims=4, rules=(_conv_k_matches, _on_a_triton_device, _rows_contiguous, _integer_codes),
                          **_TRITON_FORMATS)}
# every format: what the int8 routes do not take runs dequantize-then-matmul
CPU_CONSTRAINTS = dict.fromkeys(("linear", "conv2d"), Constraints(devices=frozenset(("cpu",)), dtypes=_FLOATS,
                                                                 weight_on_x_device=True))


# Under torch.compile the kernels run as torch.library custom ops (opaque to the compiler, no graph break); eager
# calls go to the wrappers directly: the custom-op machinery (autograd wrapper, redispatch, dynamo-disable guard)
# cost ~50 us per call of host time, about a third of the whole call (bench/overhead.py), which every layer pays
# without CUDA graphs. Both forms run the same wrapper and kernels.

def _triton_linear(x, cache=None, codes=None, **call):
    if torch.compiler.is_compiling():  # (the custom op; no weight sums: pointers and versions are not traceable)
        from . import triton_gemm
        return triton_gemm.linear_op()(x, **call, wsum=None)
    return bind_triton("linear", x, cache, call)(x, codes)


def _triton_conv2d(x, cache=None, codes=None, **call):
    if torch.compiler.is_compiling():
        from . import triton_conv
        geometry = {g: list(call.pop(g)) for g in ("kernel_size", "stride", "padding", "dilation")}
        return triton_conv.conv2d_op()(x, **call, wsum=None, **geometry)
    return bind_triton("conv2d", x, cache, call)(x, codes)


def _cpu_linear(x, cache=None, **call):
    if torch.compiler.is_compiling():  # (one op in the graph: see cpu_routes.compiled_op)
        return cpu_routes.compiled_op("linear")(x, *_op_args(call), None)
    return cpu_routes.linear(x, cache=cache, **call)


def _cpu_conv2d(x, cache=None, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), **call):
    if torch.compiler.is_compiling():  # (one op in the graph: see cpu_routes.compiled_op)
        return cpu_routes.compiled_op("conv2d")(x, *_op_args(call), None, list(kernel_size), list(stride),
                                                list(padding), list(dilation))
    return cpu_routes.conv2d(x, cache=cache, kernel_size=kernel_size, stride=stride, padding=padding,
                             dilation=dilation, **call)


def _op_args(call: dict) -> list:
    """The custom op's arguments after x, in its schema's order (kernels/registry.OP_ARGS)."""
    return [call[k] for k in OP_ARGS]


def _gpu_available():
    return None if torch.cuda.is_available() else "no CUDA device"


def _gpu_linear(x, **call):
    from . import gpu_routes
    return gpu_routes.linear(x, **call)


def _gpu_conv2d(x, **call):
    from . import gpu_routes
    return gpu_routes.conv2d(x, **call)


# every format on a CUDA tensor (the float floor takes what the faster routes do not)
GPU_CONSTRAINTS = dict.fromkeys(("linear", "conv2d"), Constraints(devices=frozenset(("cuda",)), dtypes=_FLOATS,
                                                                 weight_on_x_device=True))
register(Backend("gpu", _gpu_available, {"linear": _gpu_linear, "conv2d": _gpu_conv2d}, GPU_CONSTRAINTS))
register(Backend("triton", _triton_available, {"linear": _triton_linear, "conv2d": _triton_conv2d},
                 TRITON_CONSTRAINTS))
register(Backend("cpu", lambda: None, {"linear": _cpu_linear, "conv2d": _cpu_conv2d}, CPU_CONSTRAINTS))
register(Backend("reference", lambda: None, _REFERENCE))  # takes every call


def _register_triton_ops() -> None:
    """Where the Triton backend can run (a CUDA device, or the interpreter), its custom ops are registered now: the
    first call under torch.compile would otherwise register them inside dynamo's trace, a graph break (an error with
    fullgraph=True). Elsewhere nothing is imported (`import triton` costs a second)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return
    if REGISTRY.why_unavailable("triton") is None:
        from . import triton_conv, triton_gemm
        triton_gemm.linear_op()
        triton_conv.conv2d_op()


_register_triton_ops()


def explain() -> list[dict]:
    """Per backend, in priority order: available or why not, the ops it implements and what each accepts."""
    rows = []
    for b in backends():
        why = REGISTRY.why_unavailable(b.name)
        rows.append({"backend": b.name, "available": why is None, "why_not": why, "ops": sorted(b.ops),
                     "accepts": {op: b.constraints[op].describe() if op in b.constraints else "any call"
                                 for op in sorted(b.ops)}})
    return rows


# representative layers for describe(): (label, op, format kwargs, layer geometry)
_KINDS = [("W8A8 static", dict(bits=8, a_mode="static")), ("W8A8 dynamic", dict(bits=8, a_mode="dynamic")),
          ("W4A8 g64", dict(bits=4, group_size=64, a_mode="static")),
          ("W4A8 per-channel", dict(bits=4, a_mode="dynamic")),
          ("W8A16", dict(bits=8, a_mode="none")), ("W4A16 g64", dict(bits=4, group_size=64, a_mode="none")),
          ("W8A8d fp8", dict(bits=8, a_mode="fp8_dynamic", fp8=True)),
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
        lines += [f"{'':<10} {op} takes: {text}" for op, text in row["accepts"].items()]
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
        from . import cpu_routes
        lines.append("")
        lines.append(cpu_routes.plan().describe())
    if any(d.type == "cuda" for d in devices):
        from . import gpu_routes
        lines.append("")
        lines.append(gpu_routes.describe())
    for d in devices:
        lines.append("")
        lines.append(f"paths on {d}:")
        for r in path_table(d):
            lines.append(f"  {r['layer']:<18} {r['op']:<7} -> {r['path']}")
    return "\n".join(lines)
