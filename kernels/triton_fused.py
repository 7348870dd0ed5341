"""Activation quantization fused into the op that produces the activation (#22 item 3): LayerNorm, GELU / GEGLU and
GroupNorm + SiLU write the int8 codes a quantized consumer reads, in the same pass that computes them, instead of a
separate quantization pass over their output.

Each op returns (float output, int8 codes, per-row scales | None), the codes in the layout `triton_gemm.quantize_rows`
writes and `triton_gemm.qlinear(codes=...)` / the implicit-GEMM conv read: rows [R, C] (a linear's tokens; a conv's
pixels, NHWC, of the input zero-padded by `pad` on each side, border rows holding the code of 0.0), static codes
q - 128 (asymmetric per-tensor range, `a_scale` / `a_zero`), dynamic codes q with one scale per row (absmax / qmax).
The float output is what the model passes on (residuals, other consumers); the codes are what the quantized layer
would have computed from it, bit for bit under the interpreter (exact division; compiled kernels multiply by the
reciprocal, which can move a code by one at an exact tie), from the same fp32 values.

Torch references (`*_ref`): the op in torch, then kernels/reference.py's quantization of its output — also the form
inductor fuses under torch.compile. kernels/ has no model knowledge: which producer feeds which layer is quant/'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .triton_gemm import HAVE_TRITON, _A_MODES, A_DYNAMIC, A_STATIC, _cdiv, _pow2, interpreting

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_gemm import dynamic_codes_, padded_rows_, static_codes_

    @triton.jit
    def _gelu_(v, APPROX: tl.constexpr):
        if APPROX:  # tanh approximation (Flux / SD3 feed-forwards): 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
            return 0.5 * v * (1.0 + t)
        else:  # exact, erf
            return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))

    @triton.jit
    def _rows_kernel(X, G, WT, BS, Y, Q, SROW, AS, AZ, R, C, eps, stride_x, stride_g,
                     OP: tl.constexpr, APPROX: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     A_MODE: tl.constexpr, A_QMAX: tl.constexpr, EXACT_DIV: tl.constexpr, PASSES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One block of rows: OP 0 = LayerNorm over the row (weight / bias optional), 1 = GELU, 2 = GEGLU
        (X * gelu(G)); the float result to Y and its codes to Q (dynamic: the row's scale to SROW). The rows are
        read twice (statistics / absmax, then the output), never written to memory between."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        mean = tl.zeros((BLOCK_R,), tl.float32)
        rstd = tl.zeros((BLOCK_R,), tl.float32)
        if OP == 0:
            acc = tl.zeros((BLOCK_R,), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                m = r_ok[:, None] & (offs_c[None, :] < C)
                acc += tl.sum(tl.load(X + offs_r[:, None] * stride_x + offs_c[None, :], mask=m, other=0.0)
                              .to(tl.float32), axis=1)
            mean = acc / C
            var = tl.zeros((BLOCK_R,), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                m = r_ok[:, None] & (offs_c[None, :] < C)
                d = tl.load(X + offs_r[:, None] * stride_x + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
                d = tl.where(m, d - mean[:, None], 0.0)
                var += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(var / C + eps)
        s_row = tl.zeros((BLOCK_R,), tl.float32)
        for p in tl.static_range(PASSES):  # dynamic: a first pass for the row's absmax
            amax = tl.zeros((BLOCK_R,), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                m = r_ok[:, None] & (offs_c[None, :] < C)
                v = tl.load(X + offs_r[:, None] * stride_x + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
                if OP == 0:
                    v = (v - mean[:, None]) * rstd[:, None]
                    if HAS_W:
                        v = v * tl.load(WT + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
                    if HAS_B:
                        v = v + tl.load(BS + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
                elif OP == 1:
                    v = _gelu_(v, APPROX)
                else:
                    g = tl.load(G + offs_r[:, None] * stride_g + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
                    v = v * _gelu_(g, APPROX)
                # the consumer quantizes the output as stored (in the model's dtype): round it first
                v = v.to(Y.dtype.element_ty).to(tl.float32)
                if A_MODE == 2 and p == 0:
                    amax = tl.maximum(amax, tl.max(tl.where(m, tl.abs(v), 0.0), axis=1))
                else:
                    if A_MODE == 1:
                        q = static_codes_(v, tl.load(AS), tl.load(AZ), A_QMAX, EXACT_DIV) - 128.0
                    else:
                        q = dynamic_codes_(v, s_row[:, None], A_QMAX, EXACT_DIV)
                    tl.store(Y + offs_r[:, None] * C + offs_c[None, :], v.to(Y.dtype.element_ty), mask=m)
                    tl.store(Q + offs_r[:, None] * C + offs_c[None, :], q.to(tl.int8), mask=m)
            if A_MODE == 2 and p == 0:
                s_row = tl.maximum(tl.math.div_rn(amax, A_QMAX * 1.0), 1e-30)
                tl.store(SROW + offs_r, s_row, mask=r_ok)

    @triton.jit
    def _gn_silu_kernel(X, MEAN, RSTD, WT, BS, Y, Q, AS, AZ,
                        R, C, CPG, HW, WD, H, W, PH, PW,
                        stride_b, stride_c, stride_h, stride_w,
                        A_QMAX: tl.constexpr, EXACT_DIV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """GroupNorm (statistics MEAN / RSTD [B, G] given) + affine + SiLU of an NCHW input: the float result to Y
        (NCHW, the input's shape) and static codes to Q as rows of pixels of the padded input (NHWC; border rows
        hold the code of 0.0)."""
        offs_r, r_ok, img, py, px, in_ok = padded_rows_(R, HW, WD, H, W, PH, PW, True, BLOCK_R)
        s = tl.load(AS)
        z = tl.load(AZ)
        G = C // CPG
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            m = in_ok[:, None] & c_ok[None, :]
            ptr = img[:, None] * stride_b + offs_c[None, :] * stride_c + py[:, None] * stride_h + px[:, None] * stride_w
            v = tl.load(X + ptr, mask=m, other=0.0).to(tl.float32)
            grp = img[:, None] * G + offs_c[None, :] // CPG
            mu = tl.load(MEAN + grp, mask=m, other=0.0)
            rs = tl.load(RSTD + grp, mask=m, other=0.0)
            v = (v - mu) * rs
            v = v * tl.load(WT + offs_c, mask=c_ok, other=1.0).to(tl.float32)[None, :] \
                + tl.load(BS + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            v = v / (1.0 + tl.exp(-v))
            v = tl.where(m, v.to(Y.dtype.element_ty).to(tl.float32), 0.0)  # padding reads 0.0
            tl.store(Y + ptr, v.to(Y.dtype.element_ty), mask=m)
            q = static_codes_(v, s, z, A_QMAX, EXACT_DIV) - 128.0
            tl.store(Q + offs_r[:, None] * C + offs_c[None, :], q.to(tl.int8), mask=r_ok[:, None] & c_ok[None, :])


def _blocks(c: int) -> tuple[int, int]:
    return (16 if interpreting() else 32), min(_pow2(c), 32 if interpreting() else 256)


def _qmax(a_mode: str, a_bits: int) -> int:
    return 2 ** a_bits - 1 if _A_MODES[a_mode] == A_STATIC else 2 ** (a_bits - 1) - 1


def _check(a_mode: str, a_bits: int):
    if a_mode not in ("static", "dynamic") or not 2 <= a_bits <= 8:
        raise ValueError("fused quantization writes int8 codes: static or dynamic activations of at most 8 bits")


def _rows(op: int, x2, g2, weight, bias, eps, approximate, a_mode, a_bits, a_scale, a_zero):
    _check(a_mode, a_bits)
    r, c = x2.shape
    y = torch.empty(r, c, dtype=x2.dtype, device=x2.device)
    q = torch.empty(r, c, dtype=torch.int8, device=x2.device)
    mode = _A_MODES[a_mode]
    srow = torch.empty(r if mode == A_DYNAMIC else 1, dtype=torch.float32, device=x2.device)
    dummy = srow
    br, bc = _blocks(c)
    _rows_kernel[(_cdiv(r, br),)](
        x2, g2 if g2 is not None else x2, weight if weight is not None else dummy,
        bias if bias is not None else dummy, y, q, srow,
        a_scale if a_scale is not None else dummy, a_zero if a_zero is not None else dummy,
        r, c, float(eps), x2.stride(0), g2.stride(0) if g2 is not None else 0,
        OP=op, APPROX=approximate == "tanh", HAS_W=weight is not None, HAS_B=bias is not None, A_MODE=mode,
        A_QMAX=_qmax(a_mode, a_bits), EXACT_DIV=interpreting(), PASSES=2 if mode == A_DYNAMIC else 1,
        BLOCK_R=br, BLOCK_C=bc)
    return y, q, (srow if mode == A_DYNAMIC else None)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def layernorm_quant(x, weight, bias, eps: float, a_mode: str, a_bits: int = 8, a_scale=None, a_zero=None):
    """LayerNorm over the last dim of x (weight / bias optional) -> (output like x, int8 codes [R, C], row scales)."""
    y, q, s = _rows(0, _as_rows(x), None, weight, bias, eps, "none", a_mode, a_bits, a_scale, a_zero)
    return y.reshape(x.shape), q, s


def gelu_quant(x, a_mode: str, a_bits: int = 8, a_scale=None, a_zero=None, approximate: str = "none", gate=None):
    """GELU(x), or GEGLU x * GELU(gate) when `gate` is given (diffusers' GEGLU: hidden, gate = proj(h).chunk(2)),
    -> (output like x, int8 codes [R, C], row scales)."""
    g2 = None if gate is None else _as_rows(gate)
    y, q, s = _rows(1 if gate is None else 2, _as_rows(x), g2, None, None, 0.0, approximate, a_mode, a_bits,
                    a_scale, a_zero)
    return y.reshape(x.shape), q, s


def groupnorm_silu_quant(x, num_groups: int, weight, bias, eps: float, a_scale, a_zero, a_bits: int = 8,
                         pad=(0, 0)):
    """SiLU(GroupNorm(x)) of an NCHW x (the input of a UNet ResBlock's 3x3 conv) -> (output like x, static int8
    codes as rows of pixels of the output zero-padded by `pad` [B * (H + 2 ph) * (W + 2 pw), C], None). The group
    statistics are one torch reduction (the read GroupNorm makes anyway); normalization, affine, SiLU and the codes
    are one pass."""
    _check("static", a_bits)
    b, c, h, w = x.shape
    xf = x.float().reshape(b, num_groups, -1)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    ph, pw = pad
    wd = w + 2 * pw
    hw = (h + 2 * ph) * wd
    r = b * hw
    y = torch.empty_like(x)
    q = torch.empty(r, c, dtype=torch.int8, device=x.device)
    br, bc = _blocks(c)
    _gn_silu_kernel[(_cdiv(r, br),)](
        x, mean.contiguous(), rstd.contiguous(), weight, bias, y, q, a_scale, a_zero,
        r, c, c // num_groups, hw, wd, h, w, ph, pw, *x.stride(),
        A_QMAX=2 ** a_bits - 1, EXACT_DIV=interpreting(), BLOCK_R=br, BLOCK_C=bc)
    return y, q, None


# --- torch references (and the form inductor fuses) ----------------------------------------------------------------

def codes_ref(y: torch.Tensor, a_mode: str, a_bits: int, a_scale=None, a_zero=None, pad=None):
    """The codes kernels/reference.py's quantization gives `y` (a linear's [..., C], or with `pad` an NCHW conv
    input padded by pad), in the rows layout above, and the per-row scales (dynamic)."""
    if pad is not None:
        y = F.pad(y, (pad[1], pad[1], pad[0], pad[0])).permute(0, 2, 3, 1)
    y2 = y.reshape(-1, y.shape[-1]).float()
    if a_mode == "static":
        q = reference.quantize_act_static(y2, a_scale.reshape(()), a_zero.reshape(()), a_bits) - 128
        return q.to(torch.int8), None
    q, s = reference.quantize_act_dynamic(y2, a_bits, (-1,))
    return q.to(torch.int8), s.reshape(-1)


def layernorm_quant_ref(x, weight, bias, eps, a_mode, a_bits=8, a_scale=None, a_zero=None):
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps).to(x.dtype)
    return (y, *codes_ref(y, a_mode, a_bits, a_scale, a_zero))


def gelu_quant_ref(x, a_mode, a_bits=8, a_scale=None, a_zero=None, approximate="none", gate=None):
    y = F.gelu(x.float(), approximate=approximate) if gate is None else \
        x.float() * F.gelu(gate.float(), approximate=approximate)
    y = y.to(x.dtype)
    return (y, *codes_ref(y, a_mode, a_bits, a_scale, a_zero))


def groupnorm_silu_quant_ref(x, num_groups, weight, bias, eps, a_scale, a_zero, a_bits=8, pad=(0, 0)):
    y = F.silu(F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)).to(x.dtype)
    return (y, *codes_ref(y, "static", a_bits, a_scale, a_zero, pad=pad))
