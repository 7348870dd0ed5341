"""GGUF (city96/ComfyUI-GGUF) as a peer of bench/peers.py: a diffusers UNet quantized the way its files are made.

Follows ComfyUI-GGUF's pipeline as closely as found in its sources:

  tools/convert.py (ComfyUI-GGUF 795e451)
    * 1-D tensors and tensors with <= QUANTIZATION_THRESHOLD (1024) elements -> F32
      (only when the source is f32/bf16), everything else -> F16 intermediate file.
    * shape_fix (sd1/sdxl only): a tensor with n_dims > 1, n_params >= 512,
      n_params % 256 == 0 and shape[-1] % 256 != 0 is reshaped to (n_params//256, 256);
      the original shape is stored as metadata "comfy.gguf.orig_shape.<key>".
  tools/lcpp.patch (llama.cpp b3962 llama-quantize)
    * only names ending in "weight", 2-D after the reshape (image models: n_dims == 2),
      not "_norm.weight"; for sd1/sdxl additionally NOT: class_embedding., time_embedding.,
      add_embedding., time_embed., label_emb., conv_in., conv_out.,
      input_blocks.0.0.weight, out.2.weight.
    * img_tensor_get_type(): per-tensor type bumps for to_v / ff.net.2 in the _M/_L/Q4_K_S/Q2_K mixes.
    * K-quant with row length (ne[0]) % 256 != 0 -> fallback F16.
  ops.py / dequant.py
    * GGMLOps.Linear / Conv2d (also Embedding/LayerNorm/GroupNorm, irrelevant here, those
      weights are never quantized for sd1) dequantize the weight on every forward, then cast
      to the compute (input) dtype.

Quantization of the blocks:
  * Q8_0/Q5_0/Q5_1/Q4_0/Q4_1: gguf.quants.quantize (gguf-py numpy reference).
  * Q2_K..Q6_K: gguf-py (0.19.0) cannot quantize these (NotImplementedError), so this file
    contains a vectorised numpy port of ggml's quantize_row_qN_K_ref (ggml-quants.c, MIT License, (c) the ggml
    authors): the path llama-quantize takes without an imatrix. When it was written it gave the same bytes as that C
    code compiled without FMA contraction; tests/test_peers_bench.py checks it against gguf's own decoder.
  * dequantization: gguf.quants.dequantize (numpy, float32) on every forward. (ComfyUI's torch
    dequant with its default dequant_dtype=None does the block arithmetic in fp16 and then casts
    to the compute dtype -> at most ~1 fp16 ulp different; irrelevant next to the quant error.)

The intermediate F16 step of the real pipeline is reproduced (weights are rounded to fp16
before quantizing, unquantized "kept" tensors are F16 / F32 exactly as the file would hold),
unless emulate_f16_file=False.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from torch import nn

QK_K = 256
QUANTIZATION_THRESHOLD = 1024  # tools/convert.py
REARRANGE_THRESHOLD = 512  # tools/convert.py
GROUP_MAX_EPS = np.float32(1e-15)
f32 = np.float32

# --------------------------------------------------------------------------------------
# numpy port of ggml quantize_row_q{2,3,4,5,6}_K_ref
# --------------------------------------------------------------------------------------

def _seqsum(a):
    """Sequential float32 sum over axis 0 of a (n, B) array (matches a C `for` accumulation,
    unlike numpy's pairwise sum). Row-wise adds on contiguous rows are fast."""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def _nint(a):
    """ggml nearest_int: round half to even (magic-number trick) -> int32."""
    return np.rint(a).astype(np.int32)


def _fp16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16)


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Port of make_qkx2_quants. x, w: (B, n) float32 -> (scale (B,), the_min (B,), L (B, n) uint8)."""
    x = np.ascontiguousarray(x.T)  # (n, B): per-block quantities broadcast along axis 0
    w = np.ascontiguousarray(w.T)
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    mn = np.minimum(mn, f32(0))
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / (mx - mn)
        scale = f32(1) / iscale
        L = np.clip(_nint(iscale * (x - mn)), 0, nmax)
        diff = scale * L.astype(np.float32) + mn - x
        diff = np.abs(diff) if use_mad else diff * diff
        best = _seqsum(w * diff)
        for is_ in range(nstep + 1):
            # NB: the C code uses the *current* (possibly updated) min here
            isc = (f32(rmin) + f32(rdelta) * f32(is_) + f32(nmax)) / (mx - mn)
            La = np.clip(_nint(isc * (x - mn)), 0, nmax)
            Laf = La.astype(np.float32)
            wl = w * Laf
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * Laf)
            sum_xl = _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ts = (sum_w * sum_xl - sum_x * sum_l) / D
            tm = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = tm > 0
            tm = np.where(pos, f32(0), tm)
            ts = np.where(pos, sum_xl / sum_l2, ts)
            d2 = ts * Laf + tm - x
            d2 = np.abs(d2) if use_mad else d2 * d2
            cur = _seqsum(w * d2)
            upd = (D > 0) & (cur < best) & ~flat
            L = np.where(upd, La, L)
            best = np.where(upd, cur, best)
            scale = np.where(upd, ts, scale)
            mn = np.where(upd, tm, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, f32(0), scale)
    return scale.astype(np.float32), (-mn).astype(np.float32), np.ascontiguousarray(L.T).astype(np.uint8)


def _absmax_signed(x):
    """x (n, B): value with the largest |x| (first one on ties, as the strict '>' in C)."""
    idx = np.argmax(np.abs(x), axis=0)
    mx = np.take_along_axis(x, idx[None, :], axis=0)[0]
    return np.abs(mx), mx


def _make_qx_quants_rmse1(x, nmax):
    """Port of make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL). x (B, n) -> scale (B,), L (B, n) int."""
    x = np.ascontiguousarray(x.T)
    amax, mx = _absmax_signed(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-nmax) / mx
        l = np.clip(_nint(iscale * x), -nmax, nmax - 1)
        lf = l.astype(np.float32)
        sumlx = _seqsum(wx * lf)
        suml2 = _seqsum(w * lf * lf)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        L = l + nmax
        for is_ in range(-9, 10):
            if is_ == 0:
                continue
            isc = -(f32(nmax) + f32(0.1) * f32(is_)) / mx
            l = np.clip(_nint(isc * x), -nmax, nmax - 1)
            lf = l.astype(np.float32)
            slx = _seqsum(wx * lf)
            sl2 = _seqsum(w * lf * lf)
            upd = (sl2 > 0) & (slx * slx > best * sl2) & ~zero
            L = np.where(upd, l + nmax, L)
            scale = np.where(upd, slx / sl2, scale)
            best = np.where(upd, scale * slx, best)
    L = np.where(zero, 0, L)
    scale = np.where(zero, f32(0), scale)
    return scale.astype(np.float32), np.ascontiguousarray(L.T).astype(np.int32)


def _make_q3_quants_rmse(x, nmax=4):
    """Port of make_q3_quants(n, nmax, x, L, do_rmse=true). x (B, n) -> scale (B,), L (B, n) int."""
    x = np.ascontiguousarray(x.T)
    amax, mx = _absmax_signed(x)
    zero = amax < GROUP_MAX_EPS
    n = x.shape[0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-nmax) / mx
        L = np.clip(_nint(iscale * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        Lf = L.astype(np.float32)
        sumlx = _seqsum(wx * Lf)
        suml2 = _seqsum(w * Lf * Lf)
        for _ in range(5):
            # (the C loop breaks early when nothing changed; a pass without change is a no-op)
            for i in range(n):
                wi, xi, wxi = w[i], x[i], wx[i]
                Li = L[i].astype(np.float32)
                slx = sumlx - wxi * Li
                c1 = slx > 0
                sl2 = suml2 - wi * Li * Li
                new_l = np.clip(_nint(xi * sl2 / slx), -nmax, nmax - 1)
                nlf = new_l.astype(np.float32)
                c2 = c1 & (new_l != L[i])
                slx2 = slx + wxi * nlf
                sl22 = sl2 + wi * nlf * nlf
                acc = c2 & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = np.where(acc, new_l, L[i])
                sumlx = np.where(acc, slx2, sumlx)
                suml2 = np.where(acc, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    L = np.where(zero, 0, L + nmax)
    scale = np.where(zero, f32(0), scale)
    return scale.astype(np.float32), np.ascontiguousarray(L.T).astype(np.int32)


def _pack_scale_min_k4(ls, lm):
    """ls, lm: (nb, 8) uint8 (<=63) -> (nb, 12) uint8, as in quantize_row_q4_K_ref."""
    nb = ls.shape[0]
    s = np.zeros((nb, 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


def _unpack_scale_min_k4(s):
    sc = np.empty((s.shape[0], 8), np.uint8)
    m = np.empty((s.shape[0], 8), np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    m[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _q45_common(x, nmax, rmin, rdelta, nstep):
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    sum_x2 = _seqsum(np.ascontiguousarray((xs * xs).T))
    av_x = np.sqrt(sum_x2 / f32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, False)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 8, 32).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(_nint(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nint(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    sc_bytes = _pack_scale_min_k4(ls, lm)
    d = _fp16(max_scale / f32(63))
    dmin = _fp16(max_min / f32(63))
    sc, m = _unpack_scale_min_k4(sc_bytes)
    dd = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    dm = dmin.astype(np.float32)[:, None] * m.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(_nint((x.reshape(nb, 8, 32) + dm[..., None]) / dd[..., None]), 0, nmax)
    L = np.where((dd != 0)[..., None], Ln, L).reshape(nb, 256)
    return d, dmin, sc_bytes, L


def _quant_q4_K(x):
    nb = x.shape[0]
    d, dmin, sc, L = _q45_common(x, 15, -1.0, 0.1, 20)
    Lr = L.reshape(nb, 4, 2, 32)
    qs = (Lr[:, :, 0, :] | (Lr[:, :, 1, :] << 4)).astype(np.uint8).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), sc, qs], axis=1)


def _quant_q5_K(x):
    nb = x.shape[0]
    d, dmin, sc, L = _q45_common(x, 31, -0.5, 0.1, 15)
    Lr = L.reshape(nb, 4, 2, 32)
    hi = (Lr > 15).astype(np.uint8)
    lo = (Lr & 0xF).astype(np.uint8)
    qh = np.zeros((nb, 32), np.uint8)
    for k in range(4):
        qh |= hi[:, k, 0, :] << (2 * k)
        qh |= hi[:, k, 1, :] << (2 * k + 1)
    qs = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), sc, qh, qs], axis=1)


def _signed_sub_blocks(x, make, nmax):
    """Q6_K / Q3_K: each block's 16 sub-blocks of 16 quantized by `make`, and the scale of largest magnitude (signed)."""
    nb = x.shape[0]
    scales, L = make(x.reshape(nb * 16, 16), nmax)
    scales = scales.reshape(nb, 16)
    idx = np.argmax(np.abs(scales), axis=1)
    return nb, scales, L.reshape(nb, 16, 16), np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]


