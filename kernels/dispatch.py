"""Choose an implementation for each quantized op: a fast backend whose constraints accept the call, else the
reference. `MIXQUANT_KERNELS=reference` (or `use_backend("reference")`) forces the reference everywhere.

A backend is a name plus two callables per op: `accepts(**call) -> str | None` (None = accepted, else why not) and
the op itself. Backends register in priority order; `explain()` says, per backend and op, what it would take.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .reference import dequantize_weight


@dataclass
class Backend:
    name: str
    available: Callable[[], str | None]  # None when usable on this machine, else the reason
    ops: dict = field(default_factory=dict)  # op name -> (accepts, impl)


_BACKENDS: list[Backend] = []
_forced: list[str | None] = [None]


def register(backend: Backend, first: bool = True) -> None:
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def backends() -> list[Backend]:
    return list(_BACKENDS)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force one backend ("reference" included) inside the block."""
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _forced_name() -> str | None:
    return _forced[-1] or os.environ.get("MIXQUANT_KERNELS") or None


def select(op: str, **call) -> tuple[str, Callable]:
    forced = _forced_name()
    if forced != "reference":
        for b in _BACKENDS:
            if forced and b.name != forced:
                continue
            if op not in b.ops or b.available() is not None:
                continue
            accepts, impl = b.ops[op]
            if accepts(**call) is None:
                return b.name, impl
    return "reference", _REFERENCE[op]


def _ref_linear(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split):
    w = dequantize_weight(qweight, scale, zero, bits, k, group_size)
    return reference.linear(x, w, bias, a_bits, a_mode, a_scale, a_zero, a_split)


def _ref_conv2d(x, qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale, a_zero, a_split,
                kernel_size, stride, padding, dilation):
    w = dequantize_weight(qweight, scale, zero, bits, k, group_size)
    return reference.conv2d(x, w, bias, kernel_size, stride, padding, dilation, a_bits, a_mode, a_scale, a_zero,
                            a_split)


_REFERENCE = {"linear": _ref_linear, "conv2d": _ref_conv2d}


def linear(x: torch.Tensor, **call) -> torch.Tensor:
    """Quantized linear. `call` holds qweight, scale, zero, bits, k, group_size, bias, a_bits, a_mode, a_scale,
    a_zero, a_split (see kernels/reference.py for the layouts)."""
    _, impl = select("linear", x=x, **call)
    return impl(x, **call)


def conv2d(x: torch.Tensor, **call) -> torch.Tensor:
    """Quantized conv2d over NCHW x; `call` as for linear plus kernel_size, stride, padding, dilation."""
    _, impl = select("conv2d", x=x, **call)
    return impl(x, **call)


def explain() -> list[dict]:
    """Per backend: available or why not, and the ops it implements."""
    rows = []
    for b in _BACKENDS:
        why = b.available()
        rows.append({"backend": b.name, "available": why is None, "why_not": why, "ops": sorted(b.ops)})
    rows.append({"backend": "reference", "available": True, "why_not": None, "ops": sorted(_REFERENCE)})
    return rows
