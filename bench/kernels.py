"""Kernel and end-to-end speed of the quantized layers, as ratios to the fastest float path in the same process.

    python bench/kernels.py                      # CPU: per-kernel tables + SD1.5-architecture UNet at 32x32 latents
    python bench/kernels.py --device cuda        # GPU: per-kernel vs torch fp16 (and fp8 _scaled_mm, comfy-kitchen
                                                 #      int8_linear where present) + UNet at 64x64 and 128x128
    options: --part gemm,conv,unet,profile  --quick  --threads N  --out FILE

CPU: every quantized call goes through the dispatcher with a per-layer cache dict (as a layer passes it), so the
route is the one the per-shape race picks on this machine; the table names it. The float baseline is the fastest
float dtype the CPU probe found. GPU: Triton kernels (autotuned) vs cuBLAS/cuDNN fp16; UNet forwards captured in
CUDA graphs on both sides, and eager (the rows "eager"), with the host time per eager layer call (host_per_call).
Results go to bench/results/kernels_<device>.md (the machine is named in the table).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_name, sd15_unet  # noqa: E402

from mixquant.kernels import dispatch, triton_conv, triton_gemm  # noqa: E402
from mixquant.kernels.cpu_routes import race  # noqa: E402  (CPU timing: the route choice's own race)
from mixquant.kernels.synthetic import conv_geometry, random_call  # noqa: E402

# formats benchmarked per kernel: (label, random_call kwargs)
W8A8 = ("W8A8 static", dict(bits=8, a_mode="static"))
W8A8D = ("W8A8 dynamic", dict(bits=8, a_mode="dynamic"))
W4A8 = ("W4A8 g64 dyn", dict(bits=4, group_size=64, a_mode="dynamic"))
W4A16 = ("W4A16 g64", dict(bits=4, group_size=64, a_mode="none"))
SILU = "W8A8 static, SiLU input"
# the W4A8 g64 call forced onto the int8 dot (the default takes the float dot under group scales: default_int_dot);
# forcing the dot also skips the autotuner (heuristic launch config), so compare it without MIXQUANT_AUTOTUNE=1
INT_DOT_COL = "W4A8 g64 dyn, int8 dot ×"

# SD1.5 GEMMs per UNet level: (tokens per image at 64x64 latents, [(K, N), ...])
SD_LINEARS = [(4096, [(320, 320), (320, 2560), (1280, 320)]), (1024, [(640, 640), (640, 5120), (2560, 640)]),
              (256, [(1280, 1280), (1280, 10240), (5120, 1280)]), (77, [(768, 320), (768, 1280)])]


# --- timing --------------------------------------------------------------------------------------------------------

def time_gpu(fns: dict, graphs: bool = True) -> dict:
    """Median ms per candidate. graphs: each call captured in a CUDA graph and replayed (launch overhead gone on
    both sides, as in a UNet run under CUDA graphs); else eager launches (what a Python loop pays per call)."""
    import triton.testing
    out = {}
    for k, f in fns.items():
        try:
            f()  # warm-up outside any capture: autotuning, compilation, per-layer caches
            torch.cuda.synchronize()
            if graphs:
                out[k] = triton.testing.do_bench_cudagraph(f, rep=50)
            else:
                out[k] = triton.testing.do_bench(f, warmup=25, rep=100)
        except Exception as e:  # noqa: BLE001 - a competitor that does not run here is reported, not fatal
            out[k] = None
            print(f"  {k}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    return out


def fmt_ms(v):
    return "–" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.2f}")


def ratio(base, v):
    return "–" if (v is None or base is None) else f"{base / v:.2f}×"


# --- per kernel ----------------------------------------------------------------------------------------------------

def cpu_gemm(quick: bool) -> list[str]:
    from mixquant.kernels import cpu_routes as cpu
    fdt = cpu.plan().float_dtype
    dt = str(fdt).replace("torch.", "")
    lines = [f"### GEMM, CPU (x [M, K] @ W^T, {dt} baseline = torch F.linear with a {dt} weight)", "",
             f"Speed-up = {dt} time / quantized time (> 1: faster). Route: what the per-shape race picked.", "",
             f"| M | K | N | {dt} ms | " + " | ".join(f"{lab} ms (route) | ×" for lab, _ in (W8A8, W8A8D, W4A16))
             + " |", "|---|---|---|---|" + "---|---|" * 3]
    levels = SD_LINEARS[:2] if quick else SD_LINEARS
    for tokens, pairs in levels:
        m = 2 * tokens // 4  # batch 2 at 32x32 latents: a quarter of the 64x64 token count
        if tokens == 77:
            m = 2 * 77
        for k, n in (pairs[:2] if quick else pairs):
            x = torch.randn(m, k)
            w = torch.randn(n, k).to(fdt)
            b = torch.randn(n).to(fdt)
            fns = {"fp": lambda: F.linear(x.to(fdt), w, b)}
            routes = {}
            for lab, f in (W8A8, W8A8D, W4A16):
                call = random_call(n, k, **f)
                cache = {}
                dispatch.linear(x, cache=cache, **call)  # first call: the route race
                routes[lab] = dispatch.path("linear", x, cache=cache, **call)
                fns[lab] = lambda call=call, cache=cache: dispatch.linear(x, cache=cache, **call)
            t = race(fns, rounds=3 if quick else 5)
            cells = " | ".join(f"{fmt_ms(t[lab])} ({routes[lab].replace('cpu:', '')}) | {ratio(t['fp'], t[lab])}"
                               for lab, _ in (W8A8, W8A8D, W4A16))
            lines.append(f"| {m} | {k} | {n} | {fmt_ms(t['fp'])} | {cells} |")
            print(lines[-1], flush=True)
    return lines


def cpu_conv(quick: bool) -> list[str]:
    from mixquant.kernels import cpu_routes as cpu
    fdt = cpu.plan().float_dtype
    dt = str(fdt).replace("torch.", "")
    # SD1.5 3x3 convs at 32x32 latents, batch 2: (H=W, C_in, C_out)
    shapes = [(32, 320, 320), (16, 640, 640), (8, 1280, 1280), (4, 1280, 1280), (8, 2560, 1280)]
    if quick:
        shapes = shapes[1:3]
    labels = [lab for lab, _ in (W8A8, W8A8D, W4A16)] + [SILU]
    lines = [f"### Conv2d 3×3, CPU (batch 2, padding 1; {dt} baseline = F.conv2d, NCHW)", "",
             "Inputs: standard normal, static ranges random; last column: SiLU of it with the static range it has (as "
             "calibration gives), what a UNet's resnet convs see: few codes far from the zero point.", "",
             f"| H=W | C_in | C_out | {dt} ms | " + " | ".join(f"{lab} ms (route) | ×" for lab in labels)
             + " |", "|---|---|---|---|" + "---|---|" * len(labels)]
    geo = conv_geometry(3, 1, 1)
    for hw, cin, cout in shapes:
        x = torch.randn(2, cin, hw, hw)
        w = torch.randn(cout, cin, 3, 3).to(fdt)
        b = torch.randn(cout).to(fdt)
        fns = {"fp": lambda: F.conv2d(x.to(fdt), w, b, 1, 1)}
        routes = {}
        xs = F.silu(x)
        for lab, f, xi in (W8A8 + (x,), W8A8D + (x,), W4A16 + (x,), (SILU, W8A8[1], xs)):
            call = random_call(cout, 9 * cin, **f)
            if xi is xs:
                s = (xs.max() - xs.min()) / 255
                call.update(a_scale=s.reshape(1), a_zero=torch.round(-xs.min() / s).reshape(1))
            cache = {}
            dispatch.conv2d(xi, cache=cache, **call, **geo)
            routes[lab] = dispatch.path("conv2d", xi, cache=cache, **call, **geo)
            fns[lab] = lambda call=call, cache=cache, xi=xi: dispatch.conv2d(xi, cache=cache, **call, **geo)
        t = race(fns, rounds=3)
        cells = " | ".join(f"{fmt_ms(t[lab])} ({routes[lab].replace('cpu:', '')}) | {ratio(t['fp'], t[lab])}"
                           for lab in labels)
        lines.append(f"| {hw} | {cin} | {cout} | {fmt_ms(t['fp'])} | {cells} |")
        print(lines[-1], flush=True)
    return lines


def gpu_gemm(quick: bool) -> list[str]:
    cap = torch.cuda.get_device_capability()
    fp8 = cap >= (8, 9) and hasattr(torch, "_scaled_mm")
    ck = _comfy_kitchen_int8()
    head = ["fp16 ms", "W8A8 static ×", "W8A8 dyn ×", "W4A8 g64 dyn ×", "W4A16 g64 ×", INT_DOT_COL]
    if fp8:
        head += ["W8A8d fp8 ×", "fp8 _scaled_mm ×"]
    if ck:
        head.append("comfy-kitchen int8 ×")
    head.append("W8A8 static, eager ×")
    lines = ["### GEMM, GPU (fp16 activations; × = torch fp16 F.linear time / this time, > 1: faster)", "",
             "Each call goes through the dispatcher with a per-layer cache, as a quantized layer calls it. Timed in "
             "CUDA graphs on both sides (as the UNet runs); the last column times both sides eagerly (Python launch "
             "overhead included).", "",
             "| M | K | N | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(head)]
    ms = (2 * 4096, 2 * 1024, 2 * 256)
    pairs = sorted({p for _, ps in SD_LINEARS for p in ps} | {(1280, 1280), (1280, 5120)})
    if quick:
        ms, pairs = ms[:1], [(1280, 1280), (1280, 5120)]
    for m in ms:
        for k, n in pairs:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            fns = {"fp16": lambda: F.linear(x, w, b)}
            for lab, f in ((head[1], W8A8[1]), (head[2], W8A8D[1]), (head[3], W4A8[1]), (head[4], W4A16[1])):
                call = random_call(n, k, device="cuda", **f)
                cache = {}
                fns[lab] = lambda call=call, cache=cache: dispatch.linear(x, cache=cache, **call)
                if f is W4A8[1]:
                    fns[INT_DOT_COL] = lambda call=call: triton_gemm.qlinear(x, int_dot=True, **call)
            if fp8:  # our fp8 format through the dispatcher (its route race: _scaled_mm row-wise or the floor)
                call8 = random_call(n, k, device="cuda", bits=8, a_mode="fp8_dynamic", fp8=True)
                cache8 = {}
                fns["W8A8d fp8 ×"] = lambda: dispatch.linear(x, cache=cache8, **call8)
                x8 = x.to(torch.float8_e4m3fn)
                w8 = w.to(torch.float8_e4m3fn).t()
                one = torch.ones((), device="cuda")
                fns["fp8 _scaled_mm ×"] = lambda: torch._scaled_mm(x8, w8, scale_a=one, scale_b=one, bias=b,
                                                                  out_dtype=torch.float16)
            if ck:
                fns["comfy-kitchen int8 ×"] = ck(x, w, b)
            t = time_gpu(fns)
            te = time_gpu({"fp16": fns["fp16"], "q": fns[head[1]]}, graphs=False)
            t["W8A8 static, eager ×"] = te["q"]
            lines.append(f"| {m} | {k} | {n} | {fmt_ms(t['fp16'])} | "
                         + " | ".join(ratio(t["fp16"] if h != "W8A8 static, eager ×" else te["fp16"], t[h])
                                      for h in head[1:]) + " |")
            print(lines[-1], flush=True)
    return lines


def _comfy_kitchen_int8():
    """A builder of comfy-kitchen's int8 linear (per-row weight, dynamic per-token activations; its CUDA backend
    needs torch cu13, else its Triton/eager backends run), or None when comfy_kitchen is not installed."""
    try:
        import comfy_kitchen.tensor.base  # noqa: F401
    except Exception:  # noqa: BLE001
        return None

    def build(x, w, b):
        from comfy_kitchen.tensor.base import QuantizedTensor
        qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True)
        return lambda: F.linear(x, qt, b)
    return build


def gpu_conv(quick: bool) -> list[str]:
    shapes = [(64, 320, 320), (64, 640, 640), (32, 640, 640), (32, 1280, 1280), (16, 1280, 1280)]
    if quick:
        shapes = [(64, 640, 640)]
    head = ["cuDNN fp16 ms (best layout)", "W8A8 static ×", "W8A8 dyn ×", "W4A8 g64 dyn ×", "W4A16 g64 ×",
            INT_DOT_COL]
    lines = ["### Conv2d 3×3, GPU (batch 2, padding 1, fp16; × = best cuDNN fp16 time / this time)", "",
             "NCHW fp16 input, as the UNet feeds it; through the dispatcher with a per-layer cache; CUDA graphs on "
             "both sides. cuDNN: the faster of NCHW and channels_last.", "",
             "| H=W | C_in | C_out | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(head)]
    geo = conv_geometry(3, 1, 1)
    for hw, cin, cout in shapes:
        x = torch.randn(2, cin, hw, hw, device="cuda", dtype=torch.float16)
        xcl = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.float16)
        wcl = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(cout, device="cuda", dtype=torch.float16)
        t = time_gpu({"nchw": lambda: F.conv2d(x, w, b, 1, 1), "nhwc": lambda: F.conv2d(xcl, wcl, b, 1, 1)})
        base = min(v for v in t.values() if v is not None)
        fns = {}
        for lab, f in ((head[1], W8A8[1]), (head[2], W8A8D[1]), (head[3], W4A8[1]), (head[4], W4A16[1])):
            call = random_call(cout, 9 * cin, device="cuda", **f)
            cache = {}
            fns[lab] = lambda call=call, cache=cache: dispatch.conv2d(x, cache=cache, **call, **geo)
            if f is W4A8[1]:
                fns[INT_DOT_COL] = lambda call=call: triton_conv.qconv2d(x, int_dot=True, **call, **geo)
        tq = time_gpu(fns)
        lines.append(f"| {hw} | {cin} | {cout} | {fmt_ms(base)} | " + " | ".join(ratio(base, tq[h]) for h in head[1:])
                     + " |")
        print(lines[-1], flush=True)
    return lines


def gpu_profile(quick: bool) -> list[str]:
    """What limits the acceptance shapes: per-kernel GPU time (torch.profiler) of one quantized call, and a sweep
    of fixed launch configs against the default heuristic."""
    lines = ["### Where the time goes (GPU, acceptance shapes)", "",
             "Per-kernel GPU time of one call (torch.profiler, mean of 20), and the whole call timed in a CUDA graph "
             "with fixed launch configs (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) vs the default heuristic.", ""]
    sweep = [(128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 128, 4, 4), (256, 128, 128, 3, 8),
             (128, 256, 64, 4, 8), (64, 256, 128, 4, 4), (128, 128, 64, 5, 4)]
    geo = conv_geometry(3, 1, 1)
    cases = [("linear", 8192, 1280, 1280), ("linear", 8192, 1280, 5120), ("conv", 64, 640, 640)]
    for op, a, k, n in cases[:1] if quick else cases:
        for lab, f in (W8A8, W8A8D):
            try:
                lines.append(_profile_case(op, a, k, n, lab, f, sweep, geo))
            except Exception as e:  # noqa: BLE001 - report and go on to the next case
                lines.append(f"- {op} {a} {k} {n} {lab}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print(lines[-1], flush=True)
    return lines


def _profile_case(op, a, k, n, lab, f, sweep, geo):
    from torch.profiler import ProfilerActivity, profile

    from mixquant.kernels import triton_conv as tc
    from mixquant.kernels import triton_gemm as tg
    call = random_call(n, k if op == "linear" else 9 * k, device="cuda", **f)
    cache = {}
    if op == "linear":
        x = torch.randn(a, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        fp = lambda: F.linear(x, w)  # noqa: E731
        q = lambda: dispatch.linear(x, cache=cache, **call)  # noqa: E731
        wsum = tg.cached_weight_sums(cache, call)
        fixed = lambda c: tg.qlinear(x, **call, wsum=wsum, config=c)  # noqa: E731
        title = f"linear M={a} K={k} N={n}"
    else:
        x = torch.randn(2, k, a, a, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, 3, 3, device="cuda", dtype=torch.float16)
        fp = lambda: F.conv2d(x, w, None, 1, 1)  # noqa: E731
        q = lambda: dispatch.conv2d(x, cache=cache, **call, **geo)  # noqa: E731
        wsum = tg.cached_weight_sums(cache, call)
        fixed = lambda c: tc.qconv2d(x, **call, **geo, wsum=wsum, config=c)  # noqa: E731
        title = f"conv 3×3 {a}×{a}×{k}→{n}, batch 2"
    t = time_gpu({"fp16": fp, "ours": q})
    q()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            q()
        torch.cuda.synchronize()
    kern = {}
    for e in prof.key_averages():
        if getattr(e, "device_time_total", 0) > 0:
            kern[e.key] = e.device_time_total / 20
    parts = ", ".join(f"{name[:40]} {us:.1f} µs" for name, us in sorted(kern.items(), key=lambda kv: -kv[1])
                      if us >= 0.5)
    sw = {}
    for c in sweep:
        cfg = dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], GROUP_M=8, num_stages=c[3], num_warps=c[4])
        if op == "conv" and k % c[2]:
            continue
        sw[c] = time_gpu({c: lambda cfg=cfg: fixed(dict(cfg))})[c]
    best = min((v, c) for c, v in sw.items() if v is not None) if any(v is not None for v in sw.values()) \
        else (None, None)
    return (f"- **{title}, {lab}**: fp16 {fmt_ms(t['fp16'])} ms, ours {fmt_ms(t['ours'])} ms "
                 f"({ratio(t['fp16'], t['ours'])}); kernels: {parts}; best fixed config {best[1]} "
                 f"{fmt_ms(best[0])} ms ({ratio(t['fp16'], best[0])}); sweep: "
            + ", ".join(f"{c}: {fmt_ms(v)}" for c, v in sw.items()))


# --- end to end ----------------------------------------------------------------------------------------------------

def _plans(unet, device: str = "cpu"):
    from mixquant.kernels import fp8
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.roles import discover_layers
    layers = discover_layers(unet)
    w8a8 = {li.name: (LayerFormat(16, 16) if li.protected else LayerFormat(8, 8)) for li in layers}
    # mixed W4A8: the attention / feed-forward linears (content layers, the sensitive ones in MixDQ) at W8A8,
    # everything else at 4-bit group-64 weights with 8-bit activations
    mixed = {li.name: (LayerFormat(16, 16) if li.protected else
                       LayerFormat(8, 8) if li.role == "content" else LayerFormat(4, 8, 64)) for li in layers}
    plans = {"W8A8": w8a8, "mixed W4A8": mixed}
    if fp8.scaled_mm_supported(device):  # W8A8 with the Linear layers in fp8 (per-token e4m3), the convs int8
        plans["W8A8 fp8 linears"] = {li.name: (LayerFormat(16, 16) if li.protected else
                                               LayerFormat(8, 8, None, "dynamic", fp8=True) if li.kind == "linear"
                                               else LayerFormat(8, 8)) for li in layers}
    if A7:
        # what-if: 7-bit static activations. On CPUs without VNNI one oneDNN u8 x s8 call is exact for codes
        # < 128 (no int16 saturation), so the split's second GEMM disappears. quant/formats.py does not list
        # a_bits=7 (yet): the format is built past its validation, for this measurement only.
        a7 = object.__new__(LayerFormat)
        for f, v in dict(w_bits=8, a_bits=7, group_size=None, a_mode="static", w_symmetric=None).items():
            object.__setattr__(a7, f, v)
        plans["W8A7 (what-if)"] = {li.name: (LayerFormat(16, 16) if li.protected else a7) for li in layers}
    return plans


A7 = False
ROUNDS = 3
CHANNELS_LAST = False


def _weight_bytes(model) -> tuple[int, int]:
    from mixquant.kernels.cache import cache_bytes
    from mixquant.quant.apply import model_bytes
    extra = sum(cache_bytes(m._kernel_cache) for m in model.modules() if hasattr(m, "_kernel_cache"))
    return model_bytes(model), extra


def unet_e2e(device: str, quick: bool) -> list[str]:
    from mixquant.quant.apply import quantize_model
    from mixquant.quant.calibration import collect_act_ranges
    cuda = device == "cuda"
    if cuda:
        fdt = torch.float16
    else:
        from mixquant.kernels import cpu_routes as cpu
        fdt = cpu.plan().float_dtype
    sizes = [128] if cuda else [32]  # (#22's GPU line: 128x128 latents; one size keeps the step within bench/gpu.py)
    if quick:
        sizes = sizes[:1]
    unet = sd15_unet(dtype=fdt, device=device)
    g = torch.Generator().manual_seed(0)

    def inputs(hw):
        return (torch.randn(2, 4, hw, hw, generator=g).to(device, fdt), torch.tensor([500, 500], device=device),
                torch.randn(2, 77, 768, generator=g).to(device, fdt))

    x, t, ctx = inputs(sizes[0])
    ranges = collect_act_ranges(unet, lambda: unet(x, t, ctx))  # one forward: realistic static zero points
    models = {str(fdt).replace("torch.", "").upper(): unet}
    if CHANNELS_LAST:  # the same float model in channels_last (faster convs on some CPUs): another baseline
        models[str(fdt).replace("torch.", "").upper() + " channels_last"] = \
            sd15_unet(dtype=fdt, device=device).to(memory_format=torch.channels_last)
    for label, plan in _plans(unet, device).items():
        t0 = time.time()
        # a fresh copy of the same seeded model, quantized in place (no deep copy: peak memory stays ~2 models)
        q, _ = quantize_model(sd15_unet(dtype=fdt, device=device), plan, ranges, inplace=True, search="minmax")
        models[label] = q
        gc.collect()
        print(f"  quantized {label} in {time.time() - t0:.0f}s", flush=True)
    notes = []
    lines = [f"### SD1.5-architecture UNet forward, batch 2 ({device})", "",
             *(["Rows: the forward captured in a CUDA graph (launches replayed), then the same forward eager "
                "(Python and launches paid per layer, as ComfyUI runs it by default). Peak: the model's weights "
                "(+ kernel cache) and what one eager forward allocates.", ""] if cuda else []),
             "| latents | " + " | ".join(f"{k} ms | ×" for k in models) + " | weights MB (+ kernel cache MB) |",
             "|---|" + "---|---|" * len(models) + "---|"]
    for hw in sizes:
        x, t, ctx = inputs(hw)
        runs, agree = {}, {}
        for i, (label, m) in enumerate(models.items()):
            xi = x.contiguous(memory_format=torch.channels_last) if label.endswith("channels_last") else x
            with torch.no_grad():
                y = m(xi, t, ctx).sample  # warm-up: CPU route races, Triton autotuning
                if i == 0:
                    y_fp = y.float()
                elif not label.endswith("channels_last"):
                    # distance from the float model, fast path and reference path: quantization rounds, so two
                    # exact-to-rounding implementations drift apart through a deep network (a code flips where
                    # they differ by an ulp); what matters is that both are equally far from the float model
                    with dispatch.use_backend("reference"):
                        y_ref = m(xi, t, ctx).sample.float()
                    agree[label] = tuple(float((v - y_fp).norm() / y_fp.norm()) for v in (y.float(), y_ref))
                if cuda:
                    runs[label] = _graphed(m, xi, t, ctx)
                else:
                    runs[label] = lambda m=m, xi=xi: m(xi, t, ctx)
        if cuda:
            times, peaks, eager = {}, {}, {}
            for label, f in runs.items():
                times[label] = time_gpu({label: f}, graphs=False)[label]  # f replays a captured graph
            with torch.no_grad():  # the same forwards eagerly: each layer's Python and launches paid per call
                for label, m in models.items():
                    xi = x.contiguous(memory_format=torch.channels_last) if label.endswith("channels_last") else x
                    # peak: this model's weights (+ kernel cache) and what one eager forward allocates on top of
                    # everything held now (the other models, the captured graphs' pools)
                    torch.cuda.synchronize()
                    held = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    m(xi, t, ctx)
                    torch.cuda.synchronize()
                    peaks[label] = (sum(_weight_bytes(m)) + torch.cuda.max_memory_allocated() - held) / 2**20
                    eager[label] = time_gpu({label: lambda m=m, xi=xi: m(xi, t, ctx)}, graphs=False)[label]
            if hw == sizes[0]:
                from mixquant.quant.layers import QuantLayer
                host = {label: host_per_call(m, (x, t, ctx), QuantLayer if i else (torch.nn.Linear, torch.nn.Conv2d),
                                             torch.cuda.synchronize)
                        for i, (label, m) in enumerate(models.items()) if not label.endswith("channels_last")}
                notes.append(host_line(host))
                print(notes[-1], flush=True)
                label = next((k for k in models if k.startswith("W8A8")), None)
                if label is not None:
                    notes += ["", f"Host profile of the {label} layers' eager calls (cProfile, {hw}×{hw} inputs):", ""]
                    notes += host_profile(models[label], (x, t, ctx), QuantLayer, torch.cuda.synchronize)
                    notes.append("")
        else:
            with torch.no_grad():
                times = race(runs, rounds=1 if quick else ROUNDS)
        base = times[next(iter(models))]
        mem = []
        for label, m in models.items():
            wb, extra = _weight_bytes(m)
            mem.append(f"{label} {wb / 2**20:.0f}" + (f" (+{extra / 2**20:.0f})" if extra else "")
                       + (f", peak {peaks[label]:.0f}" if cuda else ""))
        lines.append(f"| {hw}×{hw} | " + " | ".join(f"{fmt_ms(times[k])} | {ratio(base, times[k])}" for k in models)
                     + " | " + "; ".join(mem) + " |")
        print(lines[-1], flush=True)
        if cuda:
            b = eager[next(iter(models))]
            lines.append(f"| {hw}×{hw} eager | " + " | ".join(f"{fmt_ms(eager[k])} | {ratio(b, eager[k])}"
                                                                for k in models) + " | |")
            print(lines[-1], flush=True)
        routes = {label: route_counts(m, (x, t, ctx)) for i, (label, m) in enumerate(models.items())
                  if i and not label.endswith("channels_last")}
        notes.append(f"{hw}×{hw}: the route of each quantized call in one forward: " + "; ".join(
            f"{k} " + ", ".join(f"{r} ×{n}" for r, n in c.items()) for k, c in routes.items()))
        print(notes[-1], flush=True)
        notes.append(f"{hw}×{hw}: distance of the output from the float model's (relative L2), fast path / reference "
                     "path: " + ", ".join(f"{k} {a:.2%} / {b:.2%}" for k, (a, b) in agree.items()))
    lines += [""] + notes
    del models
    gc.collect()
    return lines


def _layer_inputs(model, inputs: tuple, types) -> dict:
    """Each `types` layer of `model` -> (args, kwargs) of its first call in one forward of `model` on `inputs`."""
    seen = {}

    def pre(m, args, kwargs):
        seen.setdefault(m, (args, kwargs))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules() if isinstance(m, types)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def host_per_call(model, inputs: tuple, types, sync=lambda: None, calls: int = 20, repeats: int = 3) -> list[float]:
    """Host (Python) microseconds of one eager call of each `types` layer of `model`, on the input it gets in the
    model's forward (recorded in one forward): per layer, `calls` calls issued back to back and timed up to the last
    issue, best of `repeats`. On a GPU that is the host's time alone: the launches are asynchronous and 3 x `calls`
    of them stay far below the launch queue's depth, so nothing waits for the GPU (unless the layer synchronizes,
    which then counts, as it would in a run). On a CPU the layer's compute counts too."""
    out = []
    with torch.no_grad():
        for m, (args, kwargs) in _layer_inputs(model, inputs, types).items():
            m(*args, **kwargs)  # (first call: route race, per-layer caches)
            best = float("inf")
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    m(*args, **kwargs)
                best = min(best, time.perf_counter() - t0)
            out.append(best / calls * 1e6)
    sync()
    return out


