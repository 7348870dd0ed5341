"""Random quantized-layer calls in the stored layout, for kernel tests and benchmarks.

`random_call` returns the keyword arguments of `dispatch.linear` / `dispatch.conv2d` (qweight, scale, zero as views
into one joined blob, exactly as a packed layer passes them) with values in realistic ranges.
"""
from __future__ import annotations

import torch

from .packing import join_rows, pack_codes, split_rows


def random_call(n: int, k: int, bits: int = 8, group_size: int | None = None, symmetric: bool | None = None,
                a_bits: int = 8, a_mode: str = "static", a_split: int | None = None, bias: bool = True,
                seed: int = 0, device="cpu", fp8: bool = False) -> dict:
    """`fp8`: float8 e4m3 weight codes (bits 8); give a_mode "fp8_dynamic" / "fp8_static" for e4m3 activations."""
    g = torch.Generator().manual_seed(seed)
    symmetric = (bits == 8) if symmetric is None else symmetric
    groups = 1 if group_size is None else -(-k // group_size)
    if fp8:
        codes = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        zero = None
        qmax = 448
    elif bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        zero = None
        qmax = 127
    else:
        codes = pack_codes(torch.randint(0, 2 ** bits, (n, k), generator=g), bits)
        zero = None if symmetric else torch.randint(0, 2 ** bits, (n, groups), generator=g).to(torch.uint8)
        qmax = 2 ** (bits - 1)
    # weights of a layer with unit-variance inputs and O(1) outputs
    scale = ((torch.rand(n, groups, generator=g) + 0.5) / (qmax * k ** 0.5)).to(torch.float16)
    blob = join_rows(codes, scale, zero)
    qweight, scale_v, zero_v = split_rows(blob, k, bits, groups, zero is not None, fp8)
    call = dict(qweight=qweight.to(device), scale=scale_v.to(device), zero=None if zero_v is None else
                zero_v.to(device), bits=bits, k=k, group_size=group_size,
                bias=(torch.randn(n, generator=g) * 0.1).to(device) if bias else None,
                a_bits=a_bits if a_mode != "none" else 16, a_mode=a_mode, a_scale=None, a_zero=None, a_split=None)
    if device != "cpu":  # keep them views into one device blob
        qweight, scale_v, zero_v = split_rows(blob.to(device), k, bits, groups, zero is not None, fp8)
        call.update(qweight=qweight, scale=scale_v, zero=zero_v)
    if a_mode == "fp8_static":
        call.update(a_scale=(torch.rand(1 if a_split is None else 2, generator=g) * 3 + 1).div(448).to(device),
                    a_zero=torch.zeros(1 if a_split is None else 2, device=device), a_split=a_split)
    if a_mode == "static":
        segs = 1 if a_split is None else 2
        lo = -(torch.rand(segs, generator=g) * 2 + 1)
        hi = torch.rand(segs, generator=g) * 3 + 1
        qm = 2 ** a_bits - 1
        s = (hi - lo) / qm
        call.update(a_scale=s.to(device), a_zero=torch.clamp(torch.round(-lo / s), 0, qm).to(device),
                    a_split=a_split)
    return call


def conv_geometry(kernel: int = 3, stride: int = 1, padding: int = 1, dilation: int = 1) -> dict:
    return dict(kernel_size=(kernel, kernel), stride=(stride, stride), padding=(padding, padding),
                dilation=(dilation, dilation))
