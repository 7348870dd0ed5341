"""Triton kernels for quantized linear layers: int8 tensor-core GEMMs for W8A8 / W4A8 / W2A8 and float GEMMs for
weight-only W8/W4/W2 (A16), all reading the packed weight directly.

Layouts are the contract of kernels/packing.py and kernels/reference.py: the weight is [N, K] codes (int8, or 4/2-bit
unsigned codes packed along K, element 2j in the low nibble), fp16 scales [N, G] and optional uint8 zero points [N, G]
(implicit mid code when absent), all views with a row stride into one joined blob. Static activations are asymmetric
per-tensor codes 0..2**b-1 (two channel segments with a split), dynamic ones symmetric per token.

How a call runs (`qlinear`):
- A8, few output tiles: activations are quantized in the GEMM prologue (`_qgemm_kernel`, A_IN=float).
- A8, many output tiles: `_quant_rows_kernel` writes int8 codes once (and the per-token scales), then the GEMM reads
  int8 (A_IN=int8). Quantizing in the prologue repeats the work N / BLOCK_N times; on tensor-core GPUs that costs
  more than one extra int8 pass once N spans more than a few tiles (`prequant` decides; bench/kernels.py measures).
- The K loop unpacks 4/2-bit codes in registers (never an int8 weight in memory), subtracts the zero point and runs
  an int8 x int8 -> int32 `tl.dot`. Static zero points use sum_k (q_k - z) w_k = sum_k q'_k w_k - z' sum_k w_k with
  q' = q - 128 (int8), so the column sums of the weight tile ride along. Group scales are applied at each group's
  end (the int32 accumulator is scaled into an fp32 one and reset).
- Epilogue in fp32: x activation scale(s) x weight scale + bias, stored in the activation dtype.
- A16 (weight-only): the same loop with a float dot. Per-channel scales: the unpacked integer weights as fp16/bf16
  (exact), scales in the epilogue. Group scales: the weight tile is dequantized in the K loop (code x scale in fp32,
  then the dot dtype: the reference's own rounding), so one accumulator runs through K untouched.
- The float dot also serves A8 calls (on the fake-quantized activations): the autotuner's config space holds both
  INT_DOT=True and INT_DOT=False, so a shape takes whichever is faster on the GPU it runs on. Without autotuning,
  grouped A8 weights take the float dot (`default_int_dot`): the int8 dot's per-group flush ran W4A8 g64 at
  0.15-0.3x fp16 on an H100 (bench/results/kernels_h100.md).

Rounding: codes use round-half-to-even of an exactly rounded division (the reference's torch ops), so the interpreter
reproduces the reference bit for bit; compiled kernels multiply by the reciprocal (EXACT_DIV=False), which can move a
code by one at an exact tie.
"""
from __future__ import annotations

import functools
import os

import torch

from .cache import cache_key, cached, weight_keeps_moving

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the package works without Triton; dispatch then never selects these kernels
    triton = None
    tl = None
    HAVE_TRITON = False


# Triton reads TRITON_INTERPRET when a kernel is decorated (this module's import), so it is read once here too.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRET


def available(device: torch.device | str | None = None) -> str | None:
    """None when the Triton kernels can run on `device`, else why not (decided once per device: the dispatcher's
    rules and the fused producers ask on every call)."""
    return _available(torch.device(device) if device is not None else None)


@functools.lru_cache(maxsize=None)
def _available(dev: torch.device | None) -> str | None:
    if not HAVE_TRITON:
        return "triton is not installed"
    if interpreting():
        return None if dev is None or dev.type == "cpu" else "TRITON_INTERPRET=1 runs on CPU tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if dev is not None and dev.type != "cuda":
        return "tensor is not on a CUDA device"
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 8:
        return "needs compute capability >= 8.0 (int8 mma.sync)"
    return None


A_NONE, A_STATIC, A_DYNAMIC = 0, 1, 2
_A_MODES = {"none": A_NONE, "static": A_STATIC, "dynamic": A_DYNAMIC}


