"""Calibration: run the FP sampler on the user's prompts and record, per quantizable layer, the range of its input
(overall and per group of timesteps), per-channel ranges (to find Q-Diffusion's skip-concat split), and whether the
text conditioning's token 0 is an outlier (MixDQ's BOS-aware to_k/to_v)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .apply import ActRange
from .errors import MixQuantError
from .roles import quantizable
from .runner import DenoiserCall, DenoiserRunner, Progress, capture_calls, timestep_groups

_BOS_LAYER = re.compile(r"(^|\.)(attn2|cross_attn)\.(to_k|to_v|k_proj|v_proj)$")
BOS_RATIO = 5.0  # token 0 counts as an outlier when its absmax is this many times that of the other tokens
BALANCE_MODES = ("auto", "on", "off")
# channel balancing "auto": a Linear layer's input has outlier channels when its largest channel's absmax is this many
# times the median channel's (DiTs' adaLN-modulated inputs and MLP outputs; SmoothQuant / ViDiT-Q)
BALANCE_RATIO = 8.0


class RangeObserver:
    """Running input statistics of one layer: min/max per timestep group, per channel, a percentile estimate,
    and token-0 statistics for 3-D inputs [B, N, D]."""

    def __init__(self, groups: int, channel_dim: int, percentile: float | None = None, track_bos: bool = False):
        self.lo = torch.full((groups,), float("inf"))
        self.hi = torch.full((groups,), float("-inf"))
        self.p_lo = torch.full((groups,), float("inf"))
        self.p_hi = torch.full((groups,), float("-inf"))
        self.gch_lo = self.gch_hi = None  # per timestep group and channel [G, C]
        self.channel_dim, self.percentile, self.track_bos = channel_dim, percentile, track_bos
        self.elements = 0
        self.calls = 0
        self.tok0_amax = 0.0
        self.rest_amax = 0.0
        self.bos_vec: torch.Tensor | None = None
        self.bos_consistent = True
        self.rest_lo = torch.full((groups,), float("inf"))
        self.rest_hi = torch.full((groups,), float("-inf"))

    def update(self, x: torch.Tensor, group: int = 0, name: str = ""):
        x = x.detach().float()
        lo, hi = x.min().cpu(), x.max().cpu()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            where = f" (first at the input of {name})" if name else ""
            raise MixQuantError(f"NaN or infinite activations appeared during calibration{where}: the model "
                                "produces invalid values for these prompts/settings. Check the model in full "
                                "precision (dtype, guidance, steps) before quantizing.")
        self.lo[group] = torch.minimum(self.lo[group], lo)
        self.hi[group] = torch.maximum(self.hi[group], hi)
        if self.percentile is not None:
            flat = x.reshape(-1)
            if flat.numel() > 1_000_000:
                flat = flat[torch.randint(0, flat.numel(), (1_000_000,), generator=torch.Generator().manual_seed(0))]
            q = torch.quantile(flat.cpu(), torch.tensor([1 - self.percentile, self.percentile]))
            self.p_lo[group] = torch.minimum(self.p_lo[group], q[0])
            self.p_hi[group] = torch.maximum(self.p_hi[group], q[1])
        cd = self.channel_dim % x.dim()
        dims = [d for d in range(x.dim()) if d != cd]
        clo, chi = x.amin(dim=dims).cpu(), x.amax(dim=dims).cpu()
        if self.gch_lo is None:
            self.gch_lo = torch.full((self.lo.numel(), clo.numel()), float("inf"))
            self.gch_hi = torch.full((self.lo.numel(), clo.numel()), float("-inf"))
        self.gch_lo[group] = torch.minimum(self.gch_lo[group], clo)
        self.gch_hi[group] = torch.maximum(self.gch_hi[group], chi)
        if self.track_bos and x.dim() == 3 and x.shape[1] > 1:
            t0, rest = x[:, 0], x[:, 1:]
            self.tok0_amax = max(self.tok0_amax, float(t0.abs().max()))
            self.rest_amax = max(self.rest_amax, float(rest.abs().max()))
            self.rest_lo[group] = torch.minimum(self.rest_lo[group], rest.min().cpu())
            self.rest_hi[group] = torch.maximum(self.rest_hi[group], rest.max().cpu())
            for row in t0:
                if float(row.abs().max()) == 0.0:  # an all-zero (negative) conditioning has no BOS token
                    continue
                if self.bos_vec is None:
                    self.bos_vec = row.cpu().clone()
                elif not torch.allclose(row.cpu(), self.bos_vec, rtol=1e-3, atol=1e-3 * float(row.abs().max())):
                    self.bos_consistent = False
        self.elements += x.numel()
        self.calls += 1

    @property
    def bos_outlier(self) -> bool:
        return (self.track_bos and self.bos_vec is not None and self.bos_consistent
                and self.tok0_amax > BOS_RATIO * max(self.rest_amax, 1e-12))

    @property
    def ch_lo(self) -> torch.Tensor | None:
        """Each input channel's smallest value over every timestep group."""
        return None if self.gch_lo is None else self.gch_lo.amin(dim=0)

    @property
    def ch_hi(self) -> torch.Tensor | None:
        return None if self.gch_hi is None else self.gch_hi.amax(dim=0)

    def channel_absmax(self) -> torch.Tensor:
        """Each input channel's largest magnitude over the whole calibration."""
        return torch.maximum(self.ch_lo.abs(), self.ch_hi.abs())

    def balanced_result(self, s: torch.Tensor) -> ActRange:
        """The min-max range of x / s per timestep group (exact: from the per-group, per-channel extremes)."""
        seen = torch.isfinite(self.gch_lo).all(dim=1)
        if not seen.any():
            raise MixQuantError("a layer was never run during calibration")
        lo, hi = (self.gch_lo / s).amin(dim=1), (self.gch_hi / s).amax(dim=1)
        lo[~seen], hi[~seen] = lo[seen].min(), hi[seen].max()
        return ActRange(lo.reshape(-1, 1), hi.reshape(-1, 1), None, s.clone())

    def result(self, method: str = "minmax", split: bool = True) -> ActRange:
        if self.bos_outlier:  # token 0 is computed in full precision: the range covers tokens 1..N only
            lo, hi = self.rest_lo.clone(), self.rest_hi.clone()
        elif method == "percentile" and self.percentile is not None:
            lo, hi = self.p_lo.clone(), self.p_hi.clone()
        else:
            lo, hi = self.lo.clone(), self.hi.clone()
        seen = torch.isfinite(lo)
        if not seen.any():
            raise MixQuantError("a layer was never run during calibration")
        lo[~seen], hi[~seen] = lo[seen].min(), hi[seen].max()
        cut = self.best_split() if split else None
        if cut is None:
            return ActRange(lo.reshape(-1, 1), hi.reshape(-1, 1))
        # per-segment ranges from the per-channel statistics (over all timesteps: conservative for every group)
        seg_lo = torch.stack([self.ch_lo[:cut].min(), self.ch_lo[cut:].min()]).expand(lo.numel(), 2).clone()
        seg_hi = torch.stack([self.ch_hi[:cut].max(), self.ch_hi[cut:].max()]).expand(lo.numel(), 2).clone()
        return ActRange(seg_lo, seg_hi, cut)

    def best_split(self, min_gain: float = 4.0) -> int | None:
        """Q-Diffusion's shortcut split, found from data: the channel index (a multiple of 8) that cuts the input
        into two segments with their own ranges. Cost of a choice: the sum over channels of (segment range /
        channel range)^2, i.e. each channel's quantization noise relative to its own signal. A skip
        concatenation (tiny-range channels next to huge ones) shows up as a large drop; the split is kept only
        when it cuts that cost by `min_gain`."""
        if self.ch_lo is None or self.channel_dim != 1 or self.ch_lo.numel() < 16:
            return None
        lo, hi = self.ch_lo.double(), self.ch_hi.double()
        c = lo.numel()
        full = float(hi.max() - lo.min())
        if full <= 0:
            return None
        own = torch.clamp(hi - lo, min=1e-3 * full)
        inv = (1.0 / own ** 2)
        base = full ** 2 * float(inv.sum())
        best, best_cost = None, base
        for cut in range(8, c - 7, 8):
            ra = float(hi[:cut].max() - lo[:cut].min())
            rb = float(hi[cut:].max() - lo[cut:].min())
            cost = ra ** 2 * float(inv[:cut].sum()) + rb ** 2 * float(inv[cut:].sum())
            if cost < best_cost:
                best, best_cost = cut, cost
        return best if best is not None and best_cost * min_gain < base else None


