"""Triton implicit-GEMM Conv2d for quantized layers (W8A8 / W4A8 / W2A8 on int8 tensor cores, W*A16 in float).

The conv is a GEMM with M = B*OH*OW output pixels, N = output channels, K = kh*kw*cin in (kh, kw, cin) order (the
weight layout of kernels/reference.py). No im2col matrix is built: each K block gathers its activation tile from the
input at (oh*stride - pad + r*dil, ow*stride - pad + s*dil) for the tap (r, s) of each column.

A8 inputs are quantized once by kernels/triton_gemm.py's `_quant_rows_kernel` into int8 NHWC rows (a 3x3 conv
gathers every input element 9 times, so quantizing in the prologue would repeat the work 9 * N / BLOCK_N times),
unless `prequant=False`. That pass writes the codes of the zero-padded input: its border rows hold the code of 0.0
(the *zero code* of their channel's segment, z - 128), so the zero-point correction z' * sum(w) stays exact at the
borders (MixDQ's padding trick) and the K loop reads the codes as they are, with no border mask and no select
between the load and the dot (a select there kept Triton from pipelining the loads: on an H100 the static conv ran
75% slower than the dynamic one with the same tiles, bench/results/kernels_h100.md). Reading a float input in the
prologue (BORDER on) gets the same for free, since a masked-out 0.0 quantizes to z.

1x1 stride-1 convs over channels_last inputs run as the plain GEMM (the pixels are already rows).
"""
from __future__ import annotations

import torch

from . import triton_gemm as tg