def host_profile(model, inputs: tuple, types, sync=lambda: None, calls: int = 5, top: int = 15) -> list[str]:
    """Where the host time of `model`'s `types` layer calls goes: cProfile over `calls` calls of each layer on its
    recorded input, the `top` functions by own time, in µs per layer call (cProfile's own cost inflates them all
    alike: read them as shares)."""
    import cProfile
    import pstats

    recorded = _layer_inputs(model, inputs, types)
    prof = cProfile.Profile()
    with torch.no_grad():
        for m, (args, kwargs) in recorded.items():
            m(*args, **kwargs)
        sync()
        prof.enable()
        for m, (args, kwargs) in recorded.items():
            for _ in range(calls):
                m(*args, **kwargs)
        prof.disable()
    sync()
    st = pstats.Stats(prof)
    n = max(1, calls * len(recorded))
    total = sum(v[2] for v in st.stats.values())
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = ["| function | calls per layer call | own µs per layer call | share |", "|---|---|---|---|"]
    for (path, line, name), (cc, nc, tt, ct, _) in rows:
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        out.append(f"| `{where}` | {nc / n:.1f} | {tt / n * 1e6:.2f} | {tt / max(total, 1e-12):.0%} |")
    return out


def route_counts(model, inputs: tuple) -> dict:
    """Which implementation each packed quantized call of one forward of `model` on `inputs` ran (`dispatch.path`
    on the call's own input: a BOS split's two calls count twice), counted: e.g. {"gpu:triton": 120, "gpu:float": 8}.
    A ratio in a table is only as good as the routes behind it."""
    from collections import Counter

    from mixquant.quant.layers import QuantLayer
    seen = Counter()
    packed_call = QuantLayer._packed_call

    def spy(layer, x, blob, bias, op, geometry):
        y = packed_call(layer, x, blob, bias, op, geometry)  # (first: a shape's first call races its routes)
        seen[dispatch.path(op, x, **layer._kernel_args(blob, bias, x.device), **geometry)] += 1
        return y

    QuantLayer._packed_call = spy
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        QuantLayer._packed_call = packed_call
    return dict(seen.most_common())


