"""The CPU implementations of the quantized ops, one function per route; kernels/cpu_routes.py decides which
route a call takes (by measurement on the machine) and calls them.

Routes (ROUTES):
    "onednn"        torch.ops.onednn.qlinear_pointwise / qconv2d_pointwise: u8 activations x s8 weights;
    "onednn_split"  the same with each u8 activation split as a + b (a = min(u, 127), b = u - a). Without VNNI,
                    oneDNN multiplies u8 x s8 byte pairs with vpmaddubsw, which saturates at int16: full 8-bit
                    activations against |w| > 64 come out wrong (measured: errors of 20% of the output range).
                    Both halves are < 128, which cannot saturate; the two calls share one prepacked weight;
    "onednn_sparse" one call on the 128 codes around the zero point (where most codes sit), and the few codes
                    outside that window as a sparse product instead of a second GEMM (see SPARSE_DENSITY below);
    "int_mm"        torch._int_mm, int32 accumulation;
    "float"         fake-quantized activations x dequantized weight in a float dtype (the reference's math,
                    in fewer passes; for fp32 it is the reference bit for bit).

- Weight-only (A16) layers always run dequantize-then-matmul in the float dtype; the dequantized weight is a
  temporary, never cached (a cached fp32 copy would make the layer 8x its packed size). Large weights dequantize in
  one loop compiled by torch.compile (inductor), the same values bit for bit (`dequantize`, COMPILE_MIN).
- The int8 routes keep one prepacked int8 copy of the weight in the layer's `cache` dict (~N*K bytes, the size of
  the codes; slots per route: CACHE_SLOTS; keys: kernels/cache.py): prepacking costs 10-40 ms, as much as the GEMM.

Every route equals the reference up to int32-accumulation / fp32 rounding (tests/test_kernels_cpu.py).
"""
from __future__ import annotations

import os
import types
import warnings

import torch
import torch.nn.functional as F

from . import fp8
from .cache import cache_key, cached
from .packing import unpack_codes
from .reference import conv_weight_view

INT_ROUTES = ("onednn", "onednn_sparse", "onednn_split", "int_mm")
ROUTES = INT_ROUTES + ("float",)
_ONEDNN_SLOTS = ("cpu_onednn_linear", "cpu_onednn_conv")
CACHE_SLOTS = {"onednn": _ONEDNN_SLOTS, "onednn_split": _ONEDNN_SLOTS,  # route -> the cache slots it fills
               "onednn_sparse": _ONEDNN_SLOTS + ("cpu_sparse_wt",), "int_mm": ("cpu_int_mm_linear",)}


