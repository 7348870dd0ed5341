"""Reference (plain torch) implementations of every quantized op. The fast backends are tested against these.

Conventions shared with the saved file and every backend:
- A weight is a 2-D matrix [N, K]. For a conv, K runs over (kh, kw, cin) — the order an implicit GEMM over NHWC
  activations reads — so `w2d = w.permute(0, 2, 3, 1).reshape(N, -1)`.
- 8-bit weights: signed int8, symmetric, scale [N, G]. 4/2-bit: unsigned packed codes (kernels/packing.py), scale
  [N, G] and an optional zero point [N, G] (uint8 codes); without one the zero is the mid code 2**(bits-1).
  G = 1 (per output channel) or ceil(K / group_size) groups along K.
- Activations: "none" (kept in float), "static" (asymmetric per-tensor codes 0..2**bits-1 with a calibrated scale and
  zero point; optionally two channel segments with their own ranges: Q-Diffusion's skip-concat split), or "dynamic"
  (symmetric, scale = absmax / (2**(bits-1) - 1) computed at run time per token for a linear, per image for a conv).
- Rounding is torch.round (half to even) everywhere.
- float8 e4m3 weights (codes of dtype float8_e4m3fn, 8-bit, per-channel scale, no zero point) dequantize the same way;
  their activations are "fp8_static" / "fp8_dynamic" (kernels/fp8.py has the numerics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8
from .packing import unpack_codes


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, k: int,
                      group_size: int | None) -> torch.Tensor:
    """Packed weight -> fp32 [N, K]."""
    if bits == 8:
        q = qweight.to(torch.float32)
        if zero is not None:
            q = q - _expand_groups(zero.to(torch.float32), k, group_size)
    else:
        q = unpack_codes(qweight, bits, k).to(torch.float32)
        z = _expand_groups(zero.to(torch.float32), k, group_size) if zero is not None else float(2 ** (bits - 1))
        q = q - z
    return q * _expand_groups(scale.to(torch.float32), k, group_size)


def _expand_groups(t: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] (G == 1 broadcasts)."""
    if t.shape[-1] == 1:
        return t
    return t.repeat_interleave(group_size, dim=-1)[..., :k]


# --- activations -------------------------------------------------------------------------------------------------

def quantize_act_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-tensor codes in [0, 2**bits - 1] (as float, same shape as x). scale/zero: 0-d tensors."""
    qmax = 2 ** bits - 1
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax)


def fake_quant_act_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                          split: int | None = None, channel_dim: int = -1) -> torch.Tensor:
    """Quantize-dequantize with a calibrated range. scale/zero: [S] with S = 1, or 2 when `split` cuts the channels
    at index `split` (channels before it use range 0, the rest range 1)."""
    xf = x.to(torch.float32)
    if split is None:
        s, z = scale.reshape(()), zero.reshape(())
        out = (quantize_act_static(xf, s, z, bits) - z) * s
    else:
        a, b = xf.split([split, xf.shape[channel_dim] - split], dim=channel_dim)
        parts = []
        for part, s, z in ((a, scale[0], zero[0]), (b, scale[1], zero[1])):
            parts.append((quantize_act_static(part, s, z, bits) - z) * s)
        out = torch.cat(parts, dim=channel_dim)
    return out.to(x.dtype)


def quantize_act_dynamic(x: torch.Tensor, bits: int, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic quantization: returns (codes as float in [-2**(bits-1), 2**(bits-1)-1], fp32 scale) with the
    scale reduced over `dims` (keepdim)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=dims, keepdim=True)
    s = torch.clamp(amax / qmax, min=1e-30)
    q = torch.clamp(torch.round(xf / s), -qmax - 1, qmax)
    return q, s


def fake_quant_act_dynamic(x: torch.Tensor, bits: int, dims) -> torch.Tensor:
    q, s = quantize_act_dynamic(x, bits, dims)
    return (q * s).to(x.dtype)


def fake_quant_act(x: torch.Tensor, bits: int, mode: str, scale=None, zero=None, split=None, channel_dim: int = -1,
                   dynamic_dims=(-1,)) -> torch.Tensor:
    if mode == "none" or bits >= 16:
        return x
    if mode in fp8.MODES:
        return fp8.fake_quant_act(x, mode, scale, split, channel_dim, dynamic_dims)
    if mode == "static":
        return fake_quant_act_static(x, scale, zero, bits, split, channel_dim)
    if mode == "dynamic":
        return fake_quant_act_dynamic(x, bits, dynamic_dims)
    raise ValueError(f"unknown activation mode {mode!r}")


# --- layers ------------------------------------------------------------------------------------------------------

def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a_bits: int, a_mode: str,
           a_scale=None, a_zero=None, a_split=None) -> torch.Tensor:
    """Reference quantized linear: fake-quantize x, float matmul with the dequantized weight w [N, K] (fp32)."""
    xq = fake_quant_act(x, a_bits, a_mode, a_scale, a_zero, a_split, channel_dim=-1, dynamic_dims=(-1,))
    return F.linear(xq, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, kernel_size, stride, padding, dilation,
           a_bits: int, a_mode: str, a_scale=None, a_zero=None, a_split=None) -> torch.Tensor:
    """Reference quantized conv2d over NCHW x; w is the dequantized [N, kh*kw*cin] matrix (fp32).

    A static zero point is exact at padded borders here because the padding is applied to the dequantized input
    (padding value 0.0, which the asymmetric grid represents exactly through its zero point)."""
    w4 = conv_weight_view(w, *kernel_size)
    xq = fake_quant_act(x, a_bits, a_mode, a_scale, a_zero, a_split, channel_dim=1, dynamic_dims=(1, 2, 3))
    return F.conv2d(xq, w4.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation)


def conv_weight_view(w2d: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """[N, kh*kw*cin] -> [N, cin, kh, kw] without a copy. For kh x kw > 1 the view has channels-last strides, which
    makes F.conv2d take oneDNN's channels-last algorithm; for 1x1 it is a plain reshape (NCHW strides): on an AVX2 CPU
    the former is as fast or faster for 3x3 convs (1.4x at 4x4 x 1280 channels) and the latter for 1x1 (a 640->320
    1x1 conv at 32x32 took 7.0 ms through the channels-last view, 4.9 ms through the reshape)."""
    n = w2d.shape[0]
    if kh == 1 and kw == 1:
        return w2d.reshape(n, -1, 1, 1)
    return w2d.reshape(n, kh, kw, -1).permute(0, 3, 1, 2)


def conv_weight_to_2d(w: torch.Tensor) -> torch.Tensor:
    """[N, cin, kh, kw] -> [N, kh*kw*cin] (the K order every conv kernel reads)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def conv_weight_from_2d(w2d: torch.Tensor, cin: int, kh: int, kw: int) -> torch.Tensor:
    return w2d.reshape(w2d.shape[0], kh, kw, cin).permute(0, 3, 1, 2).contiguous()