def host_line(us_by_model: dict) -> str:
    """One line: per model, mean / median / max host µs per eager layer call over its layers."""
    def stats(v):
        v = sorted(v)
        return f"{sum(v) / len(v):.1f} / {v[len(v) // 2]:.1f} / {v[-1]:.1f} µs over {len(v)} layers" if v else "–"
    return ("Host time per eager layer call (mean / median / max; each layer on the input it gets in the forward, "
            "calls issued without waiting for the GPU): "
            + "; ".join(f"{k} {stats(v)}" for k, v in us_by_model.items()))


def _graphed(model, x, t, ctx):
    """The forward captured in a CUDA graph (static inputs), returned as a replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            model(x, t, ctx)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(x, t, ctx)
    return graph.replay


# --- main ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--part", default="gemm,conv,unet")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--channels-last", action="store_true", help="also time the float UNet in channels_last")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the CPU UNet forwards")
    ap.add_argument("--a7", action="store_true", help="also time a what-if W8A7 UNet (7-bit static activations)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    global A7, ROUNDS, CHANNELS_LAST
    A7, ROUNDS, CHANNELS_LAST = args.a7, args.rounds, args.channels_last
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.part.split(","))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 1
        machine = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        tag = torch.cuda.get_device_name().replace(" ", "_").lower()
    else:
        from mixquant.kernels import cpu_routes as cpu
        nt = torch.get_num_threads()
        machine = f"{cpu_name()}, {nt} torch thread{'s' if nt != 1 else ''}"
        tag = "cpu"
        print(cpu.plan().describe(), flush=True)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    lines = [f"## Quantized kernels on {machine}", "",
             f"`python bench/kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}` — torch "
             f"{torch.__version__}, triton {tv}, "
             f"{time.strftime('%Y-%m-%d')}. Times are the best of interleaved rounds (CPU) or triton do_bench "
             "medians (GPU); ratios compare within one process.", ""]
    if args.device == "cpu":
        from mixquant.kernels import cpu_routes as cpu
        lines += ["```", cpu.plan().describe(), "```", ""]
        if "gemm" in parts:
            lines += cpu_gemm(args.quick) + [""]
        if "conv" in parts:
            lines += cpu_conv(args.quick) + [""]
    else:
        if "gemm" in parts:
            lines += gpu_gemm(args.quick) + [""]
        if "conv" in parts:
            lines += gpu_conv(args.quick) + [""]
    if "profile" in parts and args.device == "cuda":
        lines += gpu_profile(args.quick) + [""]
    if "unet" in parts:
        lines += unet_e2e(args.device, args.quick) + [""]
    text = "\n".join(lines)
    # (a --quick smoke run does not overwrite the committed table)
    out = args.out or os.path.join(HERE, "results", f"kernels_{tag}{'_quick' if args.quick else ''}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
