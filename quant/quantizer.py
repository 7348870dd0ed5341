"""Uniform affine quantization: scales and zero points at any granularity, round trip, and packing of weights.

q = clamp(round(x / s) + z, qmin, qmax);  x_hat = (q - z) * s       (method.md §1)
Symmetric: z = 0, q in [-(2**(b-1) - 1), 2**(b-1) - 1].  Asymmetric: q in [0, 2**b - 1], z an integer code.

Granularity is expressed by reshaping x to [R, G, g] and reducing over the last axis:
  "tensor"  R=1, G=1;   "channel" / "token": one row per output channel / token, G=1;
  "group":  per row, G = ceil(K / group_size) groups of group_size along the last dim (the last one padded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.fp8 import quantize_weight as fp8_weights
from ..kernels.packing import pack_codes, packed_len, unpack_codes
from ..kernels.reference import dequantize_weight

GRANULARITIES = ("tensor", "channel", "token", "group")
# The smallest positive fp16 (subnormal); scales are stored as fp16, so they must not underflow to zero.
_MIN_SCALE = 2.0 ** -24


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2 ** bits - 1


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View x as [R, G, g] for the given granularity (rows = first dim for channel, all but last for token)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    rows = x.reshape(x.shape[0], -1) if granularity == "channel" else x.reshape(-1, x.shape[-1])
    if granularity != "group":
        return rows.unsqueeze(1)
    if not group_size or group_size < 1:
        raise ValueError("granularity 'group' needs a group_size")
    k = rows.shape[-1]
    pad = (-k) % group_size
    if pad:  # replicate the row's last value: it is already in the last group, so its range does not change
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(rows.shape[0], -1, group_size)


@dataclass
class QParams:
    scale: torch.Tensor  # [R, G] fp32 (already rounded to what is stored)
    zero: torch.Tensor | None  # [R, G] integer-valued fp32, or None when symmetric
    bits: int
    granularity: str
    group_size: int | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero is None


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype):
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / qmax).clamp(min=_MIN_SCALE).to(scale_dtype).float()
        return scale, None
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the grid must hold 0.0 exactly (padding, ReLU)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_MIN_SCALE).to(scale_dtype).float()
    zero = torch.clamp(torch.round(-lo / scale) + qmin, qmin, qmax)
    return scale, zero


def _quant_grouped(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits, zero is None)
    z = 0.0 if zero is None else zero.unsqueeze(-1)
    return torch.clamp(torch.round(xg / scale.unsqueeze(-1)) + z, qmin, qmax)


def _dequant_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    z = 0.0 if zero is None else zero.unsqueeze(-1)
    return (q - z) * scale.unsqueeze(-1)


def calc_qparams(x: torch.Tensor, bits: int, granularity: str = "channel", group_size: int | None = None,
                 symmetric: bool = True, search: str = "minmax", grid: int = 12, min_ratio: float = 0.6,
                 scale_dtype=torch.float16) -> QParams:
    """Scales (and zero points) for x. `search="mse"` tries clipping ranges alpha * [min, max] for alpha in
    [min_ratio, 1] and keeps, per row/group, the one with the least squared round-trip error."""
    xg = _grouped(x.detach().to(torch.float32), granularity, group_size)
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
    scale, zero = _params_from_range(lo, hi, bits, symmetric, scale_dtype)
    if search == "mse":
        # a block of rows at a time: the dozen round trips per block stay in the cache instead of streaming the whole
        # tensor through memory a dozen times (several times faster on a big layer)
        rows = max(1, mse_block(xg.device) // max(1, xg[0].numel()))
        alphas = torch.linspace(1.0, min_ratio, grid)[1:].tolist()
        for r0 in range(0, xg.shape[0], rows):
            r = slice(r0, r0 + rows)
            sc, zc = _mse_clip(xg[r], lo[r], hi[r], scale[r], None if zero is None else zero[r], bits, symmetric,
                               scale_dtype, alphas)
            scale[r] = sc
            if zero is not None:
                zero[r] = zc
    elif search != "minmax":
        raise ValueError(f"search must be 'minmax' or 'mse', got {search!r}")
    return QParams(scale, zero, bits, granularity, group_size)


_MSE_BLOCK = 1 << 18  # elements per block of the MSE search on a CPU (1 MB of fp32: fastest on a 2-core EPYC)
_MSE_BLOCK_GPU = 1 << 24  # on a GPU (64 MB of fp32 per temporary): a block of 1 MB is ~1 us of GPU work for each of
# its ~365 small ops, so the search was launch-bound (~80 s of launches over Flux.1-dev's 12B weights); rows are
# independent, so the block only changes the speed


def mse_block(device) -> int:
    """Elements per block of the MSE search on `device`."""
    return _MSE_BLOCK if torch.device(device).type == "cpu" else _MSE_BLOCK_GPU


def _mse_clip(xg, lo, hi, scale, zero, bits, symmetric, scale_dtype, alphas):
    """Per row/group, the clipping alpha * [lo, hi] (alpha = 1 first) with the least squared round-trip error."""
    best_err = ((_dequant_grouped(_quant_grouped(xg, scale, zero, bits), scale, zero) - xg) ** 2).sum(-1)
    for alpha in alphas:
        s, z = _params_from_range(lo * alpha, hi * alpha, bits, symmetric, scale_dtype)
        err = ((_dequant_grouped(_quant_grouped(xg, s, z, bits), s, z) - xg) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (as float tensor of x's shape)."""
    xg = _grouped(x.to(torch.float32), qp.granularity, qp.group_size)
    q = _quant_grouped(xg, qp.scale, qp.zero, qp.bits)
    return _ungroup(q, x.shape, qp)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    qg = _grouped(q.to(torch.float32), qp.granularity, qp.group_size)
    return _ungroup(_dequant_grouped(qg, qp.scale, qp.zero), q.shape, qp)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    return dequantize(quantize(x, qp), qp).to(x.dtype)