if HAVE_TRITON:
    # --------------------------------------------------------------------------------------------------------------
    # shared device helpers (also used by kernels/triton_conv.py)

    @triton.jit
    def rint_(v):
        """Round half to even, like torch.round: adding and subtracting 1.5 * 2**23 leaves an integer rounded by the
        FPU's own round-to-nearest-even (valid for |v| < 2**22, hence the clamp; codes are clamped far below)."""
        v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def divide_(x, s, EXACT_DIV: tl.constexpr):
        if EXACT_DIV:
            return tl.math.div_rn(x, s)
        else:
            return x * (1.0 / s)

    @triton.jit
    def static_codes_(x, s, z, QMAX: tl.constexpr, EXACT_DIV: tl.constexpr):
        """Asymmetric codes in [0, QMAX] as fp32: clamp(round(x / s) + z, 0, QMAX)."""
        return tl.minimum(tl.maximum(rint_(divide_(x, s, EXACT_DIV)) + z, 0.0), QMAX)

    @triton.jit
    def dynamic_codes_(x, s, QMAX: tl.constexpr, EXACT_DIV: tl.constexpr):
        """Symmetric codes in [-QMAX-1, QMAX] as fp32."""
        return tl.minimum(tl.maximum(rint_(divide_(x, s, EXACT_DIV)), -QMAX - 1.0), QMAX)

    @triton.jit
    def weight_tile_(W, stride_wn, Z, stride_zn, offs_n, offs_k, k0, g, N, K,
                     W_BITS: tl.constexpr, HAS_WZ: tl.constexpr, AS_INT8: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weight tile [BLOCK_N, BLOCK_K] (rows offs_n, columns k0 + arange) as codes minus zero point (group
        g's, or the implicit mid code), zero outside the matrix; int8 when AS_INT8, else int32. 8-bit symmetric
        codes are used as loaded; 4/2-bit codes are unpacked from their bytes in registers."""
        n_ok = offs_n[:, None] < N
        if W_BITS == 8 and not HAS_WZ:
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok & (offs_k[None, :] < K),
                        other=0)
            if AS_INT8:
                return w
            else:
                return w.to(tl.int32)
        else:
            if W_BITS == 8:
                w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok & (offs_k[None, :] < K),
                            other=0).to(tl.int32)
            elif W_BITS == 4:
                offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                # bytes past the codes (a partial last block) stay inside the row (scales, padding): they are
                # masked out below after unpacking; bounding by the row stride (a multiple of 16, kernels/
                # packing.py) keeps the load vectorizable, which a bound of ceil(K / 2) would not
                b = tl.load(W + offs_n[:, None] * stride_wn + offs_b[None, :],
                            mask=n_ok & (offs_b[None, :] < stride_wn), other=0).to(tl.int32)
                w = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))
            else:
                offs_b = k0 // 4 + tl.arange(0, BLOCK_K // 4)
                b = tl.load(W + offs_n[:, None] * stride_wn + offs_b[None, :],
                            mask=n_ok & (offs_b[None, :] < stride_wn), other=0).to(tl.int32)
                w = tl.reshape(tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6)),
                               (BLOCK_N, BLOCK_K))
            if HAS_WZ:
                z = tl.load(Z + offs_n * stride_zn + g, mask=offs_n < N, other=0).to(tl.int32)
                w = w - z[:, None]
            elif W_BITS < 8:
                w = w - (1 << (W_BITS - 1))
            w = tl.where(offs_k[None, :] < K, w, 0)
            if AS_INT8:
                return w.to(tl.int8)
            else:
                return w

    @triton.jit
    def dot_step_(a0, a1, w, acc0, acc1, wsum, A_MODE: tl.constexpr, HAS_SPLIT: tl.constexpr,
                  INT_DOT: tl.constexpr, WSUM_IN: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """One K block: int8 x int8 -> int32 (plus the weight column sums a static zero point needs, unless they
        were precomputed) or a float dot on the integer-valued weights."""
        if INT_DOT:
            wt = tl.trans(w)
            acc0 = tl.dot(a0, wt, acc0, out_dtype=tl.int32)
            if HAS_SPLIT:
                acc1 = tl.dot(a1, wt, acc1, out_dtype=tl.int32)
            if A_MODE == 1 and not WSUM_IN:
                wsum += tl.sum(w.to(tl.int32), axis=1)
        else:
            acc0 = tl.dot(a0, tl.trans(w.to(DOT_DTYPE)), acc0, out_dtype=tl.float32)
        return acc0, acc1, wsum

    @triton.jit
    def group_sum_(acc0, acc1, wsum, WSUM, stride_wsn, S, stride_sn, offs_n, g, N, AS, AZ,
                   A_MODE: tl.constexpr, A_IN_INT8: tl.constexpr, HAS_SPLIT: tl.constexpr, INT_DOT: tl.constexpr,
                   WSUM_IN: tl.constexpr):
        """fp32 contribution of group g (or of the whole K): zero-point correction, activation scale(s), weight
        scale."""
        if WSUM_IN and INT_DOT and A_MODE == 1:
            wsum = tl.load(WSUM + offs_n * stride_wsn + g, mask=offs_n < N, other=0)
        s_g = tl.load(S + offs_n * stride_sn + g, mask=offs_n < N, other=0.0).to(tl.float32)
        return block_sum_(acc0, acc1, wsum, AS, AZ, A_MODE, A_IN_INT8, HAS_SPLIT, INT_DOT) * s_g[None, :]

    @triton.jit
    def act_tile_(xf, ch, s_row, AS, AZ, SPLIT,
                  A_MODE: tl.constexpr, HAS_SPLIT: tl.constexpr, INT_DOT: tl.constexpr, A_QMAX: tl.constexpr,
                  EXACT_DIV: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """Quantize a float activation tile in the prologue. ch: channel index of each column (for the split).
        INT_DOT: returns (int8 codes for segment 0, for segment 1) as q - 128 (static; the other segment's columns
        hold that segment's zero code, so they cancel in the zero-point correction) or q (dynamic).
        Float dot: returns the fake-quantized values twice, in DOT_DTYPE."""
        if A_MODE == 0:
            a = xf.to(DOT_DTYPE)
            return a, a
        elif A_MODE == 1:
            s0 = tl.load(AS)
            z0 = tl.load(AZ)
            if HAS_SPLIT:
                s1 = tl.load(AS + 1)
                z1 = tl.load(AZ + 1)
                seg1 = ch[None, :] >= SPLIT
                s = tl.where(seg1, s1, s0)
                z = tl.where(seg1, z1, z0)
                q = static_codes_(xf, s, z, A_QMAX, EXACT_DIV)
                if INT_DOT:
                    a0 = tl.where(seg1, z0, q) - 128.0
                    a1 = tl.where(seg1, q, z1) - 128.0
                    return a0.to(tl.int8), a1.to(tl.int8)
                else:
                    a = ((q - z) * s).to(DOT_DTYPE)
                    return a, a
            else:
                q = static_codes_(xf, s0, z0, A_QMAX, EXACT_DIV)
                if INT_DOT:
                    a = (q - 128.0).to(tl.int8)
                    return a, a
                else:
                    a = ((q - z0) * s0).to(DOT_DTYPE)
                    return a, a
        else:
            q = dynamic_codes_(xf, s_row[:, None], A_QMAX, EXACT_DIV)
            if INT_DOT:
                a = q.to(tl.int8)
                return a, a
            else:
                a = (q * s_row[:, None]).to(DOT_DTYPE)
                return a, a

    @triton.jit
    def int8_tile_(a8, ch, AZ, SPLIT, A_MODE: tl.constexpr, HAS_SPLIT: tl.constexpr, INT_DOT: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, AS):
        """The same as act_tile_ for codes already quantized by _quant_rows_kernel (q - 128 static, q dynamic)."""
        if INT_DOT:
            if HAS_SPLIT:
                z0 = (tl.load(AZ) - 128.0).to(tl.int8)
                z1 = (tl.load(AZ + 1) - 128.0).to(tl.int8)
                seg1 = ch[None, :] >= SPLIT
                return tl.where(seg1, z0, a8), tl.where(seg1, a8, z1)
            else:
                return a8, a8
        else:  # float dot over int8 codes: fake-quantized values
            q = a8.to(tl.float32)
            if A_MODE == 1:
                s0 = tl.load(AS)
                z0 = tl.load(AZ) - 128.0
                if HAS_SPLIT:
                    seg1 = ch[None, :] >= SPLIT
                    s = tl.where(seg1, tl.load(AS + 1), s0)
                    z = tl.where(seg1, tl.load(AZ + 1) - 128.0, z0)
                    a = ((q - z) * s).to(DOT_DTYPE)
                else:
                    a = ((q - z0) * s0).to(DOT_DTYPE)
            else:
                a = q.to(DOT_DTYPE)  # dynamic: the row scale is applied in the epilogue
            return a, a

    @triton.jit
    def block_sum_(acc0, acc1, wsum, AS, AZ, A_MODE: tl.constexpr, A_IN_INT8: tl.constexpr,
                   HAS_SPLIT: tl.constexpr, INT_DOT: tl.constexpr):
        """fp32 partial sum of one group (or the whole K) before the weight scale: applies the static zero-point
        correction and activation scale(s); dynamic scales and float dots pass through."""
        if INT_DOT and A_MODE == 1:
            s0 = tl.load(AS)
            z0 = (tl.load(AZ) - 128.0).to(tl.int32)
            r = (acc0 - z0 * wsum[None, :]).to(tl.float32) * s0
            if HAS_SPLIT:
                s1 = tl.load(AS + 1)
                z1 = (tl.load(AZ + 1) - 128.0).to(tl.int32)
                r += (acc1 - z1 * wsum[None, :]).to(tl.float32) * s1
            return r
        elif (not INT_DOT) and A_IN_INT8 and A_MODE == 2:
            return acc0  # row scale in the epilogue
        else:
            return acc0.to(tl.float32)

    @triton.jit
    def k_block_(a_ptrs, a_mask, cols, s_row, acc0, acc1, wsum, out, W, stride_wn, Z, stride_zn, WSUM, stride_wsn,
                 S, stride_sn, AS, AZ, SPLIT, offs_n, offs_k, k0, N, K, GROUP,
                 W_BITS: tl.constexpr, HAS_WZ: tl.constexpr, GROUPED: tl.constexpr, WSUM_IN: tl.constexpr,
                 A_MODE: tl.constexpr, A_IN_INT8: tl.constexpr, HAS_SPLIT: tl.constexpr, INT_DOT: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, A_QMAX: tl.constexpr, EXACT_DIV: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One K block of a GEMM or conv from its activation pointers (`a_ptrs` under `a_mask`; `cols`: each
        column's activation channel): the activation tile(s) (int8 codes as they are, or a float tile quantized
        here), the weight tile, the dot, and with group scales on the int8 dot the group's fp32 contribution at each
        group's end (shared by both kernels' K loops). A float dot takes the group scales into the weight tile
        instead (dequantized in the K loop, as the reference does: code x scale in fp32, then the dot dtype), so one
        accumulator runs through the whole K with nothing between its dots: flushing it at every group stalled the tensor-core pipeline (W4A16 g64 ran
        at 0.15-0.25x fp16 on an H100 that way, bench/results/kernels_h100.md)."""
        if A_IN_INT8:
            a8 = tl.load(a_ptrs, mask=a_mask, other=0)
            a0, a1 = int8_tile_(a8, cols, AZ, SPLIT, A_MODE, HAS_SPLIT, INT_DOT, DOT_DTYPE, AS)
        else:
            xf = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            a0, a1 = act_tile_(xf, cols, s_row, AS, AZ, SPLIT, A_MODE, HAS_SPLIT, INT_DOT, A_QMAX, EXACT_DIV,
                               DOT_DTYPE)
        g = k0 // GROUP
        w = weight_tile_(W, stride_wn, Z, stride_zn, offs_n, offs_k, k0, g, N, K, W_BITS, HAS_WZ, INT_DOT,
                         BLOCK_N, BLOCK_K)
        if GROUPED and not INT_DOT:
            s_g = tl.load(S + offs_n * stride_sn + g, mask=offs_n < N, other=0.0).to(tl.float32)
            w = w.to(tl.float32) * s_g[:, None]
        acc0, acc1, wsum = dot_step_(a0, a1, w, acc0, acc1, wsum, A_MODE, HAS_SPLIT, INT_DOT, WSUM_IN, DOT_DTYPE)
        if GROUPED and INT_DOT:  # scales (and a precomputed weight sum) belong to whole groups: add each group's end
            if ((k0 + BLOCK_K) % GROUP == 0) | (k0 + BLOCK_K >= K):
                out += group_sum_(acc0, acc1, wsum, WSUM, stride_wsn, S, stride_sn, offs_n, g, N, AS, AZ,
                                  A_MODE, A_IN_INT8, HAS_SPLIT, INT_DOT, WSUM_IN)
                acc0 = tl.zeros((BLOCK_M, BLOCK_N), acc0.dtype)
                acc1 = tl.zeros((BLOCK_M, BLOCK_N), acc1.dtype)
                wsum = tl.zeros((BLOCK_N,), tl.int32)
        return acc0, acc1, wsum, out

    @triton.jit
    def epilogue_(acc0, acc1, wsum, out, s_row, WSUM, stride_wsn, S, stride_sn, AS, AZ, BIAS, offs_n, N,
                  GROUPED: tl.constexpr, WSUM_IN: tl.constexpr, A_MODE: tl.constexpr, A_IN_INT8: tl.constexpr,
                  HAS_SPLIT: tl.constexpr, INT_DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """fp32 output tile: the whole-K scales (no groups), the dynamic per-row scale, the bias."""
        if not GROUPED:
            out = group_sum_(acc0, acc1, wsum, WSUM, stride_wsn, S, stride_sn, offs_n, 0, N, AS, AZ, A_MODE,
                             A_IN_INT8, HAS_SPLIT, INT_DOT, WSUM_IN)
        elif not INT_DOT:  # group scales are already in the weight tiles
            out = block_sum_(acc0, acc1, wsum, AS, AZ, A_MODE, A_IN_INT8, HAS_SPLIT, INT_DOT)
        if A_MODE == 2 and (INT_DOT or A_IN_INT8):
            out = out * s_row[:, None]
        if HAS_BIAS:
            out += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        return out

    @triton.jit
    def tile_start_(S_ROWS, m_ok, A_MODE: tl.constexpr, INT_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """An output tile's starting state (shared by both kernels): the dynamic activation scale of each row (A_MODE
        2: loaded through the pointers S_ROWS, else unused), zeroed accumulators (int32 for the int8 dot), weight sums
        and fp32 output."""
        s_row = tl.zeros((BLOCK_M,), tl.float32)
        if A_MODE == 2:
            s_row = tl.load(S_ROWS, mask=m_ok, other=1.0)
        ACC_T: tl.constexpr = tl.int32 if INT_DOT else tl.float32
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), ACC_T)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), ACC_T)
        wsum = tl.zeros((BLOCK_N,), tl.int32)
        out = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        return s_row, acc0, acc1, wsum, out

    @triton.jit
    def swizzle_(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Grouped program order: GROUP_M row tiles share each weight column tile while it is in L2."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n

    # --------------------------------------------------------------------------------------------------------------

    @triton.jit
    def _qgemm_kernel(X, W, S, Z, BIAS, AS, AZ, SROW, WSUM, O,
                      M, N, K, GROUP, SPLIT,
                      stride_xm, stride_xk, stride_wn, stride_sn, stride_zn, stride_wsn, stride_om, stride_on,
                      W_BITS: tl.constexpr, HAS_WZ: tl.constexpr, GROUPED: tl.constexpr, WSUM_IN: tl.constexpr,
                      A_MODE: tl.constexpr, A_IN_INT8: tl.constexpr, A_QMAX: tl.constexpr,
                      HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, INT_DOT: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, EXACT_DIV: tl.constexpr, M_BUCKET, INT_OK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # M_BUCKET and INT_OK only steer the autotuner (its cache key and config pruning)
        pid_m, pid_n = swizzle_(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        s_row, acc0, acc1, wsum, out = tile_start_(SROW + offs_m, m_ok, A_MODE, INT_DOT, BLOCK_M, BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            acc0, acc1, wsum, out = k_block_(
                X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, m_ok[:, None] & (offs_k[None, :] < K),
                offs_k, s_row, acc0, acc1, wsum, out, W, stride_wn, Z, stride_zn, WSUM, stride_wsn, S, stride_sn, AS,
                AZ, SPLIT, offs_n, offs_k, k0, N, K, GROUP, W_BITS, HAS_WZ, GROUPED, WSUM_IN, A_MODE, A_IN_INT8,
                HAS_SPLIT, INT_DOT, DOT_DTYPE, A_QMAX, EXACT_DIV, BLOCK_M, BLOCK_N, BLOCK_K)
        out = epilogue_(acc0, acc1, wsum, out, s_row, WSUM, stride_wsn, S, stride_sn, AS, AZ, BIAS, offs_n, N,
                        GROUPED, WSUM_IN, A_MODE, A_IN_INT8, HAS_SPLIT, INT_DOT, HAS_BIAS)
        tl.store(O + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out,
                 mask=m_ok[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def padded_rows_(R, HW, WD, H, W, PH, PW, PAD: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's block of rows of pixels of an input padded by PH / PW on each side (row r: image r // HW,
        padded pixel (r % HW) // WD, r % WD): (rows, row < R, image, y and x in the unpadded input, inside it)."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        img = offs_r // HW
        pix = offs_r % HW
        py = pix // WD - PH
        px = pix % WD - PW
        if PAD:
            in_ok = r_ok & (py >= 0) & (py < H) & (px >= 0) & (px < W)
        else:
            in_ok = r_ok
        return offs_r, r_ok, img, py, px, in_ok

    @triton.jit
    def _quant_rows_kernel(X, Q, SROW, SIMG, AS, AZ,
                           R, C, HW, WD, H, W, PH, PW, SPLIT,
                           stride_b, stride_h, stride_w, stride_c,
                           A_MODE: tl.constexpr, A_QMAX: tl.constexpr, HAS_SPLIT: tl.constexpr,
                           PER_IMAGE: tl.constexpr, PAD: tl.constexpr, EXACT_DIV: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Activation codes, written once as int8 rows [R, C] (row-major; for a conv input R = pixels, i.e. NHWC).
        Row r is image r // HW, pixel (r % HW) // WD, r % WD (a linear input is HW = WD = 1).
        PAD: the rows are the pixels of the input padded by PH / PW on each side (H, W: the input's own size); a
        border row reads 0.0, so it holds the code of 0.0 (the zero code) and a conv over it needs no border mask.
        static: q - 128 per segment range. dynamic: q with a per-row scale computed here (absmax over the row, as
        the reference) and stored to SROW, or with the per-image scale SIMG[r // HW] (PER_IMAGE)."""
        offs_r, r_ok, img, py, px, in_ok = padded_rows_(R, HW, WD, H, W, PH, PW, PAD, BLOCK_R)
        row_ptr = X + img * stride_b + py * stride_h + px * stride_w
        s_row = tl.zeros((BLOCK_R,), tl.float32)
        if A_MODE == 2:
            if PER_IMAGE:
                s_row = tl.load(SIMG + img, mask=r_ok, other=1.0)
            else:
                amax = tl.zeros((BLOCK_R,), tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    xf = tl.load(row_ptr[:, None] + offs_c[None, :] * stride_c,
                                 mask=in_ok[:, None] & (offs_c[None, :] < C), other=0.0).to(tl.float32)
                    amax = tl.maximum(amax, tl.max(tl.abs(xf), axis=1))
                s_row = tl.maximum(tl.math.div_rn(amax, A_QMAX * 1.0), 1e-30)
                tl.store(SROW + offs_r, s_row, mask=r_ok)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = r_ok[:, None] & (offs_c[None, :] < C)
            xf = tl.load(row_ptr[:, None] + offs_c[None, :] * stride_c, mask=mask & in_ok[:, None],
                         other=0.0).to(tl.float32)
            if A_MODE == 1:
                s = tl.load(AS)
                z = tl.load(AZ)
                if HAS_SPLIT:
                    seg1 = offs_c[None, :] >= SPLIT
                    s = tl.where(seg1, tl.load(AS + 1), s)
                    z = tl.where(seg1, tl.load(AZ + 1), z)
                q = static_codes_(xf, s, z, A_QMAX, EXACT_DIV) - 128.0
            else:
                q = dynamic_codes_(xf, s_row[:, None], A_QMAX, EXACT_DIV)
            tl.store(Q + offs_r[:, None] * C + offs_c[None, :], q.to(tl.int8), mask=mask)


# --- configs ---------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Consumer parts (sm_86/89: ~100 KB smem, fewer SMs) get smaller
# tiles; datacenter parts (sm_80/90: 164-228 KB smem) larger ones. Each list spans small M (few tokens) to large;
# kept short because every config is compiled (x2: int8 and fp16 dot) and timed per shape on first use.
_CONSUMER = [(128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 3, 8),
             (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (64, 64, 32, 5, 4)]
_DATACENTER = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 4), (128, 128, 64, 4, 4),
               (64, 128, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (64, 64, 32, 5, 4)]


def _tile_list():
    if interpreting() or not torch.cuda.is_available():
        return _CONSUMER
    major, minor = torch.cuda.get_device_capability()
    return _DATACENTER if (major, minor) in ((8, 0), (9, 0)) or major >= 10 else _CONSUMER


def _configs(int_choices=(True, False)):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "INT_DOT": i},
                          num_stages=st, num_warps=wp)
            for (bm, bn, bk, st, wp) in _tile_list() for i in int_choices]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose BLOCK_K divides the group, whose dot kind suits the call, and not much larger than M."""
    group, grouped = named_args["GROUP"], kwargs.get("GROUPED", named_args.get("GROUPED"))
    int_ok = kwargs.get("INT_OK", named_args.get("INT_OK", True))
    m = named_args["M"]
    cin = kwargs.get("CIN")  # conv: blocks that divide C_in stay inside one tap (cheaper addressing)
    if cin is not None and any(cin % c.kwargs["BLOCK_K"] == 0 for c in configs):
        configs = [c for c in configs if cin % c.kwargs["BLOCK_K"] == 0]
    keep = []
    for c in configs:
        kw = c.kwargs
        if grouped and (group % kw["BLOCK_K"] != 0):
            continue
        if kw["INT_DOT"] and not int_ok:
            continue
        if kw["BLOCK_M"] > max(16, _pow2(m)) * 2:
            continue
        keep.append(c)
    if not keep:  # e.g. groups of 32 with only larger K blocks listed: a K block of 32 always divides the group
        keep = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "INT_DOT": i},
                              num_stages=4, num_warps=4) for i in ((True, False) if int_ok else (False,))]
    if int_ok:  # A8: every int8 tile, plus the two first float tiles as the measured fallback (fewer compiles)
        keep = [c for c in keep if c.kwargs["INT_DOT"]] + [c for c in keep if not c.kwargs["INT_DOT"]][:2]
    return keep


# the interpreter runs one fixed small config: autotuning there would only multiply a slow run
_FIXED = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

_TUNED = {}


def tuned(kernel, key):
    """Autotuned version of `kernel` (built lazily so that importing this module never touches the GPU)."""
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
    if name not in _TUNED:
        # results are cached on disk (Triton's cache dir), so a shape is tuned once per GPU, not once per process
        _TUNED[name] = triton.autotune(configs=_configs(), key=key, prune_configs_by={"early_config_prune": _prune},
                                       warmup=5, rep=20, cache_results=True)(kernel)
    return _TUNED[name]


def dot_dtype(x_dtype: torch.dtype):
    if x_dtype == torch.float16:
        return tl.float16
    if x_dtype == torch.bfloat16 and not interpreting():  # the interpreter's bf16 arithmetic is wrong
        return tl.bfloat16
    return tl.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1). triton.cdiv / triton.next_power_of_2 are ConstexprFunctions in
    Triton 3.x: ~6 us per call from host Python, several per launch (bench/overhead.py)."""
    return 1 << (int(n) - 1).bit_length()


def _bucket(m: int) -> int:
    """M rounded up to a power of two: the autotune key, so each token count does not re-tune."""
    return _pow2(max(int(m), 16))


# --- wrappers --------------------------------------------------------------------------------------------------------

def _int_ok(bits, zero, a_mode):
    # int8 dot: activations quantized; weight codes minus zero point fit in int8 (8-bit weights are symmetric)
    return a_mode != "none" and not (bits == 8 and zero is not None)


def quantize_rows(x2: torch.Tensor, a_mode: str, a_bits: int, a_scale=None, a_zero=None, a_split=None,
                  image_scale=None, geometry=None, pad=(0, 0)):
    """int8 codes [R, C] (q - 128 static, q dynamic) and, for dynamic per-token, the per-row scales [R].
    x2 is [R, C] (linear) or, with geometry=(B, C, H, W) and NCHW-strided x2, the conv input: rows are pixels,
    of the input zero-padded by pad=(ph, pw) on each side (R = B * (H + 2 ph) * (W + 2 pw)): the border rows hold
    the code of 0.0, which is what a conv's padding must read (the zero code under a static zero point)."""
    return plan_quantize_rows(x2, a_mode, a_bits, a_scale, a_zero, a_split, image_scale is not None, geometry,
                              pad)(x2, image_scale)


def plan_quantize_rows(x2: torch.Tensor, a_mode: str, a_bits: int, a_scale=None, a_zero=None, a_split=None,
                       per_image: bool = False, geometry=None, pad=(0, 0)):
    """`quantize_rows` with everything but the input's values fixed: a callable (x2, image_scale=None) -> (codes,
    row scales | None) for inputs of x2's shape, strides, dtype and device (`per_image`: an image scale is given)."""
    ph, pw = pad
    if geometry is None:
        r, c = x2.shape
        h = w = hw = wd = 1
        strides = (x2.stride(0), 0, 0, x2.stride(1))
    else:
        b, c, h, w = geometry
        wd = w + 2 * pw
        hw = (h + 2 * ph) * wd
        r = b * hw
        strides = (x2.stride(0), x2.stride(2), x2.stride(3), x2.stride(1))
    mode = _A_MODES[a_mode]
    per_row = mode == A_DYNAMIC and not per_image
    qmax = 2 ** a_bits - 1 if mode == A_STATIC else 2 ** (a_bits - 1) - 1
    block_r = 16 if interpreting() else 32
    block_c = min(_pow2(c), 32 if interpreting() else 256)
    launch = _quant_rows_kernel[(_cdiv(r, block_r),)]
    ints = (r, c, hw, wd, h, w, ph, pw, a_split or 0, *strides)
    meta = dict(A_MODE=mode, A_QMAX=qmax, HAS_SPLIT=a_split is not None, PER_IMAGE=per_image, PAD=ph > 0 or pw > 0,
                EXACT_DIV=interpreting(), BLOCK_R=block_r, BLOCK_C=block_c)
    device = x2.device

    def run(x2, image_scale=None):
        q = torch.empty(r, c, dtype=torch.int8, device=device)
        srow = torch.empty(r if per_row else 1, dtype=torch.float32, device=device)
        launch(x2, q, srow, image_scale if image_scale is not None else srow,
               a_scale if a_scale is not None else srow, a_zero if a_zero is not None else srow, *ints, **meta)
        return q, (srow if per_row else None)

    return run


def dynamic_row_scale(x2: torch.Tensor, a_bits: int) -> torch.Tensor:
    """Per-token scale exactly as the reference computes it (fp32 absmax / qmax, floored at 1e-30)."""
    amax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=-1, dtype=torch.float32)
    return torch.clamp(amax / (2 ** (a_bits - 1) - 1), min=1e-30)


def weight_sums(qweight, zero, bits: int, k: int, group_size: int | None, groups: int) -> torch.Tensor:
    """int32 [N, G]: per group, the sum over K of (code - zero point): the static zero-point correction's other
    factor. Computed once per layer when the layer passes a cache (`cached_weight_sums`)."""
    from .packing import unpack_codes
    n = qweight.shape[0]
    if bits == 8:
        w = qweight.to(torch.int32)
        if zero is not None:
            w = w - (zero.to(torch.int32) if groups == 1 else zero.to(torch.int32).repeat_interleave(
                group_size, dim=1)[:, :k])
    else:
        w = unpack_codes(qweight, bits, k).to(torch.int32)
        if zero is not None:
            z = zero.to(torch.int32)
            w = w - (z if groups == 1 else z.repeat_interleave(group_size, dim=1)[:, :k])
        else:
            w = w - 2 ** (bits - 1)
    if groups == 1:
        return w.sum(dim=1, dtype=torch.int32).reshape(n, 1)
    w = torch.nn.functional.pad(w, (0, groups * group_size - k))
    return w.reshape(n, groups, group_size).sum(dim=2, dtype=torch.int32).contiguous()



def cached_weight_sums(cache: dict | None, call: dict) -> torch.Tensor | None:
    """The weight sums a static zero point needs, kept in the layer's cache dict (slot "triton_wsum"); None (the K
    loop sums the weight tiles itself) without a cache, for other activation modes, for a weight that keeps moving,
    and under torch.compile (data pointers and version counters are not traceable)."""
    if cache is None or call.get("a_mode") != "static" or weight_keeps_moving(cache) \
            or torch.compiler.is_compiling():
        return None
    q, scale = call["qweight"], call["scale"]
    return cached(cache, "triton_wsum", cache_key(q, scale, (str(q.device),)),
                  lambda: weight_sums(q, call["zero"], call["bits"], call["k"], call["group_size"], scale.shape[1]))

def qlinear(x: torch.Tensor, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale=None,
            a_zero=None, a_split=None, wsum=None, prequant: bool | None = None, int_dot: bool | None = None,
            config: dict | None = None, codes=None):
    """Quantized linear y = x W^T + b on the packed weight (layouts: module docstring). x [..., K] fp16/bf16/fp32.

    wsum: weight_sums(...) if precomputed (static activations; otherwise the K loop sums the weight tiles).
    prequant: quantize the activations in a separate int8 pass (None: when N spans more than 4 tiles of 128).
    int_dot: force the int8 (True) or float (False) dot; None: the autotuner chooses (A8, MIXQUANT_AUTOTUNE=1),
    else `default_int_dot`.
    config: fixed BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M (and num_warps/num_stages) instead of autotuning.
    codes: (int8 codes [M, K], row scales | None) of x already quantized by the op that produced it
    (kernels/triton_fused.py, in quantize_rows' layout): read as they are, x itself is not."""
    x2 = x.reshape(-1, k)
    run = plan_linear(x2, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                      wsum, prequant, int_dot, config, has_codes=codes is not None)
    return run(x2, codes).reshape(*x.shape[:-1], qweight.shape[0])


def bind_linear(x: torch.Tensor, **call):
    """`qlinear` for inputs of x's shape, strides, dtype and device with these arguments (`call`: qlinear's keyword
    arguments, codes aside), its launch work done once: a callable f(x, codes=None) -> y. What it fixes (the
    arguments, the dot, the launch config, the activation pass) is what qlinear would compute for every such call."""
    k, n = call["k"], call["qweight"].shape[0]
    m, out_shape = x.numel() // k, (*x.shape[:-1], n)
    run = bound_plans(lambda x2, has_codes: plan_linear(x2, **call, has_codes=has_codes))
    return lambda x, codes=None: run(x.reshape(m, k), codes).reshape(out_shape)


def bound_plans(make):
    """A callable f(x, codes=None) running `make(x, has_codes)`'s plan, made from the first input that uses it (with
    and without the producer's codes are two plans). The plans keep no input: a bound call lives as long as its
    layer's memo, and must not hold a forward's activations."""
    plans = {}

    def run(x, codes=None):
        has = codes is not None
        p = plans.get(has)
        if p is None:
            p = plans[has] = make(x, has)
        return p(x, codes)

    return run


def plan_linear(x2: torch.Tensor, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale=None,
                a_zero=None, a_split=None, wsum=None, prequant: bool | None = None, int_dot: bool | None = None,
                config: dict | None = None, has_codes: bool = False):
    """qlinear's work that does not depend on the input's values, done once: a callable (x2 [M, K], codes) -> y
    [M, N] for inputs of x2's shape, strides, dtype and device (`has_codes`: codes are given; with activations
    quantized they are read instead of x2). Each call allocates the output (and the activation codes) and launches."""
    m, n = x2.shape[0], qweight.shape[0]
    device, dtype = x2.device, x2.dtype
    if m == 0:
        return lambda x2, codes=None: torch.empty(0, n, dtype=dtype, device=device)
    mode = _A_MODES[a_mode]
    int_ok, int_dot = choose_dot(bits, zero, a_mode, scale.shape[1] > 1, int_dot)
    has_codes = has_codes and mode != A_NONE
    if mode == A_NONE:
        prequant = False
    elif has_codes:
        prequant = True
    elif prequant is None:
        prequant = n > 512
    quant = plan_quantize_rows(x2, a_mode, a_bits, a_scale, a_zero, a_split) if prequant and not has_codes \
        else None
    per_token = mode == A_DYNAMIC and not prequant
    groups = scale.shape[1]
    grouped = groups > 1
    group = group_size if grouped else k  # one group spanning K
    qmax = 2 ** a_bits - 1 if mode == A_STATIC else (2 ** (a_bits - 1) - 1 if mode == A_DYNAMIC else 1)
    wsum_in = wsum is not None and mode == A_STATIC
    dims = (m, n, k, group, a_split or 0)
    strides = (qweight.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
               wsum.stride(0) if wsum_in else 0, n, 1)  # (the output: contiguous [M, N])
    meta = dict(W_BITS=bits, HAS_WZ=zero is not None, GROUPED=grouped, WSUM_IN=wsum_in, A_MODE=mode,
                A_IN_INT8=prequant,
                A_QMAX=qmax, HAS_SPLIT=a_split is not None and mode == A_STATIC, HAS_BIAS=bias is not None,
                DOT_DTYPE=dot_dtype(dtype), EXACT_DIV=interpreting(), M_BUCKET=_bucket(m), INT_OK=int_ok)
    fixed = config or (_FIXED if interpreting() else None)
    if fixed is not None or int_dot is not None:  # (int_dot is None only when autotuning)
        dot = int_ok if int_dot is None else int_dot
        cfg = dict(fixed or heuristic_config(m, n, group if grouped else None, dot,
                                             a_bytes=1 if prequant else x2.element_size()))
        meta.update({key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg})
        cfg.setdefault("INT_DOT", dot)
        meta.update(cfg)
        launch = _qgemm_kernel[(_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]),)]
    else:
        launch = tuned(_qgemm_kernel, ["M_BUCKET", "N", "K", "W_BITS", "A_MODE", "A_IN_INT8", "GROUPED", "HAS_SPLIT",
                                       "INT_OK"])[lambda c: (_cdiv(m, c["BLOCK_M"]) * _cdiv(n, c["BLOCK_N"]),)]
    zero_arg = zero if zero is not None else qweight

    def run(x2, codes=None):
        out = torch.empty(m, n, dtype=dtype, device=device)
        srow = None
        if has_codes:
            xa, srow = codes
        elif quant is not None:
            xa, srow = quant(x2)
        else:
            xa = x2
            if per_token:
                srow = dynamic_row_scale(x2, a_bits)
        launch(xa, qweight, scale, zero_arg, bias if bias is not None else out,
               a_scale if a_scale is not None else out, a_zero if a_zero is not None else out,
               srow if srow is not None else out, wsum if wsum_in else out, out, *dims, xa.stride(0), xa.stride(1),
               *strides, **meta)
        return out

    return run


def autotuning() -> bool:
    """MIXQUANT_AUTOTUNE=1: time every listed config per shape on first use (results cached on disk by Triton).
    Off by default: a whole UNet has dozens of shapes, and tuning them all made the first step take minutes on an
    H100 (measured); the default is one config per call from `heuristic_config`."""
    return os.environ.get("MIXQUANT_AUTOTUNE", "0") == "1"


def choose_dot(bits, zero, a_mode, grouped: bool, int_dot: bool | None) -> tuple[bool, bool | None]:
    """(int_ok, int_dot) of a qlinear / qconv2d call: whether the int8 dot can run at all, and the dot the call takes:
    the forced one (checked), else `default_int_dot` without autotuning, else None (the autotuner chooses)."""
    int_ok = _int_ok(bits, zero, a_mode)
    if int_dot and not int_ok:
        raise ValueError("the int8 dot needs quantized activations and a weight without an 8-bit zero point")
    if int_dot is None and not autotuning():
        int_dot = default_int_dot(int_ok, grouped)
    return int_ok, int_dot


def default_int_dot(int_ok: bool, grouped: bool) -> bool:
    """The dot a call takes without autotuning: int8 where it can, except under group scales, where the int8 dot has
    to flush its accumulator at every group (measured: W4A8 g64 at 0.15-0.3x fp16 on an H100) and the float dot
    dequantizes the weight tile in the K loop instead."""
    return int_ok and not grouped


def heuristic_config(m: int, n: int, group: int | None, int_dot: bool, cin: int | None = None,
                     a_bytes: int = 1) -> dict:
    """One launch config for an [m, K] x [K, n] call without autotuning: large int8 K blocks (128 bytes) and 8 warps
    on datacenter parts (sm_80/90: room for 3-4 stages of 128x256x128 int8 tiles), 64-wide K blocks and 4 warps on
    consumer ones; a K block divides the group (group scales are applied per block) and, for a conv, C_in (the
    block then lies inside one tap). `a_bytes`: bytes per activation element as the kernel loads it (1: int8
    codes; a float input quantized in the K loop: its element size)."""
    big = _tile_list() is _DATACENTER
    bk = 128 if (int_dot and big) else 64
    for limit in (group, cin):
        while limit is not None and bk > 32 and limit % bk:
            bk //= 2
    if m <= 32:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128 if n >= 128 else 64, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 4}
    if big and int_dot and cin is None and m >= 1024 and a_bytes <= 2:  # (fp32 tiles of 256 rows: 311 KB of
        # shared memory in 3 stages, over an H100's 227 KB; compiled for sm_90 with Triton 3.6 and 3.9)
        # measured on an H100 (bench/results/kernels_h100.md, sweep of 7 tiles at M=8192, K=1280, N=1280 / 5120):
        # 256x128x128, 3 stages, 8 warps was the fastest for both static and dynamic activations
        return {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    if big:
        bn = 256 if (n >= 2048 and int_dot) else 128
        return {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 8,
                "num_stages": 3 if bn == 256 else 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128 if n >= 128 else 64, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4,
            "num_stages": 3}


# --- torch.library op: opaque to torch.compile (no graph break, no tracing into Triton launch code), capturable in
# CUDA graphs (no host synchronisation anywhere in the wrapper) ------------------------------------------------------

_OPS = {}


def linear_op():
    """`torch.ops.mixquant.qlinear` (dispatch registers it at import where Triton runs), the form dispatch calls under
    torch.compile."""
    if "qlinear" not in _OPS:
        def qlinear_impl(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero,
                         a_split, wsum):
            return qlinear(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero,
                           a_split, wsum)

        def qlinear_fake(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero,
                         a_split, wsum):
            return x.new_empty((*x.shape[:-1], qweight.shape[0]))

        _OPS["qlinear"] = _custom_op("mixquant::qlinear", qlinear_impl, qlinear_fake, _SCHEMA + ") -> Tensor")
    return _OPS["qlinear"]


from .registry import OP_SCHEMA as _SCHEMA, custom_op as _custom_op  # noqa: E402  (shared with the CPU's op)