if tg.HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_gemm import epilogue_, k_block_, swizzle_, tile_start_

    @triton.jit
    def _qconv_kernel(X, W, S, Z, BIAS, AS, AZ, SIMG, WSUM, O,
                      H, WD, OH, OW, M, N, K, GROUP, SPLIT,
                      stride_xb, stride_xc, stride_xh, stride_xw,
                      stride_wn, stride_sn, stride_zn, stride_wsn,
                      stride_ob, stride_on, stride_oh, stride_ow,
                      SH, SW, PH, PW, DH, DW, M_BUCKET,
                      CIN: tl.constexpr, KW: tl.constexpr,
                      W_BITS: tl.constexpr, HAS_WZ: tl.constexpr, GROUPED: tl.constexpr, WSUM_IN: tl.constexpr,
                      A_MODE: tl.constexpr, A_IN_INT8: tl.constexpr, A_QMAX: tl.constexpr, BORDER: tl.constexpr,
                      HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, INT_DOT: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, EXACT_DIV: tl.constexpr, INT_OK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = swizzle_(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        img = offs_m // (OH * OW)
        pix = offs_m % (OH * OW)
        ih0 = (pix // OW) * SH - PH
        iw0 = (pix % OW) * SW - PW
        x_row = X + img * stride_xb
        s_row, acc0, acc1, wsum, out = tile_start_(SIMG + img, m_ok, A_MODE, INT_DOT, BLOCK_M, BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if CIN % BLOCK_K == 0:
                # the block lies inside one tap: its position and border mask are per row, not per element
                tap = k0 // CIN
                ch = (k0 - tap * CIN) + tl.arange(0, BLOCK_K)
                ih = ih0 + (tap // KW) * DH
                iw = iw0 + (tap % KW) * DW
                if BORDER:
                    row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WD)
                else:
                    row_ok = m_ok
                mask = row_ok[:, None] & (ch[None, :] < CIN)
                ptrs = (x_row + ih * stride_xh + iw * stride_xw)[:, None] + ch[None, :] * stride_xc
            else:
                tap = offs_k // CIN
                ch = offs_k % CIN
                ih = ih0[:, None] + ((tap // KW) * DH)[None, :]
                iw = iw0[:, None] + ((tap % KW) * DW)[None, :]
                mask = m_ok[:, None] & (offs_k[None, :] < K)
                if BORDER:
                    mask = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WD)
                ptrs = x_row[:, None] + ch[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
            # int8 input: padded codes (BORDER is off), only rows past M are masked, and they are not stored
            acc0, acc1, wsum, out = k_block_(
                ptrs, mask, ch, s_row, acc0, acc1, wsum, out, W, stride_wn, Z, stride_zn, WSUM, stride_wsn, S,
                stride_sn, AS, AZ, SPLIT, offs_n, offs_k, k0, N, K, GROUP, W_BITS, HAS_WZ, GROUPED, WSUM_IN, A_MODE,
                A_IN_INT8, HAS_SPLIT, INT_DOT, DOT_DTYPE, A_QMAX, EXACT_DIV, BLOCK_M, BLOCK_N, BLOCK_K)
        out = epilogue_(acc0, acc1, wsum, out, s_row, WSUM, stride_wsn, S, stride_sn, AS, AZ, BIAS, offs_n, N,
                        GROUPED, WSUM_IN, A_MODE, A_IN_INT8, HAS_SPLIT, INT_DOT, HAS_BIAS)
        o_ptrs = O + (img * stride_ob + (pix // OW) * stride_oh + (pix % OW) * stride_ow)[:, None] \
            + offs_n[None, :] * stride_on
        tl.store(o_ptrs, out, mask=m_ok[:, None] & (offs_n[None, :] < N))


def dynamic_image_scale(x: torch.Tensor, a_bits: int) -> torch.Tensor:
    """Per-image scale exactly as the reference computes it (fp32 absmax over C, H, W / qmax, floored at 1e-30)."""
    amax = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), ord=float("inf"), dim=1, dtype=torch.float32)
    return torch.clamp(amax / (2 ** (a_bits - 1) - 1), min=1e-30)


def qconv2d(x: torch.Tensor, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale=None,
            a_zero=None, a_split=None, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
            wsum=None, prequant: bool | None = None, int_dot: bool | None = None, config: dict | None = None,
            codes=None):
    """Quantized conv2d over x [B, C, H, W] (any memory format; the output keeps channels_last if x has it).
    codes: static int8 codes of x as rows of pixels of x zero-padded by `padding` (quantize_rows' layout), written
    by the op that produced x (kernels/triton_fused.py): read as they are, x itself is not."""
    return plan_conv2d(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                       kernel_size, stride, padding, dilation, wsum, prequant, int_dot, config,
                       has_codes=codes is not None)(x, codes)


def bind_conv2d(x: torch.Tensor, **call):
    """`qconv2d` for inputs of x's shape, strides, dtype and device with these arguments (`call`: qconv2d's keyword
    arguments, codes aside), its launch work done once: a callable f(x, codes=None) -> y (as
    triton_gemm.bind_linear)."""
    return tg.bound_plans(lambda x, has_codes: plan_conv2d(x, **call, has_codes=has_codes))


def plan_conv2d(x: torch.Tensor, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale=None,
                a_zero=None, a_split=None, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                wsum=None, prequant: bool | None = None, int_dot: bool | None = None, config: dict | None = None,
                has_codes: bool = False):
    """qconv2d's work that does not depend on the input's values, done once: a callable (x, codes) -> y for inputs
    of x's shape, strides, dtype and device (`has_codes`: static codes of x are given and read instead of x)."""
    b, cin, h, w = x.shape
    kh, kw = kernel_size
    n = qweight.shape[0]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    call = dict(qweight=qweight, scale=scale, zero=zero, bits=bits, k=k, group_size=group_size, bias=bias,
                a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zero=a_zero, a_split=a_split)
    if has_codes and a_mode != "static":
        raise ValueError("pre-quantized conv inputs are static codes")
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and channels_last \
            and a_mode != "dynamic" and not has_codes:  # (a per-image dynamic scale is not the GEMM's per-token one)
        lin = tg.plan_linear(x.permute(0, 2, 3, 1).reshape(-1, cin), wsum=wsum, prequant=prequant, int_dot=int_dot,
                             config=config, **call)
        return lambda x, codes=None: lin(x.permute(0, 2, 3, 1).reshape(-1, cin)).reshape(b, h, w, n).permute(
            0, 3, 1, 2)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    device, dtype = x.device, x.dtype
    m = b * oh * ow
    if m == 0:
        return lambda x, codes=None: torch.empty((b, n, oh, ow), dtype=dtype, device=device, memory_format=mem)
    mode = tg._A_MODES[a_mode]
    int_ok, int_dot = tg.choose_dot(bits, zero, a_mode, scale.shape[1] > 1, int_dot)
    per_image = mode == tg.A_DYNAMIC
    to_nhwc = False
    if mode == tg.A_NONE:
        prequant = False
        to_nhwc = not channels_last and not tg.interpreting()  # gather along channels needs them contiguous
    elif has_codes:
        prequant = True
    elif prequant is None:
        prequant = kh * kw > 1 or n > 512
    ih, iw, ph, pw = h, w, padding[0], padding[1]
    quant = None
    if has_codes or prequant:  # NHWC codes of the zero-padded input: the kernel reads no border
        if not has_codes:
            quant = tg.plan_quantize_rows(x, a_mode, a_bits, a_scale, a_zero, a_split, per_image,
                                          geometry=(b, cin, h, w), pad=(ph, pw))
        ih, iw, ph, pw = h + 2 * ph, w + 2 * pw, 0, 0
        xs = (ih * iw * cin, 1, iw * cin, cin)
    else:  # (the NHWC copy each call makes, its strides read from a meta tensor: no copy now)
        xs = torch.empty(x.shape, device="meta", memory_format=torch.channels_last).stride() if to_nhwc \
            else x.stride()
    grouped = scale.shape[1] > 1
    group = group_size if grouped else k
    qmax = 2 ** a_bits - 1 if mode == tg.A_STATIC else (2 ** (a_bits - 1) - 1 if mode == tg.A_DYNAMIC else 1)
    wsum_in = wsum is not None and mode == tg.A_STATIC
    out_strides = torch.empty((b, n, oh, ow), dtype=dtype, device="meta", memory_format=mem).stride()
    tail = (ih, iw, oh, ow, m, n, k, group, a_split or 0, *xs,
            qweight.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
            wsum.stride(0) if wsum_in else 0, *out_strides,
            stride[0], stride[1], ph, pw, dilation[0], dilation[1], tg._bucket(m))
    meta = dict(CIN=cin, KW=kw, W_BITS=bits, HAS_WZ=zero is not None, GROUPED=grouped, WSUM_IN=wsum_in, A_MODE=mode,
                A_IN_INT8=prequant, BORDER=ph > 0 or pw > 0,
                A_QMAX=qmax, HAS_SPLIT=a_split is not None and mode == tg.A_STATIC, HAS_BIAS=bias is not None,
                DOT_DTYPE=tg.dot_dtype(dtype), EXACT_DIV=tg.interpreting(), INT_OK=int_ok)
    fixed = config or (tg._FIXED if tg.interpreting() else None)
    if fixed is not None or int_dot is not None:  # (int_dot is None only when autotuning)
        dot = int_ok if int_dot is None else int_dot
        cfg = dict(fixed or tg.heuristic_config(m, n, group if grouped else None, dot, cin))
        meta.update({key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg})
        cfg.setdefault("INT_DOT", dot)
        meta.update(cfg)
        launch = _qconv_kernel[(tg._cdiv(m, cfg["BLOCK_M"]) * tg._cdiv(n, cfg["BLOCK_N"]),)]
    else:
        launch = tg.tuned(_qconv_kernel, ["M_BUCKET", "N", "K", "CIN", "W_BITS", "A_MODE", "A_IN_INT8", "GROUPED",
                                          "HAS_SPLIT", "INT_OK", "BORDER"])[
            lambda c: (tg._cdiv(m, c["BLOCK_M"]) * tg._cdiv(n, c["BLOCK_N"]),)]
    zero_arg = zero if zero is not None else qweight

    def run(x, codes=None):
        out = torch.empty((b, n, oh, ow), dtype=dtype, device=device, memory_format=mem)
        simg = dynamic_image_scale(x, a_bits) if per_image else None
        if has_codes:
            xa = codes[0]
        elif quant is not None:
            xa, _ = quant(x, simg)
        else:
            xa = x.contiguous(memory_format=torch.channels_last) if to_nhwc else x
        launch(xa, qweight, scale, zero_arg, bias if bias is not None else out,
               a_scale if a_scale is not None else out, a_zero if a_zero is not None else out,
               simg if simg is not None else out, wsum if wsum_in else out, out, *tail, **meta)
        return out

    return run


def conv2d_op():
    """`torch.ops.mixquant.qconv2d` (dispatch registers it at import where Triton runs), the form dispatch calls under
    torch.compile."""
    if "qconv2d" not in tg._OPS:
        def qconv2d_impl(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero,
                         a_split, wsum, kernel_size, stride, padding, dilation):
            out = qconv2d(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero,
                          a_split, kernel_size, stride, padding, dilation, wsum)
            return out if out.data_ptr() != x.data_ptr() else out.clone()

        def qconv2d_fake(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero,
                         a_split, wsum, kernel_size, stride, padding, dilation):
            b, _, h, w = x.shape
            oh = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
            ow = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            return torch.empty((b, qweight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                               memory_format=torch.channels_last if cl else torch.contiguous_format)

        tg._OPS["qconv2d"] = tg._custom_op(
            "mixquant::qconv2d", qconv2d_impl, qconv2d_fake,
            tg._SCHEMA + ", int[] kernel_size, int[] stride, int[] padding, int[] dilation) -> Tensor")
    return tg._OPS["qconv2d"]