def _ungroup(t: torch.Tensor, shape, qp: QParams) -> torch.Tensor:
    if qp.granularity == "group":
        k = shape[-1]
        t = t.reshape(t.shape[0], -1)[:, :k]
    return t.reshape(shape)


# --- packed weights -------------------------------------------------------------------------------------------------

@dataclass
class PackedWeight:
    """A weight matrix [N, K] in its stored form (layouts: kernels/reference.py)."""
    qweight: torch.Tensor  # int8 [N, K] (8 bits) or uint8 [N, ceil(K*bits/8)]
    scale: torch.Tensor  # fp16 [N, G]
    zero: torch.Tensor | None  # uint8 [N, G] or None (symmetric)
    bits: int
    k: int
    group_size: int | None  # None: one scale per output channel

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scale, self.zero, self.bits, self.k, self.group_size)

    def tensors(self) -> dict:
        out = {"qweight": self.qweight, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def packed_weight_bytes(n: int, k: int, bits: int, group_size: int | None, symmetric: bool) -> int:
    """Exact bytes `quantize_weight` stores for an [n, k] weight (packed codes + fp16 scales + uint8 zeros)."""
    groups = 1 if group_size is None else -(-k // group_size)
    return n * packed_len(k, bits) + n * groups * 2 + (0 if symmetric else n * groups)


def quantize_weight(w2d: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool | None = None,
                    search: str = "auto", fp8: bool = False) -> PackedWeight:
    """Quantize a [N, K] weight to its packed form. Defaults: 8-bit symmetric; 4/2-bit asymmetric (4 levels at
    2 bits instead of 3, and the layout of AWQ-style W4A16 kernels). search="auto": the MSE clipping search below
    8 bits, where it pays; plain min-max at 8 bits, where it changes next to nothing and would cost time.
    `fp8`: float8 e4m3 codes with one scale per output channel (kernels/fp8.py; 8 bits, no groups, no search)."""
    if fp8:
        if bits != 8 or group_size is not None or symmetric is False:
            raise ValueError("fp8 weights are 8-bit, per output channel, symmetric")
        codes, scale = fp8_weights(w2d)
        return PackedWeight(codes, scale, None, 8, w2d.shape[1], None)
    if search == "auto":
        search = "mse" if bits < 8 else "minmax"
    if w2d.dim() != 2:
        raise ValueError("quantize_weight expects a 2-D [N, K] matrix")
    if symmetric is None:
        symmetric = bits == 8
    if bits == 8 and not symmetric:
        raise ValueError("8-bit weights are symmetric (int8 GEMMs take signed codes without a zero point)")
    if bits not in (2, 4, 8):
        raise ValueError(f"weight bits must be 2, 4 or 8, got {bits}")
    gran = "channel" if group_size is None else "group"
    qp = calc_qparams(w2d, bits, gran, group_size, symmetric, search)
    q = quantize(w2d, qp)
    n, k = w2d.shape
    scale = qp.scale.to(torch.float16)
    if bits == 8:
        return PackedWeight(q.to(torch.int8).contiguous(), scale, None, bits, k, group_size)
    codes = q if not symmetric else q + 2 ** (bits - 1)  # symmetric codes sit around the implicit mid zero
    zero = None if symmetric else qp.zero.to(torch.uint8)
    return PackedWeight(pack_codes(codes, bits).contiguous(), scale, zero, bits, k, group_size)


def unpacked_codes(pw: PackedWeight) -> torch.Tensor:
    """The integer codes of a packed weight ([N, K], int16): signed for 8 bits, unsigned codes otherwise."""
    if pw.bits == 8:
        return pw.qweight.to(torch.int16)
    return unpack_codes(pw.qweight, pw.bits, pw.k).to(torch.int16)
