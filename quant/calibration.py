"""Activation-range collection: forward hooks on every quantizable layer record the range of its input while a
caller-supplied function runs the FP model. (The denoiser-runner interface, timestep groups and percentile/MSE
ranges build on this.)"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .apply import ActRange
from .errors import MixQuantError
from .roles import quantizable


class RangeObserver:
    """Running min/max of one layer's input, per timestep group."""

    def __init__(self, groups: int = 1):
        self.lo = torch.full((groups,), float("inf"))
        self.hi = torch.full((groups,), float("-inf"))
        self.elements = 0

    def update(self, x: torch.Tensor, group: int = 0):
        x = x.detach()
        lo, hi = x.min().float().cpu(), x.max().float().cpu()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise MixQuantError("NaN or infinite activations appeared during calibration: the model produces "
                                "invalid values for these prompts/settings. Check the model in full precision "
                                "(dtype, guidance, steps) before quantizing.")
        self.lo[group] = torch.minimum(self.lo[group], lo)
        self.hi[group] = torch.maximum(self.hi[group], hi)
        self.elements += x.numel()

    def result(self) -> ActRange:
        lo, hi = self.lo.clone(), self.hi.clone()
        seen = torch.isfinite(lo)
        if not seen.any():
            raise MixQuantError("a layer was never run during calibration")
        # groups never visited take the overall range
        lo[~seen], hi[~seen] = lo[seen].min(), hi[seen].max()
        return ActRange(lo.reshape(-1, 1), hi.reshape(-1, 1))


def collect_act_ranges(model: nn.Module, run: Callable[[], None], names=None) -> dict[str, ActRange]:
    """Run `run()` (which drives `model` in full precision) and return the input range of each quantizable layer
    (or of `names`). Hooks are always removed, even when `run` raises."""
    observers, handles = {}, []
    for name, m in model.named_modules():
        if quantizable(m) is None or (names is not None and name not in names):
            continue
        obs = observers[name] = RangeObserver()
        handles.append(m.register_forward_pre_hook(lambda mod, args, o=obs: o.update(args[0])))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: o.result() for n, o in observers.items() if o.elements}
