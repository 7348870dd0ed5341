"""float8 e4m3 weights and activations: the torch reference and the GPU route (`torch._scaled_mm`).

Numerics (the layouts of kernels/reference.py, with fp8 codes in place of int8 ones):
- Weights: codes float8_e4m3fn [N, K] (stored as their bytes in the joined rows of kernels/packing.py), one fp16
  scale per output channel: w = float(code) * scale, scale = absmax(row) / 448 (rounded to fp16 first; the codes are
  computed with the stored scale).
- Activations, symmetric (no zero point): "fp8_dynamic": scale = absmax / 448 per token (per row of a linear's
  input, per image of a conv's) at run time; "fp8_static": a calibrated per-tensor scale (absmax / 448 of the
  calibrated range; `a_scale`, with a second one past `a_split` when the channels are split).
  x_q = e4m3(clamp(x / scale, -448, 448)) — ComfyUI's `float8_e4m3fn` layers quantize their input the same way.
- Rounding is to nearest even (the cast); values past +-448 are clamped first (an e4m3fn cast would give NaN).

kernels/ has no model knowledge; quant/ chooses where these formats go.
"""
from __future__ import annotations

import torch

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0
MODES = ("fp8_static", "fp8_dynamic")
_MIN_SCALE = 2.0 ** -24  # the smallest positive fp16: a stored scale never underflows to zero


def supported() -> bool:
    """This torch has the float8 e4m3 dtype."""
    return E4M3 is not None


def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and E4M3 is not None and t.dtype == E4M3


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale -> e4m3 codes (clamped to the finite range, rounded to nearest even)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_weight(w2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (e4m3 codes [N, K], fp16 scale [N, 1]) with one scale per output channel."""
    if not supported():
        raise RuntimeError("this torch has no float8_e4m3fn dtype: fp8 formats need torch >= 2.1")
    if w2d.dim() != 2:
        raise ValueError("quantize_weight expects a 2-D [N, K] matrix")
    w = w2d.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=_MIN_SCALE).to(torch.float16)
    return to_e4m3(w / scale.float()).contiguous(), scale


def static_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A calibrated range [lo, hi] -> the per-tensor activation scale (absmax / 448, fp32)."""
    amax = torch.maximum(lo.float().abs(), hi.float().abs())
    return (amax / E4M3_MAX).clamp(min=1e-12)


def quantize_act(x: torch.Tensor, mode: str, a_scale=None, dims=(-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 scale) of x: per-token scales reduced over `dims` (keepdim) for "fp8_dynamic", the one
    calibrated scale (0-d) for "fp8_static"."""
    xf = x.float()
    if mode == "fp8_dynamic":
        s = (xf.abs().amax(dim=dims, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    elif mode == "fp8_static":
        s = a_scale.reshape(()).float()
    else:
        raise ValueError(f"unknown fp8 activation mode {mode!r}")
    return to_e4m3(xf / s), s


def fake_quant_act(x: torch.Tensor, mode: str, a_scale=None, a_split=None, channel_dim: int = -1,
                   dynamic_dims=(-1,)) -> torch.Tensor:
    """Quantize-dequantize x to e4m3 (same dtype as x). Static with `a_split`: channels before it use a_scale[0],
    the rest a_scale[1]."""
    if mode == "fp8_static" and a_split is not None:
        a, b = x.split([a_split, x.shape[channel_dim] - a_split], dim=channel_dim)
        return torch.cat([fake_quant_act(a, mode, a_scale.reshape(-1)[0]),
                          fake_quant_act(b, mode, a_scale.reshape(-1)[1])], dim=channel_dim)
    q, s = quantize_act(x, mode, a_scale, dynamic_dims)
    return (q.float() * s).to(x.dtype)


# --- the GPU route: torch._scaled_mm (cuBLASLt fp8 GEMM) ------------------------------------------------------------

def scaled_mm_supported(device) -> bool:
    """fp8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell) and a torch with _scaled_mm."""
    device = torch.device(device)
    if not (supported() and device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.is_available()):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


_OUT_DTYPE: dict = {}  # (device, dtype) -> the output dtype _scaled_mm takes with row-wise scales here


def linear_scaled_mm(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                     cache=None, **_):
    """y = x W^T + b with e4m3 activations (quantized here, per token or with the static scale) and e4m3 weights,
    in one cuBLASLt fp8 GEMM with row-wise scales (scale_a [M, 1], scale_b [1, N], fp32)."""
    if a_split is not None:
        raise ValueError("split activation ranges are not supported by the fp8 GEMM")
    shape = x.shape
    x2 = x.reshape(-1, k)
    q, s = quantize_act(x2, a_mode, a_scale, (-1,))
    s = s.reshape(-1, 1).expand(x2.shape[0], 1)
    w_s = scale.float().reshape(1, -1)
    key = (x.device, x.dtype)
    out_dtype = _OUT_DTYPE.get(key, x.dtype)
    try:
        y = torch._scaled_mm(q, qweight.t(), scale_a=s.contiguous(), scale_b=w_s, out_dtype=out_dtype,
                             bias=None if bias is None else bias.to(out_dtype))
    except (RuntimeError, ValueError):  # (torch raises ValueError for an output dtype it does not take)
        if out_dtype == torch.bfloat16:
            raise
        # row-wise scaling takes only a bf16 output in some torch / cuBLAS versions: compute in bf16, cast back
        y = torch._scaled_mm(q, qweight.t(), scale_a=s.contiguous(), scale_b=w_s, out_dtype=torch.bfloat16,
                             bias=None if bias is None else bias.to(torch.bfloat16))
        _OUT_DTYPE[key] = torch.bfloat16  # (kept only once bf16 worked: the failure may have had another cause)
    return y.to(x.dtype).reshape(*shape[:-1], -1)