def _as(t, dtype):
    """t in `dtype` (t itself when it already is: a no-op .to() still costs ~4 us, and this runs per call)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


# --- weight preparation ---------------------------------------------------------------------------------------------

# Dequantizing a large weight on every call (the float route: weight-only layers, group-wise scales) is several
# elementwise passes over N x K values in eager torch; inductor fuses them into one vectorized loop: the same values
# bit for bit, measured 4x faster on a 1280 x 5120 4-bit weight (2-core Xeon). Compiled per weight shape (dynamic
# shapes lose the vectorization: 30x slower), each shape under its own code object so that torch.compile's recompile
# limit per function does not send the ninth shape back to eager; only weights of COMPILE_MIN values and more (the
# first call of a shape compiles for seconds). MIXQUANT_CPU_COMPILE=0 turns it off; a shape that fails to compile
# (no C++ compiler, ...) runs eager.
COMPILE_MIN = 1 << 20
_COMPILED: dict = {}  # (shape, bits, dtypes...) -> compiled function; None where it failed (then eager everywhere)
_BROKEN: list = []  # why compiling failed here, once it has


def _compile_wanted(qweight, n: int, k: int) -> bool:
    return (qweight.device.type == "cpu" and n * k >= COMPILE_MIN and not torch.compiler.is_compiling()
            and not _BROKEN and os.environ.get("MIXQUANT_CPU_COMPILE", "1") != "0")


def dequantize(qweight, scale, zero, bits: int, k: int, group_size: int | None, dtype=torch.float32):
    """Packed weight -> [N, K] in `dtype`; the same values as reference.dequantize_weight ((q - z) * s in fp32), in
    fewer passes: unpacking on bytes, then in place on one fp32 buffer, no materialized [N, K] scale (compiled into
    one loop for large weights, see COMPILE_MIN)."""
    n = scale.shape[0]
    if _compile_wanted(qweight, n, k):
        key = (bits, n, k, group_size, scale.shape[1], zero is not None, dtype, qweight.dtype, scale.dtype)
        fn = _COMPILED.get(key)
        if key not in _COMPILED:
            code = _dequantize.__code__.replace(co_name=f"_dequantize_{len(_COMPILED)}")
            fn = _COMPILED[key] = torch.compile(types.FunctionType(code, _dequantize.__globals__), dynamic=False)
        if fn is not None:
            try:
                return fn(qweight, scale, zero, bits, k, group_size, dtype)
            except Exception as e:  # noqa: BLE001  (inductor raises many kinds: from now on, eager)
                _COMPILED[key] = None
                _BROKEN.append(type(e).__name__)
                warnings.warn(f"MixQuant: compiling the CPU dequantization failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:100] if str(e) else ''}); it runs eager from now on "
                              "(slower). MIXQUANT_CPU_COMPILE=0 skips the attempt.", stacklevel=2)
    return _dequantize(qweight, scale, zero, bits, k, group_size, dtype)


def _dequantize(qweight, scale, zero, bits: int, k: int, group_size: int | None, dtype=torch.float32):
    n, groups = scale.shape
    if bits == 8:
        q = qweight.to(torch.float32)
    elif bits == 4:
        q = torch.stack((qweight & 15, qweight >> 4), dim=-1).view(n, -1)[:, :k].to(torch.float32)
    else:
        q = unpack_codes(qweight, bits, k).to(torch.float32)
    if groups > 1:
        pad = groups * group_size - k
        q = F.pad(q, (0, pad)) if pad else q.contiguous()
        q = q.view(n, groups, group_size)
    z = _as(zero, torch.float32)
    s = _as(scale, torch.float32)
    if groups > 1:
        z = None if z is None else z.unsqueeze(-1)
        s = s.unsqueeze(-1)
    if z is not None:
        q.sub_(z)
    elif bits < 8:
        q.sub_(2.0 ** (bits - 1))
    w = q.mul_(s)
    if groups > 1:
        w = w.view(n, -1)[:, :k]
    return _as(w, dtype)


def int8_weight(qweight, zero, bits: int, k: int) -> torch.Tensor | None:
    """Signed integer weight [N, K] (int8) whose product with the per-channel scale is the weight; None when it does
    not fit in int8 (an 8-bit weight with a zero point)."""
    if bits == 8:
        return None if zero is not None else qweight.contiguous()
    codes = unpack_codes(qweight, bits, k).to(torch.int16)
    z = zero.to(torch.int16) if zero is not None else 2 ** (bits - 1)
    return (codes - z).to(torch.int8)


# --- activation codes -----------------------------------------------------------------------------------------------
# The reference's ops in the reference's order (same division, rounding, clamp: the same codes bit for bit), but in
# place on one buffer: eager torch allocates a fresh tensor per op otherwise, which costs 5-7x more here. Codes are
# stored as unsigned bytes u = code + shift with an integer zero point, the form oneDNN takes.
# Measured on an AVX2 CPU (2048 x 1280 fp32): clamp_ with tensor bounds runs a non-vectorized ternary loop (1.5 ms vs
# 0.3 ms with number bounds), and fp32 -> uint8 is not vectorized either (0.87 ms) while fp32 -> int16 -> uint8 is
# (0.23 ms): bounds are Python numbers, codes go through int16 (exact: they are integers in [0, 255]).


def _to_u8(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int16).to(torch.uint8)


def _host_scalars(x: torch.Tensor) -> bool:
    """Whether x's quantization reads its scale and zero point as Python numbers: on the CPU (number bounds keep
    clamp vectorized); elsewhere they stay tensors (reading one would synchronize the GPU, and fail inside a CUDA
    graph capture: the GPU's float and int_mm routes run this code too)."""
    return x.device.type == "cpu"


def _static_codes(x, a_scale, a_zero, bits, split, channel_dim):
    """[(u8 codes, float scale, int zero point)] per activation segment."""
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    if split is None:
        parts = [(xf, a_scale.reshape(()), a_zero.reshape(()))]
    else:
        a, b = xf.split([split, x.shape[channel_dim] - split], dim=channel_dim)
        parts = [(a, a_scale[0], a_zero[0]), (b, a_scale[1], a_zero[1])]
    qmax = 2 ** bits - 1
    on_host = _host_scalars(x)
    out = []
    for part, s, z in parts:
        u = _to_u8(part.div(s).round_().add_(z).clamp_(0, qmax))
        out.append((u, float(s), int(z)) if on_host else (u, s, z.to(torch.int32)))
    return out


def _dynamic_codes(x, bits, dims):
    """(u8 codes, fp32 scale keepdim, zero point): symmetric codes shifted by 2**(bits-1) into [0, 2**bits)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=dims, keepdim=True)  # == abs().amax(), one pass
    s = torch.clamp(amax / qmax, min=1e-30)
    shift = 2 ** (bits - 1)
    u = _to_u8(xf.div(s).round_().clamp_(-qmax - 1, qmax).add_(shift))
    return u, s, shift


def fake_quant(x, a_bits, a_mode, a_scale, a_zero, a_split, channel_dim, dynamic_dims):
    """reference.fake_quant_act, computed in place on one fp32 buffer (same values)."""
    if a_mode == "none" or a_bits >= 16:
        return x
    if a_mode in fp8.MODES:
        return fp8.fake_quant_act(x, a_mode, a_scale, a_split, channel_dim, dynamic_dims)
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    if a_mode == "dynamic":
        qmax = 2 ** (a_bits - 1) - 1
        s = torch.clamp(torch.linalg.vector_norm(xf, ord=float("inf"), dim=dynamic_dims, keepdim=True) / qmax,
                        min=1e-30)
        return _as(xf.div(s).round_().clamp_(-qmax - 1, qmax).mul_(s), x.dtype)
    parts = [(xf, a_scale.reshape(()), a_zero.reshape(()))] if a_split is None else list(zip(
        xf.split([a_split, x.shape[channel_dim] - a_split], dim=channel_dim), a_scale, a_zero))
    qmax = 2 ** a_bits - 1
    # (clamp(round(x / s) + z, 0, qmax) - z) * s == clamp(round(x / s), -z, qmax - z) * s exactly (small integers)
    if _host_scalars(x):
        out = [p.div(s).round_().clamp_(-float(z), qmax - float(z)).mul_(s) for p, s, z in parts]
    else:
        out = [p.div(s).round_().clamp_(min=-z, max=qmax - z).mul_(s) for p, s, z in parts]
    return _as(out[0] if len(out) == 1 else torch.cat(out, dim=channel_dim), x.dtype)


# --- oneDNN ---------------------------------------------------------------------------------------------------------

_NO_ARGS: list = []


def _onednn_linear_raw(u, zp, packed, w_scale, w_zp, bias, x_scale=1.0):
    return torch.ops.onednn.qlinear_pointwise(u, x_scale, zp, packed, w_scale, w_zp, bias, 1.0, 0, torch.float32,
                                              "none", _NO_ARGS, "")


def _onednn_conv_raw(u, zp, packed, w_scale, w_zp, bias, geo, x_scale=1.0):
    stride, padding, dilation = geo
    return torch.ops.onednn.qconv2d_pointwise(u, x_scale, zp, packed, w_scale, w_zp, bias, stride, padding,
                                              dilation, 1, 1.0, 0, torch.float32, "none", _NO_ARGS, None)


def _sat_free(u_max: int, w_absmax: int) -> bool:
    # vpmaddubsw adds two u8*s8 products into a saturating int16
    return 2 * u_max * w_absmax <= 32767


def _run_split(raw, u, zp, u_max, w_absmax, split_sat, bias, sparse=None, **kw):
    """One oneDNN call, or, when the pair sums could saturate: with `sparse`, one call on the window of 128 codes
    around the zero point (where most codes sit) plus the codes outside it (r = u - the clamped u: unsigned bytes
    when the window starts at 0, else int16) added by `sparse(r)(out)` (sparse(r) is None when they are too many);
    else two calls on halves of the codes."""
    if not split_sat or _sat_free(u_max, w_absmax):
        return raw(u, zp, bias=bias, **kw)
    if sparse is not None:
        w0 = min(max(zp - 64, 0), 128)  # codes w0 .. w0 + 127 (fed as 0..127, zero point zp - w0) cannot saturate
        a = torch.clamp(u, w0, w0 + 127)
        # the codes outside: only above the window when it starts at 0 (unsigned bytes, the cheapest to scan)
        r = torch.clamp(u, min=127).sub_(127) if w0 == 0 else u.to(torch.int16).sub_(a)
        add = sparse(r)
        if add is not None:
            return add(raw(a.sub_(w0) if w0 else a, zp - w0, bias=bias, **kw))
    a = torch.clamp(u, max=127)
    out = raw(a, min(zp, 127), bias=bias, **kw)
    b = u.sub_(a)  # (u is ours: reuse it for the high half)
    return out.add_(raw(b, zp - min(zp, 127), bias=None, **kw))


_NOTHING = object()


# Static activations sit mostly near their zero code: after SiLU/GELU few codes exceed 127, after a norm few are more
# than 64 from the zero point. The codes outside a window of 128 around the zero point (the residual of _run_split)
# are then mostly zeros, and two ways skip the second GEMM for them (integer codes times the scaled fp32 weight: equal
# to the reference up to fp32 rounding, like the other routes):
# - few hot channels (real models: outlier channels): a small fp32 product over just those channels (both routes);
# - few non-zeros spread over all channels ("onednn_sparse"): a sparse (CSR) x dense product over them, im2col'ed for
#   convs; a call falls back to the second GEMM when more than SPARSE_DENSITY of the codes are non-zero.
# Measured on an AVX2 CPU, 3x3 conv 320 -> 320 at 32x32, batch 2, SiLU inputs (1% codes above 127): fp32 24.4 ms,
# two calls 22.5 ms, the first call alone 9.8 ms, the CSR product 1.5 ms (+ its index building). Which route wins
# depends on the shape and the zero point's zone (shape_key), so the per-shape race picks.

SPARSE_DENSITY = 0.03


def _hot_channels(b, dims, limit: int):
    """Channels where the residual is non-zero: their indices, _NOTHING when none, None when more than `limit`."""
    hot = torch.any(b != 0, dim=dims).nonzero().squeeze(1)
    if hot.numel() == 0:
        return _NOTHING
    return hot if hot.numel() <= limit else None


def _csr(rows, cols, vals, n_rows: int, k: int):
    """The sparse [n_rows, k] matrix with entries (rows, cols, vals), in CSR form."""
    if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.argsort(rows)
        rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, vals, (n_rows, k))


def _residual_plan(b, elementwise: bool, hot_dims, hot_limit: int):
    """How to compute the residual codes b: _NOTHING (all zero), "csr" (few, anywhere), a tensor of hot channel
    indices (non-zero only there), or None (a second GEMM)."""
    nnz = int(torch.count_nonzero(b))
    if nnz == 0:
        return _NOTHING
    if elementwise and nnz <= SPARSE_DENSITY * b.numel():
        return "csr"
    return _hot_channels(b, hot_dims, hot_limit)


SPARSE_WT_CACHE_MAX = 2 ** 21


def _csr_ok(qweight, elementwise: bool) -> bool:
    """The CSR product needs W^T row-major (MKL's CSR x dense product is 1.5-3x slower on a column-major operand and
    a transpose costs 1-4 ms per call at SD sizes), so it is kept as an int8 copy in the layer's cache: only for
    weights up to SPARSE_WT_CACHE_MAX bytes. A copy for every layer would add ~0.15x the fp32 weight bytes to an
    SD1.5 UNet, on top of the oneDNN prepacks; and for the large weights of low-resolution layers, converting the
    weight costs more than the second GEMM it saves (measured: 3x3 conv 2560 -> 1280 at 8x8, 200 ms vs 58 ms)."""
    return elementwise and qweight.numel() <= SPARSE_WT_CACHE_MAX


def _scaled_wt(qweight, wkey, col_scale, cache):
    """fp32 W^T * col_scale [K, N], from the cached transposed int8 copy (keyed like the prepack: `wkey`)."""
    wt = cached(cache, "cpu_sparse_wt", wkey, lambda: qweight.t().contiguous())
    return wt.to(torch.float32).mul_(col_scale)


# The residual is added into oneDNN's output in place (addmm_ / add_): a separate [tokens, N] product and sum would
# cost three passes over the output (measured: 17 ms vs 1.4 ms at 2048 x 320 -> 2560 with 1% non-zeros).

def _sparse_linear(qweight, wkey, w_scale, x_scale, k, elementwise: bool, cache=None):
    elementwise = _csr_ok(qweight, elementwise)

    def plan_(b):
        how = _residual_plan(b, elementwise, 0, min(k // 8, 1000))
        if how is None:
            return None
        if how is _NOTHING:
            return lambda out: out
        col_scale = w_scale * x_scale
        if isinstance(how, str):
            r, c = b.nonzero().unbind(1)  # row-major: already sorted by row
            m, wt = _csr(r, c, b[r, c].to(torch.float32), b.shape[0], k), _scaled_wt(qweight, wkey, col_scale, cache)
        else:
            m = b.index_select(1, how).to(torch.float32)
            wt = qweight.index_select(1, how).to(torch.float32).mul_(col_scale[:, None]).t()
        return lambda out: out.addmm_(m, wt)
    return plan_


def _sparse_conv(qweight, wkey, w_scale, x_scale, cin, kernel_size, geo, elementwise: bool, cache=None):
    elementwise = _csr_ok(qweight, elementwise)
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = geo

    def plan_(b):
        how = _residual_plan(b, elementwise, (0, 2, 3), min(cin // 8, 110))
        if how is None:
            return None
        if how is _NOTHING:
            return lambda out: out
        col_scale = w_scale * x_scale
        if not isinstance(how, str):
            taps = torch.arange(kh * kw, device=b.device)
            idx = (taps[:, None] * cin + how[None, :]).reshape(-1)
            w = qweight.index_select(1, idx).to(torch.float32).mul_(col_scale[:, None])
            part = F.conv2d(b.index_select(1, how).to(torch.float32), conv_weight_view(w, kh, kw), None, *geo)
            return lambda out: out.add_(part)
        # im2col of the non-zero codes: input (n, c, h, w) feeds output (n, ho, wo) through tap (i, j) when
        # h + ph - i*dh = ho*sh (and the same along w); columns in the weight's K order (tap-major, then channel)
        bsz, _, hh, ww = b.shape
        ho_n = (hh + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo_n = (ww + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        n_, c_, h_, w_ = b.nonzero().unbind(1)
        vals = b[n_, c_, h_, w_].to(torch.float32)
        ti = torch.arange(kh, device=b.device).repeat_interleave(kw)
        tj = torch.arange(kw, device=b.device).repeat(kh)
        hs = h_[:, None] + ph - ti[None] * dh
        ws = w_[:, None] + pw - tj[None] * dw
        ok = (hs >= 0) & (ws >= 0) & (hs % sh == 0) & (ws % sw == 0)
        ho, wo = hs.div_(sh, rounding_mode="floor"), ws.div_(sw, rounding_mode="floor")
        ok &= (ho < ho_n) & (wo < wo_n)
        rows = ((n_[:, None] * ho_n + ho) * wo_n + wo)[ok]
        cols = (torch.arange(kh * kw, device=b.device)[None, :] * cin + c_[:, None])[ok]
        m = _csr(rows, cols, vals[:, None].expand(-1, kh * kw)[ok], bsz * ho_n * wo_n, kh * kw * cin)
        wt = _scaled_wt(qweight, wkey, col_scale, cache)

        def add(out):
            if out.is_contiguous(memory_format=torch.channels_last):  # oneDNN's NHWC output: [P, N] rows in place
                out.permute(0, 2, 3, 1).view(-1, out.shape[1]).addmm_(m, wt)
                return out
            return out.add_((m @ wt).view(bsz, ho_n, wo_n, -1).permute(0, 3, 1, 2))
        return add
    return plan_


def _prep_linear_onednn(w8: torch.Tensor, scale, segments):
    """Prepacked weight per activation segment + fp32 weight scale + zero points + |w| max."""
    n = w8.shape[0]
    packs = [torch.ops.onednn.qlinear_prepack(w8 if sl is None else w8[:, sl].contiguous(), None)
             for sl in segments]
    return {"packs": packs, "w_scale": scale.to(torch.float32).reshape(n).contiguous(),
            "w_zp": torch.zeros(n, dtype=torch.int64), "w_absmax": int(w8.abs().max()) if w8.numel() else 0}


def _prep_conv_onednn(w8: torch.Tensor, scale, segments, cin, kernel_size, geo):
    n = w8.shape[0]
    w4 = conv_weight_view(w8, *kernel_size)
    w_scale = scale.to(torch.float32).reshape(n).contiguous()
    stride, padding, dilation = geo
    packs = [torch.ops.onednn.qconv_prepack((w4 if sl is None else w4[:, sl]).contiguous(), w_scale, 1.0, 0,
                                            stride, padding, dilation, 1, None) for sl in segments]
    return {"packs": packs, "w_scale": w_scale, "w_zp": torch.zeros(n, dtype=torch.int64),
            "w_absmax": int(w8.abs().max()) if w8.numel() else 0}


def _segments(a_mode, a_split, channels):
    return [None] if a_mode == "dynamic" or a_split is None else [slice(0, a_split), slice(a_split, channels)]


def linear_onednn(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                  cache=None, split_sat=True, elementwise=False):
    segs = _segments(a_mode, a_split, k)
    wkey = cache_key(qweight, scale)
    prep = cached(cache, "cpu_onednn_linear", wkey + (str(segs),),
                   lambda: _prep_linear_onednn(int8_weight(qweight, zero, bits, k), scale, segs))
    shape = x.shape
    x2 = x.reshape(-1, k)
    bias32 = _as(bias, torch.float32)
    common = dict(w_scale=prep["w_scale"], w_zp=prep["w_zp"])
    if a_mode == "dynamic":
        u, s, zp = _dynamic_codes(x2, a_bits, (-1,))
        acc = _run_split(_onednn_linear_raw, u, zp, 2 ** a_bits - 1, prep["w_absmax"], split_sat, None,
                         packed=prep["packs"][0], **common)
        out = acc.mul_(s) if bias32 is None else torch.addcmul(bias32, acc, s)
    else:
        out = None
        sparse_ok = bits == 8 and zero is None and a_split is None
        for (u, s, zp), packed in zip(_static_codes(x2, a_scale, a_zero, a_bits, a_split, -1), prep["packs"]):
            sparse = _sparse_linear(qweight, wkey, prep["w_scale"], s, k, elementwise, cache) if sparse_ok else None
            part = _run_split(_onednn_linear_raw, u.contiguous(), zp, 2 ** a_bits - 1, prep["w_absmax"], split_sat,
                              bias32 if out is None else None, sparse=sparse, packed=packed, x_scale=s, **common)
            out = part if out is None else out.add_(part)
    return _as(out, x.dtype).reshape(*shape[:-1], -1)


def conv2d_onednn(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                  kernel_size, stride, padding, dilation, cache=None, split_sat=True, elementwise=False):
    cin = x.shape[1]
    geo = (list(stride), list(padding), list(dilation))
    segs = _segments(a_mode, a_split, cin)
    wkey = cache_key(qweight, scale)
    prep = cached(cache, "cpu_onednn_conv", wkey + (str(segs), str(geo), tuple(kernel_size)),
                   lambda: _prep_conv_onednn(int8_weight(qweight, zero, bits, k), scale, segs, cin, kernel_size, geo))
    bias32 = _as(bias, torch.float32)
    common = dict(w_scale=prep["w_scale"], w_zp=prep["w_zp"], geo=geo)
    cl = torch.channels_last
    if a_mode == "dynamic":
        u, s, zp = _dynamic_codes(x, a_bits, (1, 2, 3))
        acc = _run_split(_onednn_conv_raw, u.contiguous(memory_format=cl), zp, 2 ** a_bits - 1, prep["w_absmax"],
                         split_sat, None, packed=prep["packs"][0], **common)
        s = s.reshape(-1, 1, 1, 1)
        out = acc.mul_(s) if bias32 is None else torch.addcmul(bias32.reshape(1, -1, 1, 1), acc, s)
    else:
        out = None
        sparse_ok = bits == 8 and zero is None and a_split is None
        for (u, s, zp), packed in zip(_static_codes(x, a_scale, a_zero, a_bits, a_split, 1), prep["packs"]):
            sparse = _sparse_conv(qweight, wkey, prep["w_scale"], s, cin, kernel_size, geo, elementwise, cache) \
                if sparse_ok else None
            part = _run_split(_onednn_conv_raw, u.contiguous(memory_format=cl), zp, 2 ** a_bits - 1,
                              prep["w_absmax"], split_sat, bias32 if out is None else None, sparse=sparse,
                              packed=packed, x_scale=s, **common)
            out = part if out is None else out.add_(part)
    return _as(out, x.dtype)


# --- torch._int_mm --------------------------------------------------------------------------------------------------

def _prep_int_mm(w8: torch.Tensor, scale, segments):
    n = w8.shape[0]
    parts = [w8 if sl is None else w8[:, sl] for sl in segments]
    return {"wt": [p.t().contiguous() for p in parts],  # [K, N]
            "wsum": [p.to(torch.int32).sum(1) for p in parts],
            "w_scale": scale.to(torch.float32).reshape(n)}


def _signed(u: torch.Tensor, zp):
    """u8 codes -> int8 (u - 128) and the matching zero point."""
    return (u.to(torch.int16) - 128).to(torch.int8), zp - 128


def linear_int_mm(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                  cache=None):
    segs = _segments(a_mode, a_split, k)
    prep = cached(cache, "cpu_int_mm_linear", cache_key(qweight, scale, (str(segs),)),
                   lambda: _prep_int_mm(int8_weight(qweight, zero, bits, k), scale, segs))
    shape = x.shape
    x2 = x.reshape(-1, k)
    if a_mode == "dynamic":
        u, s, zp = _dynamic_codes(x2, a_bits, (-1,))
        xs, z = _signed(u, zp)
        acc = (torch._int_mm(xs, prep["wt"][0]) - z * prep["wsum"][0]).to(torch.float32)
        out = acc * s * prep["w_scale"]
    else:
        out = 0
        for (u, s, zp), wt, ws in zip(_static_codes(x2, a_scale, a_zero, a_bits, a_split, -1), prep["wt"],
                                         prep["wsum"]):
            xs, z = _signed(u, zp)
            out = out + (torch._int_mm(xs.contiguous(), wt) - z * ws).to(torch.float32) * s
        out = out * prep["w_scale"]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return _as(out, x.dtype).reshape(*shape[:-1], -1)


# --- float (dequantize-then-matmul) ---------------------------------------------------------------------------------

def linear_float(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                 cache=None, dtype=torch.float32):
    w = dequantize(qweight, scale, zero, bits, k, group_size, dtype)
    xq = fake_quant(x, a_bits, a_mode, a_scale, a_zero, a_split, channel_dim=-1, dynamic_dims=(-1,))
    out = F.linear(_as(xq, dtype), w, _as(bias, dtype))
    return _as(out, x.dtype)


def conv2d_float(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                 kernel_size, stride, padding, dilation, cache=None, dtype=torch.float32):
    w = dequantize(qweight, scale, zero, bits, k, group_size, dtype)
    # the reference's view of the weight (not a copy): same conv algorithm, same output bit for bit
    w4 = conv_weight_view(w, *kernel_size)
    xq = fake_quant(x, a_bits, a_mode, a_scale, a_zero, a_split, channel_dim=1, dynamic_dims=(1, 2, 3))
    out = F.conv2d(_as(xq, dtype), w4, _as(bias, dtype), stride, padding, dilation)
    return _as(out, x.dtype)


# --- one route ------------------------------------------------------------------------------------------------------

def linear(x, route: str, *, cache=None, dtype=torch.float32, **call):
    """The quantized linear by `route` (ROUTES); `dtype`: the float route's matmul dtype."""
    if route == "float":
        return linear_float(x, dtype=dtype, **call)
    if route == "int_mm":
        return linear_int_mm(x, cache=cache, **call)
    return linear_onednn(x, cache=cache, split_sat=route != "onednn", elementwise=route == "onednn_sparse", **call)


def conv2d(x, route: str, *, cache=None, dtype=torch.float32, **call):
    """The quantized conv2d by `route` (ROUTES other than "int_mm")."""
    if route == "float":
        return conv2d_float(x, dtype=dtype, **call)
    return conv2d_onednn(x, cache=cache, split_sat=route != "onednn", elementwise=route == "onednn_sparse", **call)


def onednn_single_call_exact() -> bool:
    """Does one oneDNN u8 x s8 call accumulate 255 * 127 pair products without saturating (VNNI/AMX: yes)?"""
    k, n = 64, 16
    u = torch.full((4, k), 255, dtype=torch.uint8)
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    out = _onednn_linear_raw(u, 0, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(n),
                             torch.zeros(n, dtype=torch.int64), None)
    return torch.equal(out.double(), u.double() @ w.double().t())