def _quant_q6_K(x):
    nb, scales, L, max_scale = _signed_sub_blocks(x, _make_qx_quants_rmse1, 32)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-128) / max_scale
        d = _fp16(f32(1) / iscale)
        d = np.where(zero, np.float16(0), d)
        qsc = np.minimum(127, _nint(iscale[:, None] * scales))
        qsc = np.where(zero[:, None], 0, qsc).astype(np.int8)
        dd = d.astype(np.float32)[:, None] * qsc.astype(np.float32)
        Ln = np.clip(_nint(x.reshape(nb, 16, 16) / dd[..., None]), -32, 31) + 32
    L = np.where((dd != 0)[..., None], Ln, L)
    L = np.where(zero[:, None, None], 0, L).reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.empty((nb, 2, 64), np.uint8)
    ql[:, :, 0:32] = (L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), qsc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)


def _quant_q3_K(x):
    nb, scales, L, max_scale = _signed_sub_blocks(x, _make_q3_quants_rmse, 4)
    nz = max_scale != 0
    sc = np.zeros((nb, 12), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-32) / max_scale
        l = (np.clip(_nint(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32)
        l = np.where(nz[:, None], l, 0).astype(np.uint8)
        sc[:, 0:8] = l[:, 0:8] & 0xF
        sc[:, 0:8] |= (l[:, 8:16] & 0xF) << 4
        hi = l >> 4
        for j in range(16):
            sc[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
        sc = np.where(nz[:, None], sc, 0).astype(np.uint8)
        d = np.where(nz, _fp16(f32(1) / iscale), np.float16(0))
        # decode the 6-bit scales back
        q = np.empty((nb, 16), np.int32)
        q[:, 0:8] = sc[:, 0:8] & 0xF
        q[:, 8:16] = sc[:, 0:8] >> 4
        for j in range(16):
            q[:, j] |= ((sc[:, 8 + j % 4] >> (2 * (j // 4))) & 3).astype(np.int32) << 4
        q = (q - 32).astype(np.int8)
        dd = d.astype(np.float32)[:, None] * q.astype(np.float32)
        Ln = np.clip(_nint(x.reshape(nb, 16, 16) / dd[..., None]), -4, 3) + 4
    L = np.where((dd != 0)[..., None], Ln, L).reshape(nb, 256)
    high = L > 3
    L = np.where(high, L - 4, L).astype(np.uint8)
    hmask = np.zeros((nb, 32), np.uint8)
    hr = high.reshape(nb, 8, 32).astype(np.uint8)
    for b in range(8):
        hmask |= hr[:, b, :] << b
    Lr = L.reshape(nb, 2, 4, 32)
    qs = (Lr[:, :, 0] | (Lr[:, :, 1] << 2) | (Lr[:, :, 2] << 4) | (Lr[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([hmask, qs, sc, d.view(np.uint8).reshape(nb, 2)], axis=1)


def _quant_q2_K(x):
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    L = L.reshape(nb, 16, 16).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        isc = f32(15) / max_scale
        qsc = np.where((max_scale > 0)[:, None], _nint(isc[:, None] * scales), 0)
        d = np.where(max_scale > 0, _fp16(max_scale / f32(15)), np.float16(0))
        imn = f32(15) / max_min
        qmn = np.where((max_min > 0)[:, None], _nint(imn[:, None] * mins), 0)
        dmin = np.where(max_min > 0, _fp16(max_min / f32(15)), np.float16(0))
        scb = ((qsc & 0xFF) | ((qmn << 4) & 0xFF)).astype(np.uint8)
        dd = d.astype(np.float32)[:, None] * (scb & 0xF).astype(np.float32)
        dm = dmin.astype(np.float32)[:, None] * (scb >> 4).astype(np.float32)
        Ln = np.clip(_nint((x.reshape(nb, 16, 16) + dm[..., None]) / dd[..., None]), 0, 3)
    L = np.where((dd != 0)[..., None], Ln, L).reshape(nb, 2, 4, 32).astype(np.uint8)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([scb, qs, d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2)], axis=1)


_KQUANT = {QT.Q2_K: _quant_q2_K, QT.Q3_K: _quant_q3_K, QT.Q4_K: _quant_q4_K, QT.Q5_K: _quant_q5_K, QT.Q6_K: _quant_q6_K}


def quantize_np(data: np.ndarray, qtype: QT, chunk_blocks: int = 16384) -> np.ndarray:
    """Like gguf.quants.quantize (same byte layout / shape) but also supports Q2_K..Q6_K."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype not in _KQUANT:
        return gguf.quants.quantize(data, qtype)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % bs:
        raise gguf.QuantError(f"row size {data.shape[-1]} not a multiple of {bs}")
    blocks = data.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), np.uint8)
    for s in range(0, blocks.shape[0], chunk_blocks):
        out[s:s + chunk_blocks] = _KQUANT[qtype](blocks[s:s + chunk_blocks])
    return out.reshape(*data.shape[:-1], data.shape[-1] // bs * ts)


# --------------------------------------------------------------------------------------
# ComfyUI-GGUF conventions for sd1 / sdxl
# --------------------------------------------------------------------------------------

# file type -> default tensor type (llama.cpp llama_model_quantize_internal)
FTYPE_DEFAULT = {
    "Q8_0": QT.Q8_0, "Q6_K": QT.Q6_K, "Q5_K_S": QT.Q5_K, "Q5_K_M": QT.Q5_K,
    "Q4_K_S": QT.Q4_K, "Q4_K_M": QT.Q4_K, "Q3_K_S": QT.Q3_K, "Q3_K_M": QT.Q3_K,
    "Q3_K_L": QT.Q3_K, "Q2_K": QT.Q2_K, "Q5_0": QT.Q5_0, "Q5_1": QT.Q5_1,
    "Q4_0": QT.Q4_0, "Q4_1": QT.Q4_1, "F16": QT.F16,
}
# lcpp.patch: quantize &= name.find(X) == npos  for sd1/sdxl
SD_EXCLUDE_SUBSTR = ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.", "conv_in.", "conv_out.")
SD_EXCLUDE_EXACT = ("input_blocks.0.0.weight", "out.2.weight")
_TO_V = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight", "_attn.v_proj.weight")
_QKV = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
_FFN_DOWN = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight", ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight")


class _TypeState:
    def __init__(self):
        self.i_attention_wv = 0


def img_tensor_get_type(st: _TypeState, new_type: QT, name: str, ne0: int, ftype: str) -> QT:
    """Port of lcpp.patch img_tensor_get_type() (incl. the K-quant ne[0] % 256 -> F16 fallback)."""
    if any(s in name for s in _TO_V):
        if ftype == "Q2_K":
            new_type = QT.Q3_K
        elif ftype == "Q3_K_M":
            new_type = QT.Q5_K if st.i_attention_wv < 2 else QT.Q4_K
        elif ftype == "Q3_K_L":
            new_type = QT.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M"):
            new_type = QT.Q6_K
        elif ftype == "Q4_K_S" and st.i_attention_wv < 4:
            new_type = QT.Q5_K
        st.i_attention_wv += 1
    elif any(s in name for s in _QKV):
        if ftype in ("Q3_K_M", "Q3_K_L"):
            new_type = QT.Q4_K
        elif ftype == "Q4_K_M":
            new_type = QT.Q5_K
        elif ftype == "Q5_K_M":
            new_type = QT.Q6_K
    elif any(s in name for s in _FFN_DOWN) or ("experts." in name and ".w2.weight" in name):
        new_type = {"Q3_K_M": QT.Q4_K, "Q3_K_L": QT.Q5_K, "Q4_K_S": QT.Q5_K, "Q4_K_M": QT.Q6_K,
                    "Q5_K_M": QT.Q6_K, "Q4_0": QT.Q4_1, "Q5_0": QT.Q5_1}.get(ftype, new_type)
    if new_type in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K) and ne0 % QK_K != 0:
        new_type = QT.F16  # "using fallback quantization"
    return new_type


@dataclass
class TensorPlan:
    name: str
    orig_shape: tuple
    file_shape: tuple  # shape after convert.py shape_fix (torch order, last dim = ggml ne[0])
    qtype: QT
    reason: str


def plan_tensor(name: str, shape: tuple, src_dtype: torch.dtype, ftype: str, st: _TypeState,
                shape_fix: bool = True, pure: bool = False) -> TensorPlan:
    """What convert.py + patched llama-quantize (sd1/sdxl arch) would store for this tensor.
    ftype: llama-quantize file type ('Q4_K_S', 'Q8_0', ...). pure: no per-tensor bumps."""
    n_dims = len(shape)
    n = int(np.prod(shape)) if shape else 1
    # --- convert.py: F16 file, 1-D / tiny tensors F32 (for an f32/bf16 source)
    qtype, reason = QT.F16, "kept F16 (convert.py)"
    if src_dtype in (torch.float32, torch.bfloat16):
        if n_dims == 1:
            qtype, reason = QT.F32, "kept F32 (1-D)"
        elif n <= QUANTIZATION_THRESHOLD:
            qtype, reason = QT.F32, "kept F32 (<=1024 elems)"
    fshape = tuple(shape)
    if shape_fix and n_dims > 1 and n >= REARRANGE_THRESHOLD and n % 256 == 0 and shape[-1] % 256 != 0:
        fshape = (n // 256, 256)
    # --- llama-quantize b3962 + lcpp.patch
    ne = list(reversed(fshape))
    while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims ignores trailing size-1 dims
        ne.pop()
    quantize = name.endswith("weight") and "_norm.weight" not in name
    quantize &= not any(s in name for s in SD_EXCLUDE_SUBSTR) and name not in SD_EXCLUDE_EXACT
    if not quantize:
        return TensorPlan(name, tuple(shape), fshape, qtype, reason + "; excluded by name")
    if len(ne) != 2:  # image models: quantize &= ggml_n_dims(tensor) == 2
        return TensorPlan(name, tuple(shape), fshape, qtype, reason + f"; {len(ne)}-D not quantized")
    if ftype in ("F16", "F32"):
        return TensorPlan(name, tuple(shape), fshape, qtype, reason)
    default = FTYPE_DEFAULT[ftype]
    new_type = img_tensor_get_type(st, default, name, fshape[-1], ftype)
    if pure and new_type != QT.F16:
        new_type = default
    if new_type == QT.F16:
        return TensorPlan(name, tuple(shape), fshape, QT.F16, "F16 fallback (K-quant, row % 256 != 0)")
    bs, _ = gguf.GGML_QUANT_SIZES[new_type]
    if fshape[-1] % bs:
        # legacy 32-blocks: llama-quantize would abort; convert.py's python path falls back to F16
        return TensorPlan(name, tuple(shape), fshape, QT.F16, f"F16 fallback (row % {bs} != 0)")
    return TensorPlan(name, tuple(shape), fshape, new_type, "quantized")


class GGUFWeight(nn.Module):
    """Holds one weight as raw GGUF bytes (uint8 buffer) + shape; dequantizes on demand."""

    def __init__(self, raw: np.ndarray, qtype: QT, file_shape, orig_shape):
        super().__init__()
        if qtype == QT.F16:  # a kept tensor: its fp16 values (F16 in the file)
            raw = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.float16).copy())
        else:
            raw = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8).copy())
        self.register_buffer("raw", raw)
        self.qtype = qtype
        self.file_shape = tuple(file_shape)
        self.orig_shape = tuple(orig_shape)
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        self.row_bytes = file_shape[-1] // bs * ts

    def dequant(self, dtype, device) -> torch.Tensor:
        if self.qtype == QT.F16:
            return self.raw.reshape(self.orig_shape).to(device=device, dtype=dtype)
        raw = self.raw.cpu().numpy().reshape(-1, self.row_bytes)
        w = gguf.quants.dequantize(raw, self.qtype)  # float32 numpy
        return torch.from_numpy(w).reshape(self.orig_shape).to(device=device, dtype=dtype)

    def nbytes(self):
        return self.raw.numel() * self.raw.element_size()


class GGUFLinear(nn.Module):
    def __init__(self, lin: nn.Linear, qw: GGUFWeight):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.qweight = qw
        self.bias = lin.bias

    @property
    def weight(self):  # what the file stores for this weight (uint8 blocks, or fp16 where kept)
        return self.qweight.raw

    def forward(self, x):
        w = self.qweight.dequant(x.dtype, x.device)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)


class GGUFConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, qw: GGUFWeight):
        super().__init__()
        self.conv = conv  # keeps hyper-params; its float weight is deleted below
        self.qweight = qw

    @property
    def weight(self):
        return self.qweight.raw

    def forward(self, x):
        c = self.conv
        w = self.qweight.dequant(x.dtype, x.device)
        b = None if c.bias is None else c.bias.to(x.dtype)
        return c._conv_forward(x, w, b)


def _layers(model: nn.Module):
    # llama-quantize visits tensors in name order (ml.weights_map is a std::map in current
    # llama.cpp); i_attention_wv (Q4_K_S/Q3_K_M to_v bumps) counts to_v tensors in that order.
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))),
                  key=lambda nm: nm[0])


def plan_model(model: nn.Module, qtype_name: str) -> list[TensorPlan]:
    """What a ComfyUI-GGUF file of type `qtype_name` holds for each Linear / Conv2d weight of `model` (in name
    order); needs only the shapes (a model on the meta device will do)."""
    ftype = qtype_name.upper()
    pure = ftype in ("Q5_K", "Q4_K", "Q3_K")
    if pure:
        ftype += "_S"
    if ftype not in FTYPE_DEFAULT:
        raise ValueError(f"unknown GGUF type {qtype_name}")
    st = _TypeState()
    return [plan_tensor(name + ".weight", tuple(m.weight.shape), m.weight.dtype, ftype, st, pure=pure)
            for name, m in _layers(model)]


def gguf_quantize_model(model: nn.Module, qtype_name: str, emulate_f16_file: bool = True,
                        return_report: bool = False):
    """Quantize the nn.Linear / nn.Conv2d weights of a diffusers UNet the way ComfyUI-GGUF's
    convert.py + lcpp.patch llama-quantize do for arch sd1/sdxl.

    qtype_name: a llama-quantize file type ('Q8_0', 'Q6_K', 'Q5_K_S', 'Q5_K_M', 'Q4_K_S',
    'Q4_K_M', 'Q3_K_S', 'Q3_K_M', 'Q3_K_L', 'Q2_K', 'Q5_0', 'Q5_1', 'Q4_0', 'Q4_1', 'F16'), or a
    plain tensor type 'Q5_K'/'Q4_K'/'Q3_K' (= the _S mix without any per-tensor bump).
    emulate_f16_file: the quantizer reads an F16 GGUF (convert.py), so weights are rounded to
    fp16 first and kept (unquantized) >1024-element weights are stored/used as fp16.
    Modules are replaced in place; returns the model (and, optionally, the per-tensor plan)."""
    report = []
    for (name, mod), plan in zip(_layers(model), plan_model(model, qtype_name)):
        w = mod.weight.detach()
        report.append(plan)
        if plan.qtype == QT.F32 or (plan.qtype == QT.F16 and not emulate_f16_file):
            continue  # stays a float32 nn.Parameter (what the file holds for 1-D / <=1024 elems)
        arr = w.float().cpu().numpy()
        if emulate_f16_file:
            arr = arr.astype(np.float16).astype(np.float32)
        # F16 kept tensors are stored as real fp16 bytes and cast per forward (ComfyUI manual_cast)
        raw = quantize_np(arr.reshape(plan.file_shape), plan.qtype)
        qw = GGUFWeight(raw, plan.qtype, plan.file_shape, plan.orig_shape)
        if isinstance(mod, nn.Linear):
            new = GGUFLinear(mod, qw)
        else:
            del mod.weight  # drop the float weight; the Conv2d is kept only for its hyper-params
            mod.register_parameter("weight", None)
            new = GGUFConv2d(mod, qw)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return (model, report) if return_report else model