def nearest_group(groups: dict[float, int], timestep: float) -> int:
    """The group of the scheduled timestep nearest `timestep` (a denoiser may see it rounded to its dtype, e.g. Flux's
    t / 1000 in fp16; a sampler may evaluate between steps)."""
    if timestep in groups:
        return groups[timestep]
    return groups[min(groups, key=lambda t: abs(t - timestep))]


@dataclass
class Calibration:
    calls: list[DenoiserCall]
    observers: dict[str, RangeObserver]
    groups: dict[float, int]  # timestep -> group index
    n_groups: int
    prompts: list[str]
    seeds: list[int]
    settings: dict
    fp_images: torch.Tensor | None = None
    range_method: str = "minmax"
    act_elements: dict = field(default_factory=dict)  # layer -> input elements per sampling run
    timestep_fn: Callable | None = None  # reads a denoiser call's timestep (the runner's timestep_of)
    seconds: float = 0.0  # how long the recorded FP sampling run took (what a sampling run costs here)
    balance: dict = field(default_factory=dict)  # layer -> balancing vector s (set_balance)
    balance_rule: tuple = ("off",)  # how `balance` was chosen (cache keys)

    def ranges(self, split: bool = True) -> dict[str, ActRange]:
        """Each layer's input range; a balanced layer's is the range of x / s, with s (quantized layers built from
        it divide their input by s and multiply their weight's input columns by it)."""
        return {n: (o.balanced_result(self.balance[n]) if n in self.balance else o.result(self.range_method, split))
                for n, o in self.observers.items() if o.calls}

    def set_balance(self, model: nn.Module, mode: str = "auto", alpha: float = 0.5,
                    ratio: float = BALANCE_RATIO) -> dict:
        """Channel balancing (SmoothQuant, ViDiT-Q) of Linear layers whose input has outlier channels ("auto": the
        largest channel's absmax is `ratio` x the median channel's; "on": every Linear; "off": none):
        s_c = max|x_c|^alpha / max|W_:,c|^(1 - alpha), so that x / s and W s share the range of channel c. Layers
        whose context token 0 is computed in full precision (BOS) are left as they are. Returns the vectors."""
        if mode not in BALANCE_MODES:
            raise MixQuantError(f"unknown balancing mode {mode!r}: use one of {', '.join(BALANCE_MODES)}")
        if not 0.0 < alpha < 1.0:
            raise MixQuantError("the balancing strength alpha must be between 0 and 1")
        self.balance, self.balance_rule = {}, (mode,) if mode == "off" else (mode, alpha, ratio)
        if mode == "off":
            return self.balance
        modules = dict(model.named_modules())
        for name, o in self.observers.items():
            m = modules.get(name)
            if not o.calls or o.channel_dim != -1 or o.bos_outlier or quantizable(m) != "linear":
                continue
            ax = o.channel_absmax().double()
            if mode == "auto" and float(ax.max()) < ratio * max(float(ax.median()), 1e-12):
                continue
            w = getattr(m, "weight", None)
            if w is None or w.dim() != 2 or w.shape[1] != ax.numel() or not w.is_floating_point():
                continue
            aw = w.detach().abs().amax(dim=0).double().cpu()
            ok = (ax > 0) & (aw > 0)
            sv = torch.ones_like(ax)
            sv[ok] = ax[ok] ** alpha / aw[ok] ** (1 - alpha)
            sv = sv / torch.exp(torch.log(sv).mean())  # (scale-free: the geometric mean is 1)
            self.balance[name] = sv.clamp(1e-4, 1e4).float()
        return self.balance

    def bos(self) -> dict[str, torch.Tensor]:
        """Layers whose context token 0 is an outlier -> the BOS embedding to precompute."""
        return {n: o.bos_vec for n, o in self.observers.items() if o.bos_outlier}

    def group_of(self, timestep: float) -> int:
        return nearest_group(self.groups, timestep)

    def group_bounds(self) -> list[float]:
        """Lowest timestep of each group (noisiest group first): the switch points stored in files."""
        out = []
        for g in range(self.n_groups):
            ts = [t for t, gi in self.groups.items() if gi == g]
            out.append(min(ts) if ts else float("-inf"))
        return out


