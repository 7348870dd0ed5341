"""Bit packing of low-bit integer codes along the last dimension.

Layout (shared by every kernel and the saved file):
- 8 bits: signed int8 values, one per byte (no packing); or float8 e4m3 values (fp8 formats), one per byte.
- 4 bits: unsigned codes 0..15, two per byte; element 2j in the low nibble, 2j+1 in the high nibble
  (the layout of comfy-kitchen / AWQ-style checkpoints, so export is a copy).
- 2 bits: unsigned codes 0..3, four per byte; element 4j+i in bits [2i, 2i+2).
The last dimension is padded with zero codes up to a whole byte; `unpack_codes` needs the true length back.
"""
from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4)
ROW_ALIGN = 16  # bytes: joined rows of at least ALIGN_FROM bytes start aligned (see below)
ALIGN_FROM = 512


def per_byte(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bit packing supports {PACKABLE_BITS} bits, got {bits}")
    return 8 // bits


def packed_len(k: int, bits: int) -> int:
    """Bytes per row holding k codes of `bits` bits (8-bit: k)."""
    if bits == 8:
        return k
    n = per_byte(bits)
    return (k + n - 1) // n


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any int dtype, values in [0, 2**bits)) along the last dim into uint8."""
    n = per_byte(bits)
    k = codes.shape[-1]
    pad = (-k) % n
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, n)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=c.device)
    for i in range(n):
        out |= (c[..., i] & ((1 << bits) - 1)) << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., ceil(k/n)] -> uint8 codes [..., k]."""
    n = per_byte(bits)
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(n)]
    out = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :k]


# --- one byte row per output channel -----------------------------------------------------------------------------
# A quantized layer keeps codes, scales and zero points of an output channel side by side in one uint8 row:
#   [codes: packed_len(k, bits) bytes | pad to even | fp16 scales: 2*G bytes | uint8 zeros: G bytes | padding]
# so the whole quantized weight is a single tensor. That is what ComfyUI's LoRA backup/restore and low-VRAM moves see
# (`module.weight`), and they then always keep codes and scales consistent. Views split it without copying.
# Rows of 512 bytes or more are padded to a multiple of 16 bytes, so every row starts 16-byte aligned: GPU kernels
# then load the codes with vector (and async) copies; with an odd row stride they fall back to byte loads (measured on
# an H100: an 8192x1280x10240 int8 GEMM took 1.06 ms unaligned, 0.31 ms aligned). Shorter rows (small layers, where
# the padding would cost more than 3% and speed hardly matters) are only padded to an even length.

def _offsets(codes: int, groups: int, has_zero: bool) -> dict:
    s_off = codes + (codes % 2)
    z_off = s_off + 2 * groups
    end = z_off + (groups if has_zero else 0)
    pad = (-end) % ROW_ALIGN if end >= ALIGN_FROM else end % 2
    return {"codes": codes, "scale_off": s_off, "zero_off": z_off, "row_bytes": end + pad}


def row_layout(k: int, bits: int, groups: int, has_zero: bool) -> dict:
    """Byte offsets of one joined row: codes, scale_off, zero_off, row_bytes."""
    return _offsets(packed_len(k, bits), groups, has_zero)


def join_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """codes (int8 or uint8 [N, L]), scale (fp16 [N, G]), zero (uint8 [N, G] or None) -> uint8 [N, row_bytes]."""
    n, groups = scale.shape
    lay = _offsets(codes.shape[1], groups, zero is not None)
    out = torch.zeros(n, lay["row_bytes"], dtype=torch.uint8, device=codes.device)
    out[:, : lay["codes"]] = codes.contiguous().view(torch.uint8)
    out[:, lay["scale_off"]: lay["zero_off"]] = scale.to(torch.float16).contiguous().view(torch.uint8)
    if zero is not None:
        out[:, lay["zero_off"]: lay["zero_off"] + groups] = zero.to(torch.uint8)
    return out


_LAYOUTS: dict = {}


def split_rows(blob: torch.Tensor, k: int, bits: int, groups: int, has_zero: bool, fp8: bool = False):
    """Views (codes, scale fp16 [N, G], zero uint8 [N, G] | None) into a joined uint8 blob (no copy). 8-bit codes
    are int8, or float8 e4m3 with `fp8`."""
    key = (k, bits, groups, has_zero)
    lay = _LAYOUTS.get(key)  # (split_rows runs on every quantized call: the same few layouts each time)
    if lay is None:
        lay = _LAYOUTS[key] = row_layout(*key)
    codes = blob[:, : lay["codes"]]
    if bits == 8:
        codes = codes.view(torch.float8_e4m3fn if fp8 else torch.int8)
    scale = blob[:, lay["scale_off"]: lay["zero_off"]].view(torch.float16)
    zero = blob[:, lay["zero_off"]: lay["zero_off"] + groups] if has_zero else None
    return codes, scale, zero
