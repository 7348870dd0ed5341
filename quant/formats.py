"""Per-layer quantization formats (configs as data) and their exact packed sizes.

A plan is a mapping `layer name -> LayerFormat` (the torchao FqnToConfig shape). Bits of 16 mean "kept in float".
`fp8`: the 8-bit parts are float8 e4m3 instead of int8 (weights: one scale per output channel; activations: per-token
dynamic or a calibrated per-tensor scale; kernels/fp8.py) — the format of Hopper/Ada fp8 GEMMs and of ComfyUI's
`float8_e4m3fn` layers. Names end in "-fp8" (W8A8d-fp8, W8A16-fp8, W16A8d-fp8).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..kernels.packing import row_layout

W_BITS = (2, 4, 8, 16)
A_BITS = (4, 8, 16)
A_MODES = ("static", "dynamic")


@dataclass(frozen=True)
class LayerFormat:
    w_bits: int = 8
    a_bits: int = 16
    group_size: int | None = None  # None: one scale per output channel; else groups of this size along K
    a_mode: str = "static"  # "static": calibrated per-tensor range; "dynamic": absmax per token at run time
    w_symmetric: bool | None = None  # None: symmetric at 8 bits, asymmetric (zero point) below
    fp8: bool = False  # the 8-bit weights and activations are float8 e4m3 (module docstring)

    def __post_init__(self):
        if self.w_bits not in W_BITS:
            raise ValueError(f"w_bits must be one of {W_BITS}, got {self.w_bits}")
        if self.a_bits not in A_BITS:
            raise ValueError(f"a_bits must be one of {A_BITS}, got {self.a_bits}")
        if self.a_mode not in A_MODES:
            raise ValueError(f"a_mode must be one of {A_MODES}, got {self.a_mode!r}")
        if self.group_size is not None and (self.group_size < 1 or self.w_bits == 16):
            raise ValueError("group_size needs w_bits < 16 and a positive size")
        if self.fp8 and (self.w_bits not in (8, 16) or self.a_bits not in (8, 16) or self.is_float
                         or self.group_size is not None or self.w_symmetric is False):
            raise ValueError("fp8 formats have 8-bit (e4m3) weights and/or activations, no groups, no zero point")

    @property
    def symmetric(self) -> bool:
        return self.w_bits == 8 if self.w_symmetric is None else self.w_symmetric

    @property
    def w_fp8(self) -> bool:
        """float8 e4m3 weights"""
        return self.fp8 and self.w_bits == 8

    @property
    def a_fp8(self) -> bool:
        """float8 e4m3 activations"""
        return self.fp8 and self.a_bits == 8

    def takes(self, kind: str) -> bool:
        """Can a layer of this kind ("linear" / "conv2d") take this format? fp8 ones are for Linear layers, where
        the fp8 GEMMs are."""
        return kind == "linear" or not self.fp8

    @property
    def is_float(self) -> bool:
        return self.w_bits == 16 and self.a_bits == 16

    @property
    def name(self) -> str:
        """Short label, e.g. W4g64A8 (static activations), W8A8d (dynamic per-token), W8A8d-fp8 (float8 e4m3)."""
        w = f"W{self.w_bits}" + (f"g{self.group_size}" if self.group_size else "")
        a = f"A{self.a_bits}" + ("d" if self.a_mode == "dynamic" and self.a_bits < 16 else "")
        return w + a + ("-fp8" if self.fp8 else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["w_symmetric"] = self.symmetric if self.w_bits < 16 else None
        if not self.fp8:
            del d["fp8"]  # (files of int formats read as before)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerFormat":
        keys = {"w_bits", "a_bits", "group_size", "a_mode", "w_symmetric", "fp8"}
        return cls(**{k: d[k] for k in keys if k in d})

    def weight_bytes(self, n: int, k: int) -> int:
        """Exact bytes the weight of an [n, k] layer holds in memory in this format (bias excluded): the joined rows
        of kernels/packing.py (codes, fp16 scales, zero points, long rows padded to 16 bytes)."""
        if self.w_bits == 16:
            return n * k * 2
        groups = 1 if self.group_size is None else -(-k // self.group_size)
        return n * row_layout(k, self.w_bits, groups, not self.symmetric)["row_bytes"]


_NAME = re.compile(r"^w(\d+)(?:g(\d+))?a(\d+)(d?)(-fp8)?$", re.I)


def as_format(spec) -> LayerFormat:
    """LayerFormat from a LayerFormat, a dict, a (w_bits, a_bits[, group_size]) tuple or a name like 'W4g64A8'."""
    if isinstance(spec, LayerFormat):
        return spec
    if isinstance(spec, dict):
        return LayerFormat.from_dict(spec)
    if isinstance(spec, (tuple, list)):
        return LayerFormat(*spec)
    if isinstance(spec, str):
        m = _NAME.match(spec.strip())
        if m:
            return LayerFormat(int(m[1]), int(m[3]), int(m[2]) if m[2] else None, "dynamic" if m[4] else "static",
                               fp8=bool(m[5]))
    raise ValueError(f"cannot read a layer format from {spec!r} (use e.g. 'W8A8', 'W4g64A16', 'W8A8d-fp8', "
                     "(4, 8, 64))")


FLOAT = LayerFormat(16, 16)