def calibrate(runner: DenoiserRunner, prompts: list[str], seeds: list[int] | None = None, n_groups: int = 1,
              range_method: str = "minmax", percentile: float = 0.9999, names=None,
              progress: Progress | None = None) -> Calibration:
    """Run the FP sampler on the prompts and observe every quantizable layer. Hooks are always removed; the
    denoiser is never modified."""
    prompts = [p for p in (prompts or [])]
    if not prompts:
        raise MixQuantError("the prompt list is empty: give at least one prompt to calibrate on.")
    if range_method not in ("minmax", "percentile"):
        raise MixQuantError(f"unknown range method {range_method!r}: use minmax or percentile")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    progress = progress or Progress()
    progress.start(runner.expected_calls(len(prompts)) or 1, "calibrating")  # may raise InterruptedRun: before any hook is registered
    state = {"group": 0}
    observers: dict[str, RangeObserver] = {}
    handles = []
    model = runner.denoiser
    for name, m in model.named_modules():
        kind = quantizable(m)
        if kind is None or (names is not None and name not in names):
            continue
        obs = observers[name] = RangeObserver(max(1, n_groups), 1 if kind == "conv2d" else -1,
                                              percentile if range_method == "percentile" else None,
                                              track_bos=bool(_BOS_LAYER.search(name)))
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, o=obs, n=name: o.update(args[0], state["group"], n)))
    # the runner knows its schedule up front, so each call lands in its timestep group as it happens
    schedule = runner.timesteps()
    gmap = timestep_groups([DenoiserCall((), {}, float(t), 0) for t in schedule], n_groups) if schedule else None

    def on_call(c: DenoiserCall):
        progress.tick()
        state["group"] = nearest_group(gmap, c.timestep) if gmap else 0

    t0 = time.time()
    try:
        calls, fp_images = capture_calls(runner, prompts, seeds, on_call=on_call)
    finally:
        for h in handles:
            h.remove()
    seconds = time.time() - t0
    groups = gmap or timestep_groups(calls, 1)
    act_elements = {n: o.elements for n, o in observers.items()}
    return Calibration(calls, observers, groups, max(groups.values()) + 1, prompts, seeds, runner.settings(),
                       fp_images, range_method, act_elements, runner.timestep_of, seconds)


def collect_act_ranges(model: nn.Module, run: Callable[[], None], names=None) -> dict[str, ActRange]:
    """Plain min-max input ranges of each quantizable layer while `run()` drives `model` (no sampler needed)."""
    observers, handles = {}, []
    for name, m in model.named_modules():
        kind = quantizable(m)
        if kind is None or (names is not None and name not in names):
            continue
        obs = observers[name] = RangeObserver(1, 1 if kind == "conv2d" else -1)
        handles.append(m.register_forward_pre_hook(lambda mod, args, o=obs: o.update(args[0])))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: o.result(split=False) for n, o in observers.items() if o.calls}
