"""Which CPU route (kernels/cpu_ops.py) each quantized call takes, chosen by measurement on the machine it runs on.

CPUs disagree about what is fast. On a 2-core AMD EPYC with AVX2 only, bf16/fp16 matmuls and `torch._int_mm` are
tens of times slower than fp32 while oneDNN's int8 primitives are about 2x faster per call; with AMX, `_int_mm` and
bf16 are the fast ones. So:

- `plan()` probes once per process (`_probe`): ISA flags (`isa()`), the fastest float dtype for a matmul (fp32 /
  bf16 / fp16), and which int8 routes are *exact* here and not hopeless: "onednn" where one call cannot saturate
  (VNNI/AMX), else "onednn_sparse" and "onednn_split"; "int_mm" only when the probe finds it within 1.5x of float.
- `int_route_accepts` says which routes can take a call (format, cache dict, ...); `candidates` lists them.
- The first call of each layer shape races the candidates (`decide`, `race`: a few runs each, interleaved) and
  keeps the winner per shape (`shape_key`); decisions persist in ~/.cache/mixquant/cpu_routes.json
  (MIXQUANT_CPU_CACHE) per CPU, thread count and torch version. The loser's prepared data is dropped.
- Without a cache dict from the layer the int8 routes are not used.

`linear` / `conv2d` here are the CPU backend's entry points (kernels/dispatch.py calls them).
MIXQUANT_CPU_ROUTE forces a route (where it can run); MIXQUANT_CPU_DTYPE the float dtype.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_ops, fp8, timing
from .cache import weight_keeps_moving
from .cpu_ops import ROUTES

# --- the machine ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _has_onednn() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack") \
            and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    except (AttributeError, RuntimeError):
        return False


def isa() -> dict:
    """What the CPU offers, as far as torch can tell."""
    cpu = getattr(torch, "cpu", None)

    def flag(name):
        f = getattr(cpu, name, None)
        try:
            return bool(f()) if f else None
        except RuntimeError:
            return None

    return {"capability": torch.backends.cpu.get_cpu_capability(), "avx512": flag("_is_avx512_supported"),
            "vnni": flag("_is_vnni_supported"), "amx": flag("_is_amx_tile_supported"),
            "avx512_bf16": flag("_is_avx512_bf16_supported"), "onednn_int8": _has_onednn(),
            "threads": torch.get_num_threads(), "model": cpu_model()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


# --- route selection ------------------------------------------------------------------------------------------------

def int_route_accepts(op: str, route: str, *, bits, zero, scale, a_bits, a_mode, cache, a_split=None,
                      qweight=None, **_) -> str | None:
    """None when `route` can run this call, else why not."""
    if fp8.is_fp8(qweight) or a_mode in fp8.MODES:
        return "float8 weights or activations: dequantize-then-matmul (the int8 GEMMs take integer codes)"
    if a_mode not in ("static", "dynamic") or a_bits > 8:
        return "weight-only layer (A16): dequantize-then-matmul"
    if scale.shape[1] != 1:
        return "group-wise weight scales: an int8 GEMM takes one scale per output channel"
    if bits == 8 and zero is not None:
        return "8-bit weight with a zero point does not fit int8"
    if cache is None:
        return "no cache dict from the layer: prepacking every call costs as much as the GEMM"
    if weight_keeps_moving(cache):
        return "the weight comes back at a new address every call: a prepack would not be reused"
    if route.startswith("onednn") and not _has_onednn():
        return "this torch has no oneDNN int8 ops"
    if route == "int_mm" and op != "linear":
        return "_int_mm covers linear layers only"
    if route == "onednn_sparse" and (a_mode != "static" or bits != 8 or a_split is not None):
        return "a sparse high half needs static activations (dynamic ones center at code 128), one activation " \
               "segment and 8-bit weights"
    return None


def linear(x, *, route: str | None = None, cache=None, dtype=None, **call):
    """The quantized linear on the CPU, by `route` or the one decided for this call; `dtype`: the float route's
    (default: the plan's)."""
    route = route or decide("linear", x, cache, call)
    if route == "float":
        dtype = dtype or plan().float_dtype
    return cpu_ops.linear(x, route, cache=cache, dtype=dtype, **call)


def conv2d(x, *, route: str | None = None, cache=None, dtype=None, **call):
    """The quantized conv2d on the CPU, as linear."""
    route = route or decide("conv2d", x, cache, call)
    if route == "float":
        dtype = dtype or plan().float_dtype
    return cpu_ops.conv2d(x, route, cache=cache, dtype=dtype, **call)


_OPS = {"linear": linear, "conv2d": conv2d}
_COMPILED: dict = {}


def _layout(x: torch.Tensor):
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def compiled_op(op: str):
    """`torch.ops.mixquant.cpu_qlinear` / `cpu_qconv2d` (registered when this module is imported): the CPU route as
    one op, the form dispatch calls under torch.compile, so the graph keeps each quantized layer whole (its route
    choice and weight caches run eagerly inside the op, as they do without compile) and compiles what lies between
    them."""
    from .registry import OP_SCHEMA as _SCHEMA, custom_op as _custom_op

    if op not in _COMPILED:
        if op == "linear":
            def impl(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                     wsum):
                return linear(x, qweight=qweight, scale=scale, zero=zero, bits=bits, k=k, group_size=group_size,
                              bias=bias, a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zero=a_zero,
                              a_split=a_split)

            def fake(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                     wsum):
                return x.new_empty((*x.shape[:-1], qweight.shape[0]))

            _COMPILED[op] = _custom_op("mixquant::cpu_qlinear", impl, fake, _SCHEMA + ") -> Tensor")
        else:
            def impl(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                     wsum, kernel_size, stride, padding, dilation):
                out = conv2d(x, qweight=qweight, scale=scale, zero=zero, bits=bits, k=k, group_size=group_size,
                             bias=bias, a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zero=a_zero,
                             a_split=a_split, kernel_size=tuple(kernel_size), stride=tuple(stride),
                             padding=tuple(padding), dilation=tuple(dilation))
                out = out.contiguous(memory_format=_layout(x))  # (the memory format the fake promises)
                return out if out.data_ptr() != x.data_ptr() else out.clone()

            def fake(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                     wsum, kernel_size, stride, padding, dilation):
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
                b, _, h, w = x.shape
                oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
                return torch.empty((b, qweight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                                   memory_format=_layout(x))

            _COMPILED[op] = _custom_op("mixquant::cpu_qconv2d", impl, fake,
                                       _SCHEMA + ", int[] kernel_size, int[] stride, int[] padding, int[] dilation) "
                                                 "-> Tensor")
    return _COMPILED[op]


def candidates(op: str, **call) -> list:
    """Routes that can run this call exactly here: the machine's int8 routes that accept it, then "float"."""
    p = plan()
    return [r for r in p.int_routes.get(op, []) if int_route_accepts(op, r, **call) is None] + ["float"]


def shape_key(op: str, x, call: dict) -> str:
    """What decides the winner: the GEMM/conv shape (token count rounded up to a power of two) and the format."""
    n = call["qweight"].shape[0]
    if op == "linear":
        m = x.numel() // max(x.shape[-1], 1)
        geo = f"M{1 << max(m - 1, 0).bit_length()}"
    else:
        geo = "x".join(map(str, x.shape)) + f"k{call['kernel_size']}s{call['stride']}p{call['padding']}"
    wf = "f8" if fp8.is_fp8(call["qweight"]) else ""
    return (f"{op}|{geo}|K{call['k']}|N{n}|w{call['bits']}{wf}|a{call['a_bits']}{call['a_mode']}|"
            f"{'split' if call.get('a_split') is not None else ''}{_zone(call)}")


def _zone(call: dict) -> str:
    # where the zero point sits decides how sparse the codes outside the 128-code window are (after SiLU it is near
    # 0 and few codes pass 127; after a norm or a residual add it is mid-range), so it is part of the route's key
    z = call.get("a_zero")
    if call["a_mode"] != "static" or z is None:
        return ""
    return "|z-low" if float(z.reshape(-1)[0]) < 2 ** (call["a_bits"] - 2) else "|z-mid"


def choose(op: str, x=None, cache=None, **call) -> str:
    """The route a call takes, without measuring: the only candidate, the recorded winner for its shape, or
    "measure" (the first call of an undecided shape races the candidates)."""
    cands = candidates(op, cache=cache, **call)
    if len(cands) == 1:
        return cands[0]
    p = plan()
    if p.forced:
        return p.forced if p.forced in cands else "float"
    return p.decisions.get(shape_key(op, x, call), "measure")


def decide(op: str, x, cache, call) -> str:
    # a layer's format is fixed, so its route depends only on the input shape, the zero point's zone (which changes
    # with the timestep group) and the plan: remembered in its cache dict, which saves the ~25 us of Python that
    # choose() costs on every call
    memo = None if cache is None else (op, x.shape, x.dtype, id(plan()), weight_keeps_moving(cache), _zone(call),
                                       call.get("a_split"))
    hit = None if memo is None else cache.get("route")
    if hit is not None and hit[0] == memo:
        return hit[1]
    route = choose(op, x=x, cache=cache, **call)
    if route != "measure":
        if memo is not None:
            cache["route"] = (memo, route)
        return route
    cands = candidates(op, cache=cache, **call)
    fn = _OPS[op]
    t = race({r: (lambda r=r: fn(x, route=r, cache=cache, **call)) for r in cands}, rounds=3)
    best = min(t, key=t.get)
    for r in cands:  # free what the losers prepared (an int8 copy of the weight) unless the winner uses it too
        if r != best and cache is not None:
            for slot in set(cpu_ops.CACHE_SLOTS.get(r, ())) - set(cpu_ops.CACHE_SLOTS.get(best, ())):
                cache.pop(slot, None)
    p = plan()
    p.decisions[shape_key(op, x, call)] = best
    p.timings_ms[shape_key(op, x, call)] = t
    _save_decisions(p)
    return best


@dataclass
class CpuPlan:
    float_dtype: torch.dtype
    int_routes: dict  # op -> exact int8 routes worth racing here, best first
    isa: dict
    decisions: dict = field(default_factory=dict)  # shape key -> winning route
    timings_ms: dict = field(default_factory=dict)  # what the probe / races measured
    notes: list = field(default_factory=list)
    forced: str | None = None

    def describe(self) -> str:
        lines = [f"CPU: {self.isa['model']} ({self.isa['capability']}, VNNI={self.isa['vnni']}, "
                 f"AMX={self.isa['amx']}, threads={self.isa['threads']})",
                 f"float dtype (weight-only layers, float route): {str(self.float_dtype).replace('torch.', '')}  "
                 f"(probe: {_fmt_times(self.timings_ms.get('float_dtype', {}))})"]
        for op, rs in self.int_routes.items():
            lines.append(f"{op} A8 candidates: {' / '.join(rs + ['float'])}; the winner is measured per shape on "
                         f"first use ({sum(k.startswith(op) for k in self.decisions)} shapes decided)")
        if self.forced:
            lines.append(f"route forced: {self.forced} (MIXQUANT_CPU_ROUTE)")
        lines += self.notes
        return "\n".join(lines)


def _fmt_times(t: dict) -> str:
    return ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())


_PLAN: list[CpuPlan] = []


def plan(refresh: bool = False) -> CpuPlan:
    """The per-machine choice, probed on first use. MIXQUANT_CPU_ROUTE / MIXQUANT_CPU_DTYPE override it;
    MIXQUANT_CPU_CACHE names the JSON file that keeps per-shape decisions across runs (default
    ~/.cache/mixquant/cpu_routes.json; "" disables it)."""
    if _PLAN and not refresh:
        return _PLAN[0]
    p = _probe()
    forced_route = os.environ.get("MIXQUANT_CPU_ROUTE")
    if forced_route:
        if forced_route not in ROUTES:
            raise ValueError(f"MIXQUANT_CPU_ROUTE must be one of {ROUTES}, got {forced_route!r}")
        p.forced = forced_route
        for op in p.int_routes:  # a forced route is used where it can run, exact or not (for benchmarks/tests)
            if forced_route != "float" and not (forced_route == "int_mm" and op != "linear"):
                p.int_routes[op] = [forced_route]
    forced_dtype = os.environ.get("MIXQUANT_CPU_DTYPE")
    if forced_dtype:
        p.float_dtype = getattr(torch, forced_dtype)
        p.notes.append(f"float dtype forced by MIXQUANT_CPU_DTYPE={forced_dtype}")
    p.decisions.update(_load_decisions(p))
    _PLAN[:] = [p]
    return p


def _machine_key(p: CpuPlan) -> str:
    return f"{p.isa['model']}|{p.isa['capability']}|threads={p.isa['threads']}|torch={torch.__version__}|" \
           f"{','.join(r for rs in p.int_routes.values() for r in rs)}"


def _load_decisions(p: CpuPlan) -> dict:
    return timing.load_decisions(_decisions_file(), _machine_key(p))


def _save_decisions(p: CpuPlan) -> None:
    timing.save_decisions(_decisions_file(), _machine_key(p), p.decisions)


def _decisions_file() -> str | None:
    return timing.decisions_file("MIXQUANT_CPU_CACHE", "cpu_routes.json")


def race(candidates: dict, rounds: int = 5) -> dict:
    """Best time (ms) of each candidate, run in turns (kernels/timing.py)."""
    return {name: v * 1e3 for name, v in timing.race(candidates, rounds).items()}


def _probe() -> CpuPlan:
    """ISA flags, the fastest float dtype, and which int8 routes are exact here (and not hopeless)."""
    info = isa()
    notes = []
    g = torch.Generator().manual_seed(0)
    xf = torch.randn(512, 640, generator=g)
    wf = torch.randn(640, 640, generator=g)
    cands = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a, b = xf.to(dt), wf.to(dt)
        try:
            F.linear(a, b)
        except RuntimeError:
            continue
        cands[str(dt).replace("torch.", "")] = lambda a=a, b=b: F.linear(a, b)
    dt_times = race(cands, rounds=2)
    float_dtype = getattr(torch, min(dt_times, key=dt_times.get))

    onednn = []
    if _has_onednn():
        try:
            if cpu_ops.onednn_single_call_exact():
                onednn = ["onednn"]
            else:
                onednn = ["onednn_sparse", "onednn_split"]
                notes.append("oneDNN u8 x s8 saturates at int16 here (no VNNI): 8-bit activations run as two "
                             "7-bit halves, two GEMM calls on one prepacked weight (onednn_split), or one call on the "
                             "128 codes around the zero point and a sparse product over the few outside "
                             "(onednn_sparse)")
        except RuntimeError as e:
            notes.append(f"oneDNN int8 unusable: {str(e).splitlines()[0][:80]}")
    # _int_mm is exact everywhere but only fast with AMX-class hardware: race it once against the float matmul
    # and keep it as a per-shape candidate only when it is not hopeless.
    xi = torch.randint(-127, 128, (512, 640), generator=g, dtype=torch.int8)
    wi = torch.randint(-127, 128, (640, 640), generator=g, dtype=torch.int8)
    t = race({"float": cands[min(dt_times, key=dt_times.get)], "int_mm": lambda: torch._int_mm(xi, wi)}, rounds=2)
    int_mm = ["int_mm"] if t["int_mm"] < 1.5 * t["float"] else []
    if not int_mm:
        notes.append(f"torch._int_mm {t['int_mm'] / t['float']:.1f}x slower than the float matmul here: not used")
    timings = {"float_dtype": dt_times, "int_mm_vs_float": t}
    return CpuPlan(float_dtype=float_dtype, int_routes={"linear": onednn + int_mm, "conv2d": list(onednn)},
                   isa=info, timings_ms=timings, notes=notes)


# registered now, not at the first compiled call: registering inside a trace breaks the graph
compiled_op("linear")
compiled_op("conv2d")
