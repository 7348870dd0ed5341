"""Which route each quantized call takes on a CUDA GPU, chosen by measurement at the first call of each layer shape,
as kernels/cpu_routes.py does on the CPU.

Candidates (`candidates`):
- "triton": our Triton GEMM / implicit-GEMM conv kernels (kernels/triton_gemm.py, triton_conv.py), where they take
  the call;
- "int_mm": int8 `torch._int_mm` (cuBLASLt) for linear layers with one weight scale per output channel and 8-bit
  activations (kernels/cpu_ops.py's int_mm route: the same code on any device);
- "scaled_mm": fp8 `torch._scaled_mm` (cuBLASLt, row-wise scales) for linear layers of an fp8 format with e4m3
  activations, on GPUs with fp8 tensor cores (compute capability >= 8.9; kernels/fp8.py);
- "float": the floor every format has: the weight dequantized to the activations' float dtype, the activations
  fake-quantized, and cuBLAS / cuDNN (the reference's math in that dtype). It is always a candidate, so a layer never
  runs a route slower than its float floor.

The first call of an undecided shape (`cpu_routes.shape_key`) races the candidates (synchronised timing,
kernels/timing.py); a candidate that fails is dropped. The winner is kept per shape, in memory and in
~/.cache/mixquant/gpu_routes.json (MIXQUANT_GPU_CACHE; "" disables it) per GPU, CUDA and torch version. While a CUDA
graph is captured or torch.compile traces, nothing is raced: an undecided shape takes "triton" where it can, else
"float". MIXQUANT_GPU_ROUTE forces a route where it can run.
"""
from __future__ import annotations

import itertools
import os

import torch

from . import cpu_ops, fp8, timing
from .cache import weight_keeps_moving
from .cpu_routes import int_route_accepts, shape_key

ROUTES = ("triton", "int_mm", "scaled_mm", "float")


def _triton_accepts(op: str, x, call: dict) -> bool:
    from . import dispatch, triton_gemm

    if not triton_gemm.HAVE_TRITON or dispatch.REGISTRY.why_unavailable("triton") is not None:
        return False
    return dispatch.TRITON_CONSTRAINTS[op].check({"x": x, **call}) is None


def candidates(op: str, x, cache=None, **call) -> list:
    """The routes that can run this call here, the float floor last."""
    out = ["triton"] if _triton_accepts(op, x, call) else []
    if op == "linear" and int_route_accepts(op, "int_mm", cache=cache, **call) is None \
            and call["k"] % 8 == 0 and call["qweight"].shape[0] % 8 == 0:
        out.append("int_mm")
    if _scaled_mm_accepts(op, x, call):
        out.append("scaled_mm")
    return out + ["float"]


def _scaled_mm_accepts(op: str, x, call: dict) -> bool:
    """An fp8 linear with e4m3 activations in one range, dims the fp8 GEMM takes (multiples of 16, and a weight row
    stride too: rows under 512 bytes are packed unpadded, kernels/packing.py), on fp8 cores."""
    return (op == "linear" and fp8.is_fp8(call["qweight"]) and call["a_mode"] in fp8.MODES
            and call.get("a_split") is None and call["k"] % 16 == 0 and call["qweight"].shape[0] % 16 == 0
            and call["qweight"].stride(0) % 16 == 0
            and fp8.scaled_mm_supported(x.device))


def run(op: str, route: str, x, cache=None, **call):
    """The call by `route`."""
    if route == "triton":
        from . import dispatch
        return (dispatch._triton_linear if op == "linear" else dispatch._triton_conv2d)(x, cache=cache, **call)
    if route == "int_mm":
        return cpu_ops.linear_int_mm(x, cache=cache, **call)
    if route == "scaled_mm":
        return fp8.linear_scaled_mm(x, cache=cache, **call)
    fn = cpu_ops.linear_float if op == "linear" else cpu_ops.conv2d_float
    return fn(x, cache=cache, dtype=x.dtype, **call)


class GpuPlan:
    """Per-shape decisions for this process's GPU (loaded from and saved to the decisions file)."""

    def __init__(self):
        self.decisions: dict = {}
        self.timings_ms: dict = {}
        self.forced = os.environ.get("MIXQUANT_GPU_ROUTE") or None
        if self.forced and self.forced not in ROUTES:
            raise ValueError(f"MIXQUANT_GPU_ROUTE must be one of {ROUTES}, got {self.forced!r}")
        self.decisions.update(_load(machine_key()))
        self.serial = next(_SERIAL)  # (bound calls hold while the plan is the same one: plan_serial)


_PLAN: list = []
_SERIAL = itertools.count(1)


def plan(refresh: bool = False) -> GpuPlan:
    if not _PLAN or refresh:
        _PLAN[:] = [GpuPlan()]
    return _PLAN[0]


def plan_serial() -> int:
    """Which plan is current (0 before the first): it changes when the plan is made anew (`plan(refresh=True)`)."""
    return _PLAN[0].serial if _PLAN else 0


def machine_key() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        cap = "".join(map(str, torch.cuda.get_device_capability()))
    else:
        name, cap = "no-cuda", "0"
    return f"{name}|sm_{cap}|cuda={torch.version.cuda}|torch={torch.__version__}"


def _file() -> str | None:
    return timing.decisions_file("MIXQUANT_GPU_CACHE", "gpu_routes.json")


def _load(key: str) -> dict:
    return {k: v for k, v in timing.load_decisions(_file(), key).items() if v in ROUTES}


def _save(key: str, decisions: dict) -> None:
    timing.save_decisions(_file(), key, decisions)


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        return False


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decide(op: str, x, cache, call: dict, measure=None) -> str:
    """The route for this call: remembered per layer (its cache dict) and per shape, else raced now. `measure`
    (tests): a stand-in for the race, {route: callable} -> {route: seconds}."""
    memo = None if cache is None else (op, x.shape, x.dtype, id(plan()), weight_keeps_moving(cache),
                                       call.get("a_split"))
    hit = None if memo is None else cache.get("gpu_route")
    if hit is not None and hit[0] == memo:
        return hit[1]
    cands = candidates(op, x, cache=cache, **call)
    p = plan()
    if p.forced:
        route = p.forced if p.forced in cands else "float"
    elif len(cands) == 1:
        route = cands[0]
    elif _capturing():  # no timing inside a graph capture or a compile trace, nor the shape key (its zero-point
        return cands[0]  # zone reads a GPU value); a layer's calls were decided before (the memo above)
    elif (key := shape_key(op, x, call)) in p.decisions and p.decisions[key] in cands:
        route = p.decisions[key]
    else:
        fns, failed = {}, {}
        for r in cands:
            try:  # a candidate that cannot run this call (a shape cuBLASLt refuses, ...) is dropped
                run(op, r, x, cache=cache, **call)
                fns[r] = (lambda f=_on_route(op, r, x, cache, call): f(x))  # (bound: nothing is raced under compile)
            except (TypeError, AttributeError, NameError):  # (a bug in our own code: not a route that cannot run)
                raise
            except Exception as e:  # noqa: BLE001  (torch's RuntimeError / ValueError, Triton's OutOfResources,
                failed[r] = (str(e).splitlines()[0][:120] if str(e) else "") or type(e).__name__  # CompilationError)
        if "float" not in fns:
            fns["float"] = lambda: run(op, "float", x, cache=cache, **call)
        # timed as a layer runs in an eager forward: calls issued back to back (~1 ms of them per round), so a
        # route pays its host time only where it exceeds its GPU time, as launches overlap the GPU's work there
        t = (measure or (lambda f: timing.race(f, 3, lambda: _sync(x.device), target=1e-3)))(fns)
        route = min(t, key=t.get)
        for r in fns:  # free what the losers prepared (int8 copies, weight sums) unless the winner uses it too
            if r != route and cache is not None:
                for slot in set(_SLOTS.get(r, ())) - set(_SLOTS.get(route, ())):
                    cache.pop(slot, None)
        p.decisions[key] = route
        p.timings_ms[key] = {r: v * 1e3 for r, v in t.items()} | {f"{r} (failed)": m for r, m in failed.items()}
        _save(machine_key(), p.decisions)
    if memo is not None:
        cache["gpu_route"] = (memo, route)
    return route


_SLOTS = {"int_mm": cpu_ops.CACHE_SLOTS["int_mm"], "triton": ("triton_wsum",)}


def _on_route(op: str, route: str, x, cache, call: dict):
    """The call by `route` as a layer makes it once decided (`bind`; the race times this, so that it does not charge
    Triton the launch planning a layer does once): f(x, codes=None); None under torch.compile (nothing bound)."""
    if route == "triton":
        from . import dispatch
        return dispatch.bind_triton(op, x, cache, call)
    return lambda x, codes=None: run(op, route, x, cache=cache, **call)


def _route(op: str, x, cache, call: dict) -> str:
    if torch.compiler.is_compiling():  # traced: the Triton custom op or the fp8 GEMM where they take the call
        if _triton_accepts(op, x, call):
            return "triton"
        return "scaled_mm" if _scaled_mm_accepts(op, x, call) else "float"
    return decide(op, x, cache, call)


def linear(x, cache=None, codes=None, **call):
    route = _route("linear", x, cache, call)
    if codes is not None and route == "triton":  # the producer's int8 codes of x (kernels/triton_fused.py)
        from . import dispatch
        return dispatch._triton_linear(x, cache=cache, codes=codes, **call)
    return run("linear", route, x, cache=cache, **call)


def conv2d(x, cache=None, codes=None, **call):
    route = _route("conv2d", x, cache, call)
    if codes is not None and route == "triton":  # the fused GroupNorm + SiLU's codes of x (kernels/triton_fused.py)
        from . import dispatch
        return dispatch._triton_conv2d(x, cache=cache, codes=codes, **call)
    return run("conv2d", route, x, cache=cache, **call)


def bind(op: str, x, cache, call: dict):
    """The call on its route, resolved once (dispatch.bind): raced now if its shape is undecided; None while a graph
    is captured or torch.compile traces (nothing is decided then)."""
    if _capturing():
        return None
    return _on_route(op, decide(op, x, cache, call), x, cache, call)


def choose(op: str, x, cache=None, **call) -> str:
    """The route a call takes, without measuring: the forced or only one, the recorded winner for its shape, or
    "measure"."""
    cands = candidates(op, x, cache=cache, **call)
    p = plan()
    if p.forced:
        return p.forced if p.forced in cands else "float"
    if len(cands) == 1:
        return cands[0]
    got = p.decisions.get(shape_key(op, x, call))
    return got if got in cands else "measure"


def describe() -> str:
    p = plan()
    lines = [f"GPU routes ({machine_key()}): triton / int_mm / scaled_mm / float raced per layer shape on first use "
             f"({len(p.decisions)} shapes decided)"]
    if p.forced:
        lines.append(f"route forced: {p.forced} (MIXQUANT_GPU_ROUTE)")
    return "\n".join(lines)
