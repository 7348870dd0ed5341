"""quant/'s one entry point: every host (the CLI and Python API, the ComfyUI nodes, the Gradio app) calls these and
none re-assembles the steps.

    prepared = prepare(runner, prompts, cfg)          # calibrate on the prompts + measure sensitivity (cached on disk)
    prepared.what_if(cfg) / prepared.curve(cfg)       # a budget's predicted size and quality, no sampling (UI)
    alloc = plan(runner, prepared, cfg)               # bits per layer by integer programming under cfg's budget
    qmodel, stats = quantize(runner.denoiser, alloc, prepared.calib)   # a quantized copy
    rep = report(prepared, alloc, cfg, runner.denoiser, qmodel)        # the report JSON of architecture.md
    qmodel, rep, calib = run(runner, prompts, cfg)     # all of the above

Configs are data (QuantizeConfig); the sampler comes in through a DenoiserRunner; nothing here knows diffusers or
ComfyUI. The runner's denoiser is never modified: the result is a quantized copy.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn

from ..kernels import fp8 as fp8_kernels
from . import distributed
from .allocate import Infeasible, Option, solve
from .apply import QuantStats, quantize_, quantized_layer, set_submodule
from .calibration import BALANCE_MODES, Calibration, calibrate
from .errors import MixQuantError
from .fileformat import fingerprint
from .formats import LayerFormat
from .layers import attach_act_group_switch
from .offload import streamed_device
from .roles import LayerInfo, discover_layers, is_transformer
from .runner import DenoiserRunner, Progress
from .sensitivity import MODES as SENS_MODES, Sensitivity, content_ssim, measure_sensitivity
from .sizes import deploy_bytes, fp16_bytes
from .speed import SpeedTable, compare_calls, measure_speed, timing_call

TARGETS = ("mixquant", "comfyui-native")
WEIGHT_SEARCHES = ("best", "mse", "minmax")
SPEEDS = ("auto", "require", "off")
FP8_MODES = ("auto", "on", "off")
SPEED_SLACK = 1.1  # speed "auto" where the target cannot be met: plans at most this much slower than the fastest


@dataclass
class QuantizeConfig:
    avg_w_bits: float | None = None  # budget as the average weight bits over all quantizable layers, or
    budget_mb: float | None = None  # as megabytes (1e6 bytes) of the whole denoiser with its float part in fp16
    a_bits: int = 8  # activations of the quantized layers (8, or 16 = weight-only)
    # quantized activations of Linear layers: "static" (one calibrated range per timestep group; MixDQ), "dynamic"
    # (per-token absmax at run time; ViDiT-Q), "auto": static for UNets, per-token for diffusion transformers (no
    # Conv2d to quantize), whose activations vary too much across tokens and timesteps for one range
    a_mode: str = "auto"
    a16_share: float = 0.05  # share of activation elements that may stay 16-bit (MixDQ kept 3.1%)
    target: str = "mixquant"  # or "comfyui-native": only formats stock ComfyUI runs
    w_bits_content: tuple = (2, 4, 8)
    w_bits_quality: tuple = (4, 8)
    group_size: int = 64  # weights below 8 bits: one scale + zero point per this many inputs
    act_groups: int = 1  # timestep groups with their own activation ranges
    range_method: str = "minmax"
    bos: bool = True
    sens_calls: int = 4
    sens_prompts: int = 8
    # the sensitivity's recorded layer inputs held at once (fast / local: a chunk of layers per pass over the calls);
    # more memory, fewer passes (each pass runs the probe calls once more)
    sens_inputs_mb: float = 1024.0
    # "fast": each layer's output noise weighted by its measured gain to the denoiser output (white probes for quality
    # layers, large-scale ones for content layers; minutes for SDXL); "full": MixDQ's exhaustive decoupled metrics
    # (the reference: one sampler or denoiser run per layer and format); "local": each layer's own output noise
    sens_mode: str = "fast"
    coupling: tuple = (0.2, 0.35, 0.5, 0.65, 0.8)  # share of the loss weight given to content layers
    # weights below 8 bits: "mse" clips each group's range to the least squared weight error, "minmax" keeps the full
    # range, "best" measures with "mse" and then tries the chosen plan with min-max ranges too, keeping whichever
    # images come closer to FP (clipping shrinks the largest weights, a bias that can cost content more than the
    # rounding error it saves)
    weight_search: str = "best"
    # seconds the coupling sweep may spend sampling candidate plans (None: max(60 s, one calibration run)); the
    # couplings are tried from the middle out, each costing about a sampling run of the compared prompts; with time
    # for fewer than two, the middle coupling is taken without sampling. math.inf: the whole sweep
    sweep_seconds: float | None = None
    # speed on the user's device (quant/speed.py measures every layer in every format at the calibrated shapes):
    # "auto": the plan runs at least `min_speed` x the float denoiser's speed where the budget allows it, else within
    # SPEED_SLACK of the fastest the budget allows, and the report says so and names the smallest size at that
    # speed; "require": that speed or an error naming what is feasible; "off": nothing timed (MixDQ's share of
    # 16-bit activations, a16_share, then stands in for speed). With a speed target every layer may also stay float.
    speed: str = "auto"
    min_speed: float = 1.0
    # channel balancing (SmoothQuant / ViDiT-Q) of Linear layers whose input has outlier channels, when activations
    # are quantized: "auto" (where the largest channel is calibration.BALANCE_RATIO x the median), "on" (every
    # Linear), "off"; balance_alpha: how much of the outliers' range moves into the weights
    balance: str = "auto"
    balance_alpha: float = 0.5
    # float8 e4m3 formats (W8A8-fp8 / W8A8d-fp8, W8A16-fp8) in the menu of Linear layers, measured like any other:
    # "auto" where this machine's GPU has fp8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, Blackwell),
    # "on" everywhere (elsewhere they run dequantized: smaller, not faster), "off"
    fp8: str = "auto"
    cache_dir: str | None = None

    def check(self):
        if (self.avg_w_bits is None) == (self.budget_mb is None):
            raise MixQuantError("give exactly one budget: an average weight bit-width or megabytes.")
        if self.target not in TARGETS:
            raise MixQuantError(f"unknown target {self.target!r}: use one of {', '.join(TARGETS)}.")
        if self.weight_search not in WEIGHT_SEARCHES:
            raise MixQuantError(f"unknown weight search {self.weight_search!r}: use one of "
                                f"{', '.join(WEIGHT_SEARCHES)}.")
        if self.a_bits not in (4, 8, 16):
            raise MixQuantError("activation bits must be 4, 8 or 16.")
        if self.sens_mode not in SENS_MODES:
            raise MixQuantError(f"unknown sensitivity mode {self.sens_mode!r}: use one of {', '.join(SENS_MODES)}.")
        if self.avg_w_bits is not None and not (1 <= self.avg_w_bits <= 16):
            raise MixQuantError("the average weight bits must be between 1 and 16.")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise MixQuantError("the budget in MB must be positive.")
        if self.speed not in SPEEDS:
            raise MixQuantError(f"unknown speed mode {self.speed!r}: use one of {', '.join(SPEEDS)}.")
        if not (isinstance(self.min_speed, (int, float)) and 0 < self.min_speed < math.inf):
            raise MixQuantError("the minimum speed must be a positive factor of the float model's speed (1 = no "
                                "slower).")
        if self.a_mode not in ("auto", "static", "dynamic"):
            raise MixQuantError(f"unknown activation mode {self.a_mode!r}: use auto, static or dynamic.")
        if self.balance not in BALANCE_MODES:
            raise MixQuantError(f"unknown balancing mode {self.balance!r}: use one of {', '.join(BALANCE_MODES)}.")
        if not (isinstance(self.balance_alpha, (int, float)) and 0 < self.balance_alpha < 1):
            raise MixQuantError("the balancing strength alpha must be between 0 and 1.")
        if self.fp8 not in FP8_MODES:
            raise MixQuantError(f"unknown fp8 mode {self.fp8!r}: use one of {', '.join(FP8_MODES)}.")
        if not (isinstance(self.sens_inputs_mb, (int, float)) and self.sens_inputs_mb > 0):
            raise MixQuantError("the sensitivity's input memory (MB) must be positive.")
        if self.sweep_seconds is not None and not self.sweep_seconds >= 0:
            raise MixQuantError("the sweep's seconds must be 0 or more (inf: the whole sweep).")


def measure_search(cfg: QuantizeConfig) -> str:
    """The weight range search of the sensitivity probes and the coupling sweep ("auto": MSE-clipped below 8 bits,
    min-max at 8, as quantize_weight does)."""
    return "minmax" if cfg.weight_search == "minmax" else "auto"


def _has_low_bits(plan: dict) -> bool:
    return any(f.w_bits < 8 for f in plan.values())


def use_balance(cfg: QuantizeConfig, layers: list[LayerInfo]) -> str:
    """The balancing mode in effect: none without quantized activations, or for ComfyUI's native format (which has
    no place for it); "auto" balances diffusion transformers' layers (per-token activations: ViDiT-Q's setting) and
    leaves a UNet's static per-tensor ranges as MixDQ has them ("on" balances those too)."""
    if cfg.a_bits >= 16 or cfg.target == "comfyui-native":
        return "off"
    if cfg.balance == "auto" and act_mode(cfg, layers) == "static":
        return "off"
    return cfg.balance


def use_bos(cfg: QuantizeConfig) -> bool:
    """BOS-aware to_k/to_v cannot be expressed in ComfyUI's native format: off for that target."""
    return cfg.bos and cfg.target != "comfyui-native"


def act_mode(cfg: QuantizeConfig, layers: list[LayerInfo]) -> str:
    """The activation mode of the model's quantized Linear layers (QuantizeConfig.a_mode; Conv2d layers are always
    static)."""
    if cfg.a_mode != "auto":
        return cfg.a_mode
    return "dynamic" if is_transformer(layers) else "static"


def use_fp8(cfg: QuantizeConfig) -> bool:
    """Do fp8 formats join the menu (QuantizeConfig.fp8; "auto": this machine's CUDA GPU has fp8 tensor cores, where
    the quantized model runs on a machine with a GPU)? Not with 4-bit activations, nor for ComfyUI's native target
    (whose float8 layers have per-tensor weight scales: kernels/fp8.py's per-channel ones export requantized)."""
    if cfg.target == "comfyui-native" or cfg.a_bits not in (8, 16) or cfg.fp8 == "off" \
            or not fp8_kernels.supported():
        return False
    return cfg.fp8 == "on" or fp8_kernels.scaled_mm_supported("cuda")


def menu(li: LayerInfo, cfg: QuantizeConfig, a_mode: str = "static") -> list[LayerFormat]:
    """The joint formats a layer may take under the target (`a_mode`: act_mode's, for a Linear layer)."""
    if li.protected:
        return [LayerFormat(16, 16)]
    g = cfg.group_size
    if cfg.target == "comfyui-native":  # int8_tensorwise (W8 per-row + dynamic per-token A8), awq_w4a16 (group 64)
        if li.kind != "linear":
            return [LayerFormat(16, 16)]
        return [LayerFormat(8, 8, None, "dynamic"), LayerFormat(4, 16, 64), LayerFormat(16, 16)]
    bits = cfg.w_bits_content if li.role == "content" else cfg.w_bits_quality
    acts = (cfg.a_bits, 16) if cfg.a_bits < 16 else (16,)
    mode = a_mode if li.kind == "linear" else "static"
    out = [LayerFormat(b, a, g if b < 8 else None, mode if a < 16 else "static") for b in bits for a in acts]
    if 8 in bits and use_fp8(cfg):
        out += [f for f in (LayerFormat(8, a, None, mode if a < 16 else "static", fp8=True) for a in acts)
                if f.takes(li.kind)]
    if timed(cfg):  # where no quantized format is as fast as the float layer, the plan may keep it
        out.append(LayerFormat(16, 16))
    return out


def timed(cfg: QuantizeConfig) -> bool:
    """Does this config plan with measured times (a speed target)?"""
    return cfg.speed != "off"


def weight_only(f: LayerFormat) -> LayerFormat:
    return LayerFormat(f.w_bits, 16, f.group_size, fp8=f.w_fp8)


def act_only(f: LayerFormat) -> LayerFormat | None:
    return None if f.a_bits >= 16 else LayerFormat(16, f.a_bits, None, f.a_mode, fp8=f.a_fp8)


def joint_loss(sens: Sensitivity, name: str, f: LayerFormat) -> float:
    """Losses of the weight and activation parts add (independent noise)."""
    table = sens.loss.get(name, {})
    loss = 0.0
    if f.w_bits < 16:
        loss += table[weight_only(f).name]
    a = act_only(f)
    if a is not None:
        loss += table[a.name]
    return loss


@dataclass
class Problem:
    layers: list[LayerInfo]
    options: list[list[LayerFormat]]
    content_norm: float
    quality_norm: float
    fixed_bytes: int
    budget_cost: float
    use_bytes: bool
    a16_limit: float | None
    act_elems: dict = field(default_factory=dict)
    speed: SpeedTable | None = None  # measured times: the plan is held to min_speed x the float denoiser's speed
    min_speed: float = 1.0
    speed_required: bool = False  # False: where the budget cannot meet min_speed, as fast as the budget allows
    shortfall: Infeasible | None = None  # set by solve() at the main budget when min_speed could not be met
    # groups of layers (indices) that take one format together: for ComfyUI's native format, the diffusers layers a
    # stacked native layer joins (Flux / SD3 q, k, v; a single block's linear1), so the joined layer stays native
    ties: list = field(default_factory=list)

    def build(self, sens: Sensitivity, lam: float) -> list[list[Option]]:
        out = []
        for li, fmts in zip(self.layers, self.options):
            opts = []
            for f in fmts:
                loss = 0.0 if li.protected else joint_loss(sens, li.name, f)
                w = lam / self.content_norm if li.role == "content" else (1 - lam) / self.quality_norm
                cost = _cost(li, f, self.use_bytes)
                a16 = float(self.act_elems.get(li.name, 0)) if (f.a_bits == 16 and not li.protected) else 0.0
                t = self.speed.time(li.name, f) if self.speed is not None else 0.0
                opts.append(Option(f, loss * w, float(cost), (a16,) if self.a16_limit is not None else (), t))
            out.append(opts)
        return out

    def solve(self, sens: Sensitivity, lam: float, budget_cost: float | None = None) -> dict[str, LayerFormat]:
        """The plan of least loss at the budget (and the speed target, see QuantizeConfig.speed)."""
        opts = self.build(sens, lam)
        extra = (self.a16_limit,) if self.a16_limit is not None else ()
        budget = self.budget_cost if budget_cost is None else budget_cost
        max_time = None if self.speed is None else self.speed.limit(self.min_speed)
        opts, expand = _tie(opts, self.ties)
        try:
            choice = solve(opts, budget, extra, max_time=max_time)
        except Infeasible as e:
            if max_time is None or e.fastest is None:  # the budget itself cannot be met
                raise
            if budget_cost is None:
                self.shortfall = e
            if self.speed_required:
                raise MixQuantError(self.speed_message(e) + " Lower the minimum speed, raise the budget, or let the "
                                    "speed follow the budget (speed mode auto).") from None
            # within SPEED_SLACK of the fastest plan the budget allows (exactly the fastest leaves the quality no
            # room: on digits at 4 bits, 22 dB SQNR against 29 dB at 10% slower)
            choice = solve(opts, budget, extra, max_time=e.fastest * SPEED_SLACK)
        return {li.name: self.options[i][j] for i, (li, j) in enumerate(zip(self.layers, expand(choice)))}

    def min_feasible(self) -> float:
        return min_cost(self.layers, self.options, self.use_bytes)

    def size_text(self, cost: float) -> str:
        """A cost of the menus in the budget's own unit."""
        if self.use_bytes:
            return f"{(cost + self.fixed_bytes) / 1e6:.1f} MB"
        return f"an average of {cost / max(1, sum(li.params for li in self.layers)):.2f} weight bits"

    def speed_message(self, e: Infeasible) -> str:
        """What the speed target's Infeasible means, in the user's units: the fastest plan within the budget and the
        smallest one at the target speed."""
        sp = self.speed
        fastest = sp.speed_of(e.fastest)
        all_float = sum(_cost(li, LayerFormat(16, 16), self.use_bytes) for li in self.layers)
        what = ("only the float model itself runs that fast here (no layer is faster quantized on this device)"
                if e.smallest_at_speed is not None and e.smallest_at_speed >= all_float * (1 - 1e-9) else
                f"the smallest plan at {self.min_speed:g}x is {self.size_text(e.smallest_at_speed)}"
                if e.smallest_at_speed is not None else
                f"no plan reaches {self.min_speed:g}x here (the fastest any plan runs is "
                f"{sp.speed_of(sum(min(o) for o in self._times())):.2f}x)")
        return (f"At this budget no plan runs at {self.min_speed:g}x the float model's speed on {sp.device}: the "
                f"fastest within the budget runs at {fastest:.2f}x; {what}.")

    def _times(self) -> list[list[float]]:
        return [[self.speed.time(li.name, f) for f in fmts] for li, fmts in zip(self.layers, self.options)]

    def speed_summary(self, plan: dict) -> dict | None:
        """The plan's predicted speed against the float denoiser, the target, and what the budget could not meet."""
        sp = self.speed
        if sp is None:
            return None
        pred = sp.predicted(plan)
        out = {**sp.to_json(), "predicted_ms": pred * 1e3, "predicted_speed": sp.fp_call / max(pred, 1e-12),
               "min_speed": self.min_speed, "met": self.shortfall is None}
        if self.shortfall is not None:
            out["note"] = self.speed_message(self.shortfall)
            out["smallest_at_speed"] = (None if self.shortfall.smallest_at_speed is None
                                        else self.size_text(self.shortfall.smallest_at_speed))
        return out


def _cost(li: LayerInfo, f: LayerFormat, use_bytes: bool) -> float:
    return f.weight_bytes(li.out_features, li.in_features) if use_bytes else f.w_bits * li.params


def min_cost(layers, options, use_bytes: bool) -> float:
    """The cheapest the menus allow (bytes of the quantizable weights, or bits times elements)."""
    return sum(min(_cost(li, f, use_bytes) for f in fmts) for li, fmts in zip(layers, options))


def _budget(layers, cfg: QuantizeConfig, model: nn.Module) -> tuple[bool, int, float]:
    """(budget in bytes?, the bytes that are not a quantizable weight, the budget in the menus' cost unit)."""
    use_bytes = cfg.budget_mb is not None
    fixed = fp16_bytes(model) - sum(2 * li.params for li in layers)
    budget = (cfg.budget_mb * 1e6 - fixed) if use_bytes else cfg.avg_w_bits * sum(li.params for li in layers)
    return use_bytes, fixed, budget


def problem(layers, cfg: QuantizeConfig, calib: Calibration, sens: Sensitivity, model: nn.Module,
            speed: SpeedTable | None = None) -> Problem:
    """The allocation problem for this config's budget and target (menus, exact costs, normalised losses) and, with
    measured times and a speed target, its speed bound."""
    speed = speed if timed(cfg) else None
    mode = act_mode(cfg, layers)
    options = [menu(li, cfg, mode) for li in layers]
    use_bytes, fixed, budget = _budget(layers, cfg, model)
    norms = {}
    for role in ("content", "quality"):
        worst = [max(joint_loss(sens, li.name, f) for f in fmts)
                 for li, fmts in zip(layers, options) if li.role == role and not li.protected]
        norms[role] = max(sum(worst), 1e-12)
    a16 = None
    if cfg.target == "mixquant" and cfg.a_bits < 16 and speed is None:  # (measured times replace this proxy)
        total_elems = sum(calib.act_elements.get(li.name, 0) for li in layers if not li.protected)
        a16 = cfg.a16_share * total_elems
    return Problem(layers, options, norms["content"], norms["quality"], fixed, budget, use_bytes, a16,
                   dict(calib.act_elements), speed, cfg.min_speed, cfg.speed == "require",
                   ties=native_ties(layers, options, model) if cfg.target == "comfyui-native" else [])


def native_ties(layers, options, model: nn.Module) -> list[list[int]]:
    """The layers a stacked layer of ComfyUI's layout joins (quant/dit_names.py: a diffusers Flux / SD3's q, k, v,
    a single block's linear1), as groups of indices into `layers`, where their menus agree."""
    from .dit_names import layout_for

    layout = layout_for(type(model).__name__, dict(getattr(model, "config", None) or {}))
    if layout is None:
        return []
    index = {li.name: i for i, li in enumerate(layers)}
    out = []
    for e in layout.entries:
        group = list(dict.fromkeys(index[p.module] for p in e.pieces if p.module in index))
        if len(group) > 1 and all(options[i] == options[group[0]] for i in group):
            out.append(group)
    return out


def _tie(opts: list, ties: list) -> tuple[list, object]:
    """Options with each tied group as one choice (its members' option j summed), and the map of a choice back to
    one index per layer."""
    if not ties:
        return opts, lambda choice: choice
    lead = {g[0]: g for g in ties}
    member = {i for g in ties for i in g[1:]}
    merged, owners = [], []
    for i, o in enumerate(opts):
        if i in member:
            continue
        g = lead.get(i, [i])
        merged.append([Option(o[j].fmt, sum(opts[k][j].loss for k in g), sum(opts[k][j].cost for k in g),
                              tuple(np.sum([opts[k][j].extra for k in g], axis=0)) if o[j].extra else (),
                              sum(opts[k][j].time for k in g)) for j in range(len(o))])
        owners.append(g)

    def expand(choice):
        out = [0] * len(opts)
        for g, j in zip(owners, choice):
            for k in g:
                out[k] = j
        return out

    return merged, expand


class _Swap:
    """Swap simulate-mode quantized layers into `model` for a trial, and always put the FP layers back."""

    def __init__(self, model, plan, ranges, bos, search: str = "auto"):
        self.model, self.plan, self.ranges, self.bos, self.search = model, plan, ranges, bos, search
        self.saved = {}

    def __enter__(self):
        mods = dict(self.model.named_modules())
        try:
            for name, f in self.plan.items():
                if f.is_float:
                    continue
                src = mods[name]
                q = quantized_layer(src, f, mode="simulate", search=self.search, act_range=self.ranges.get(name),
                                    bos=self.bos.get(name))
                set_submodule(self.model, name, q)
                self.saved[name] = src
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for name, src in self.saved.items():
            set_submodule(self.model, name, src)
        self.saved = {}


def predicted(prob: Problem, sens: Sensitivity, plan: dict) -> dict:
    """Predicted quality of a plan from per-layer losses (noise powers and 1 - SSIM add up)."""
    q_noise = sum(joint_loss(sens, li.name, plan[li.name]) for li in prob.layers
                  if li.role == "quality" and not li.protected)
    c_loss = sum(joint_loss(sens, li.name, plan[li.name]) for li in prob.layers
                 if li.role == "content" and not li.protected)
    return {"sqnr_db": (math.inf if q_noise <= 0 else -10 * math.log10(q_noise)), "ssim": max(0.0, 1.0 - c_loss)}


def _search_name(search: str) -> str:
    return "minmax" if search == "minmax" else "mse"


def plan_stats(layers: list[LayerInfo], plan: dict, act_elems: dict) -> dict:
    params = sum(li.params for li in layers)
    wbits = sum(plan[li.name].w_bits * li.params for li in layers) / max(1, params)
    elems = sum(act_elems.get(li.name, 0) for li in layers)
    abits = (sum(plan[li.name].a_bits * act_elems.get(li.name, 0) for li in layers) / elems) if elems else 16.0
    wbytes = sum(plan[li.name].weight_bytes(li.out_features, li.in_features) for li in layers)
    return {"avg_w_bits": wbits, "avg_a_bits": abits, "weight_bytes": wbytes}


def check_budget(model: nn.Module, cfg: QuantizeConfig, layers=None) -> None:
    """Raise one clear error naming the smallest feasible budget when the configured one cannot be met by the
    menus of `cfg`. Needs no measurement, so it runs before calibrating."""
    layers = discover_layers(model) if layers is None else layers
    use_bytes, fixed, budget = _budget(layers, cfg, model)
    mode = act_mode(cfg, layers)
    cheapest = min_cost(layers, [menu(li, cfg, mode) for li in layers], use_bytes)
    if cheapest <= budget:
        return
    if use_bytes:
        smallest = (cheapest + fixed) / 1e6
        raise MixQuantError(f"a budget of {cfg.budget_mb:g} MB cannot be met: the smallest feasible budget for "
                            f"this model and target is {math.ceil(smallest * 100) / 100:.2f} MB.")
    smallest = cheapest / sum(li.params for li in layers)
    raise MixQuantError(f"an average of {cfg.avg_w_bits:g} weight bits cannot be met: the smallest feasible "
                        f"average for this model and target is {math.ceil(smallest * 100) / 100:.2f} bits "
                        "(protected and unquantizable layers stay 16-bit).")


def quality_size_curve(prob: Problem, sens: Sensitivity, lam: float, layers, act_elems,
                       points=(2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8)) -> list[dict]:
    """The whole quality/size curve from the cached sensitivities: one MILP per budget, no sampling. Budgets are
    average weight bits (bytes budgets are expressed as the same bits of the FP16 weight bytes)."""
    curve = []
    params_total = sum(li.params for li in layers)
    for bits in points:
        cost = bits / 16 * 2 * params_total if prob.use_bytes else bits * params_total
        try:
            p = prob.solve(sens, lam, cost)
        except MixQuantError:
            continue  # infeasible at this size
        st = plan_stats(layers, p, act_elems)
        curve.append({"budget_w_bits": bits, **st, "bytes": st["weight_bytes"] + prob.fixed_bytes,
                      **{f"predicted_{k}": v for k, v in predicted(prob, sens, p).items()}})
    return curve


def menus(cfg: QuantizeConfig, layers: list[LayerInfo]):
    """(weight formats per role, activation formats, layers to measure) of the sensitivity measurement."""
    if cfg.target == "comfyui-native":
        w_menu = {r: [LayerFormat(8, 16), LayerFormat(4, 16, 64)] for r in ("content", "quality")}
        return w_menu, [LayerFormat(16, 8, None, "dynamic")], [li for li in layers if li.kind == "linear"]
    w_menu = {"content": [LayerFormat(b, 16, cfg.group_size if b < 8 else None) for b in cfg.w_bits_content],
              "quality": [LayerFormat(b, 16, cfg.group_size if b < 8 else None) for b in cfg.w_bits_quality]}
    fp8 = use_fp8(cfg)
    if fp8:  # (for the layers that take them: LayerFormat.takes)
        for r in w_menu:
            if any(f.w_bits == 8 for f in w_menu[r]):
                w_menu[r].append(LayerFormat(8, 16, fp8=True))
    if cfg.a_bits >= 16:
        return w_menu, [], layers
    mode = act_mode(cfg, layers)
    a_menu = [LayerFormat(16, cfg.a_bits, None, mode)]
    if mode == "dynamic" and not is_transformer(layers):  # (convs stay static)
        a_menu.append(LayerFormat(16, cfg.a_bits))
    if fp8:
        a_menu.append(LayerFormat(16, 8, None, mode, fp8=True))
    return w_menu, a_menu, layers


@dataclass
class ModelSizes:
    """A denoiser's sizes before anything is measured: what a budget slider needs (bits <-> MB, the feasible
    range). Sizes are bytes with the float part in fp16; a bits budget counts the weights of the quantizable
    layers only."""
    layers: list
    params_total: int  # weight elements of the quantizable layers
    bytes_fp16: int  # the whole denoiser with floats in fp16
    fixed_bytes: int  # the part that is not a quantizable weight
    min_bits: float  # smallest feasible average weight bits (protected layers stay 16-bit)
    min_mb: float  # smallest feasible size

    def mb_of_bits(self, bits: float) -> float:
        """The size at an average of `bits` weight bits (scales and zero points not counted: a lower bound)."""
        return (self.fixed_bytes + bits / 8 * self.params_total) / 1e6

    def bits_of_mb(self, mb: float) -> float:
        return (mb * 1e6 - self.fixed_bytes) * 8 / self.params_total


def model_sizes(model: nn.Module, cfg: QuantizeConfig | None = None) -> ModelSizes:
    """The sizes of `model` and the smallest budget the menus of `cfg` (default: the default config) can meet."""
    layers = discover_layers(model)
    if not layers:
        raise MixQuantError("this model has no Linear/Conv2d layers MixQuant can quantize.")
    cfg = cfg or QuantizeConfig(avg_w_bits=4)
    params_total = sum(li.params for li in layers)
    total = fp16_bytes(model)
    fixed = total - sum(2 * li.params for li in layers)
    mode = act_mode(cfg, layers)
    menus_ = [menu(li, cfg, mode) for li in layers]
    min_bits = min_cost(layers, menus_, False) / params_total
    min_bytes = min_cost(layers, menus_, True)
    return ModelSizes(layers, params_total, total, fixed, min_bits, (min_bytes + fixed) / 1e6)


def middle_coupling(cfg: QuantizeConfig) -> float:
    """The content/quality coupling used for predictions before `plan` has chosen one."""
    return sorted(cfg.coupling)[len(cfg.coupling) // 2]


@dataclass
class Prepared:
    """What calibration and sensitivity measurement produced: reusable for any budget with the same prompts,
    sampler settings and menus (e.g. moving a budget slider)."""
    layers: list
    calib: Calibration
    sens: Sensitivity
    fingerprint_id: str
    key: dict
    timings: dict
    model: nn.Module | None = None  # the FP denoiser it was measured on
    fp_images: torch.Tensor | None = None  # FP images of the first prompts when at hand (plan compares with them)
    speed: SpeedTable | None = None  # every layer's time in every format on this device (configs with a speed target)

    def matches(self, prompts, seeds, settings: dict, cfg: QuantizeConfig) -> bool:
        return self.key == _prepared_key(prompts, seeds, settings, cfg)

    def problem(self, cfg: QuantizeConfig) -> Problem:
        return problem(self.layers, cfg, self.calib, self.sens, self.model, self.speed)

    def what_if(self, cfg: QuantizeConfig, content_weight: float | None = None) -> dict:
        """The plan the integer program picks at cfg's budget (no sampling): its size in MB, average bits and
        predicted quality. Raises MixQuantError when the budget cannot be met."""
        check_budget(self.model, cfg, self.layers)
        prob = self.problem(cfg)
        plan_ = prob.solve(self.sens, middle_coupling(cfg) if content_weight is None else content_weight)
        st = plan_stats(self.layers, plan_, self.calib.act_elements)
        pred = predicted(prob, self.sens, plan_)
        return {"mb": (st["weight_bytes"] + prob.fixed_bytes) / 1e6, "avg_w_bits": st["avg_w_bits"],
                "avg_a_bits": st["avg_a_bits"], "predicted_ssim": pred["ssim"], "predicted_sqnr_db": pred["sqnr_db"],
                "plan": plan_, "speed": prob.speed_summary(plan_)}

    def curve(self, cfg: QuantizeConfig, content_weight: float | None = None) -> list[dict]:
        """The predicted quality/size curve over a sweep of budgets (one MILP each, no sampling)."""
        lam = middle_coupling(cfg) if content_weight is None else content_weight
        return quality_size_curve(self.problem(cfg), self.sens, lam, self.layers, self.calib.act_elements)


def _prepared_key(prompts, seeds, settings, cfg: QuantizeConfig) -> dict:
    fields = ("target", "a_bits", "w_bits_content", "w_bits_quality", "group_size", "act_groups", "range_method",
              "bos", "sens_calls", "sens_prompts", "sens_mode", "weight_search", "balance", "balance_alpha",
              "a_mode", "fp8")
    return {"prompts": list(prompts), "seeds": list(seeds), "settings": settings, "timed": timed(cfg),
            **{f: getattr(cfg, f) for f in fields}}


def prepare(runner: DenoiserRunner, prompts: list[str], cfg: QuantizeConfig, seeds: list[int] | None = None,
            progress: Progress | None = None, *, calibration: Calibration | None = None,
            fingerprint_id: str | None = None) -> Prepared:
    """Calibrate on the prompts and measure (or load from the cache) every layer's sensitivity. `calibration`: one
    already made on the same runner (ComfyUI's Calibrate node), whose prompts, seeds and FP images are then used;
    `fingerprint_id`: the FP model's fingerprint when already known (sensitivity cache key)."""
    progress = progress or Progress()
    model = runner.denoiser
    cfg = for_streamed(model, cfg)
    layers = discover_layers(model)
    if not layers:
        raise MixQuantError("this model has no Linear/Conv2d layers MixQuant can quantize.")
    fp_id = fingerprint_id or fingerprint(model)["id"]
    t0 = time.time()
    fp_images = None
    if calibration is None:
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        calib = calibrate(runner, prompts, seeds, cfg.act_groups, cfg.range_method, progress=progress)
    else:
        calib, prompts, seeds = calibration, calibration.prompts, calibration.seeds
    calib.set_balance(model, use_balance(cfg, layers), cfg.balance_alpha)
    n_eval = min(cfg.sens_prompts, len(calib.prompts))
    if calib.fp_images is not None and len(calib.fp_images) >= n_eval:  # plan compares with these: no FP re-run
        fp_images = calib.fp_images[:n_eval]
    t_cal = time.time() - t0 if calibration is None else 0.0
    w_menu, a_menu, layers_s = menus(cfg, layers)
    sens = measure_sensitivity(runner, calib, layers_s, w_menu, a_menu, fp_id, cfg.sens_calls, cfg.sens_prompts,
                               use_bos(cfg), cfg.cache_dir, progress, mode=cfg.sens_mode,
                               search=measure_search(cfg), inputs_budget=int(cfg.sens_inputs_mb * 2 ** 20))
    speed = time_layers(runner, calib, layers, cfg, progress) if timed(cfg) else None
    return Prepared(layers, calib, sens, fp_id, _prepared_key(prompts, seeds, runner.settings(), cfg),
                    {"calibrate": t_cal, "sensitivity": 0.0 if sens.cached else sens.seconds,
                     **({"speed": speed.seconds} if speed is not None else {})}, model, fp_images, speed)


def time_layers(runner: DenoiserRunner, calib: Calibration, layers: list[LayerInfo], cfg: QuantizeConfig,
                progress: Progress | None = None) -> SpeedTable:
    """Every layer's time in every format of its menu on the runner's device, on a recorded call (quant/speed.py).
    Under several processes the first one measures (the others wait) and every process gets its table, so that all
    of them make the same plan."""
    speed = None
    if distributed.is_main():
        mode = act_mode(cfg, layers)
        speed = measure_speed(runner.denoiser, timing_call(calib.calls), layers,
                              {li.name: menu(li, cfg, mode) for li in layers}, calib.ranges(),
                              calib.bos() if use_bos(cfg) else {}, progress)
    return distributed.broadcast(speed)


@dataclass
class Allocation:
    """A plan: the format of every layer and what quantizing with it needs besides the weights."""
    plan: dict  # layer name -> LayerFormat
    content_weight: float  # the coupling chosen
    search: str  # the weight range search to quantize with (quantize_weight's: "auto" or "minmax")
    candidates: list  # every plan tried: content_weight, weight_search, ssim_vs_fp, plan, stats
    curve: list  # the predicted quality/size curve at the chosen coupling
    problem: Problem
    seconds: float
    ranges: dict = field(default_factory=dict)  # layer -> ActRange: static activation ranges (calibrated)
    bos: dict = field(default_factory=dict)  # quantized to_k/to_v -> BOS embedding computed in full precision
    group_bounds: list = field(default_factory=list)  # lowest timestep of each activation group; [] = one group
    speed: dict | None = None  # Problem.speed_summary of the plan: predicted speed vs float, target, shortfall

    def quantized_names(self) -> list[str]:
        return [n for n, f in self.plan.items() if not f.is_float]


def sweep(cfg: QuantizeConfig, calib: Calibration, n_eval: int, need_reference: bool = False) -> tuple[list, bool]:
    """(the couplings the sweep compares, middle first; whether the chosen plan is retried with min-max ranges) within
    cfg.sweep_seconds, each candidate costing about the calibration's sampling time for n_eval of its prompts."""
    mid = middle_coupling(cfg)
    order = sorted(cfg.coupling, key=lambda c: (abs(c - mid), c))
    retry = cfg.weight_search == "best"
    budget = cfg.sweep_seconds if cfg.sweep_seconds is not None else max(60.0, calib.seconds)
    per_run = calib.seconds * n_eval / max(1, len(calib.prompts))
    wanted = len(order) + retry
    runs = wanted if per_run <= 0 or not math.isfinite(budget) else int(budget / per_run) - need_reference
    if runs < 2 or (len(order) == 1 and not retry):
        return order[:1], False  # nothing affordable to compare: the middle coupling, no sampling
    return order[:min(len(order), runs - retry)], retry


def _best(candidates: list) -> dict:
    # the closest images to FP; ties: the lower content weight, then MSE-searched weights (a single untried
    # candidate has nan)
    return max(candidates, key=lambda c: (-1.0 if math.isnan(c["ssim_vs_fp"]) else c["ssim_vs_fp"],
                                          -c["content_weight"], c["weight_search"] == "mse"))


def plan(runner: DenoiserRunner, prepared: Prepared, cfg: QuantizeConfig,
         progress: Progress | None = None) -> Allocation:
    """Bits per layer (MixDQ §5): the MILP under the budget at each content/quality coupling of `cfg.coupling`, each
    plan's images compared with FP on the first prompts, the closest kept; with weight_search="best" that plan is
    tried once more with min-max weight ranges. The runner's denoiser is only swapped temporarily (every swap is
    undone)."""
    cfg.check()
    progress = progress or Progress()
    layers, calib, sens = prepared.layers, prepared.calib, prepared.sens
    model = runner.denoiser
    t0 = time.time()
    check_budget(model, cfg, layers)
    prob = problem(layers, cfg, calib, sens, model, prepared.speed)
    ranges = calib.ranges()
    bos = calib.bos() if use_bos(cfg) else {}
    n_eval = min(cfg.sens_prompts, len(calib.prompts))
    ev_prompts, ev_seeds = calib.prompts[:n_eval], calib.seeds[:n_eval]
    search = measure_search(cfg)
    ref = prepared.fp_images
    couplings, retry = sweep(cfg, calib, n_eval, need_reference=ref is None)
    single = len(couplings) == 1 and not retry  # nothing to choose between: no sampling
    progress.start(len(couplings) + 1 + retry, "allocating bits")
    candidates, seen = [], {}
    with torch.no_grad():
        if ref is None and not single:
            ref = runner.sample(ev_prompts, ev_seeds)
        progress.tick()
        switch = attach_act_group_switch(model, calib.group_bounds(), runner.timestep_of, remember=False) \
            if calib.n_groups > 1 else None
        try:
            def trial(plan_, how):
                key = (how, tuple(sorted((k, v.name) for k, v in plan_.items())))
                if key not in seen:  # the same plan from two ratios is evaluated once
                    if single:
                        seen[key] = float("nan")
                    else:
                        with _Swap(model, plan_, ranges, bos, how):
                            seen[key] = content_ssim(ref, runner.sample(ev_prompts, ev_seeds))
                return seen[key]

            for lam in couplings:
                plan_ = prob.solve(sens, lam)
                candidates.append({"content_weight": lam, "weight_search": _search_name(search),
                                   "ssim_vs_fp": trial(plan_, search), "plan": plan_,
                                   **plan_stats(layers, plan_, calib.act_elements)})
                progress.tick()
            if retry:
                best = _best(candidates)
                if _has_low_bits(best["plan"]):  # the chosen plan once more, with full weight ranges
                    candidates.append({**best, "weight_search": "minmax", "ssim_vs_fp": trial(best["plan"], "minmax")})
                progress.tick()
        finally:
            if switch is not None:
                switch.remove()
    best = _best(candidates)
    curve = quality_size_curve(prob, sens, best["content_weight"], layers, calib.act_elements)
    chosen = best["plan"]
    quantized = {n for n, f in chosen.items() if not f.is_float}
    return Allocation(chosen, best["content_weight"], "minmax" if best["weight_search"] == "minmax" else "auto",
                      candidates, curve, prob, time.time() - t0,
                      {n: r for n, r in ranges.items() if n in quantized},
                      {n: v for n, v in bos.items() if n in quantized},
                      calib.group_bounds() if calib.n_groups > 1 else [], prob.speed_summary(chosen))


def quantize(model: nn.Module, alloc: Allocation, calib: Calibration, device=None) -> tuple[nn.Module, QuantStats]:
    """A quantized copy of `model` with the plan's packed layers, its activation ranges and BOS embeddings, and the
    per-timestep switch of activation ranges. `model` is left as it was. `device`: built there layer by layer from
    wherever `model` is (a model kept on the CPU quantized into a GPU that could not hold it in float)."""
    return quantize_(model, alloc.plan, calib, bos=bool(alloc.bos), search=alloc.search, inplace=False,
                     device=device)


def run(runner: DenoiserRunner, prompts: list[str], cfg: QuantizeConfig, seeds: list[int] | None = None,
        progress: Progress | None = None, model_name: str = "",
        prepared: Prepared | None = None) -> tuple[nn.Module, dict, Calibration]:
    """Calibrate, measure, allocate, quantize. Returns (quantized copy of the denoiser, report, calibration).
    `prepared` (from `prepare` with the same prompts, seeds, settings and menus) skips the first two steps."""
    cfg.check()
    progress = progress or Progress()
    model = runner.denoiser
    cfg = for_streamed(model, cfg)
    stream_dev = streamed_device(model)
    t_start = time.time()
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    reused = prepared is not None and prepared.matches(prompts, seeds, runner.settings(), cfg)
    if not reused:
        check_budget(model, cfg)  # before minutes of calibration, not after
        prepared = prepare(runner, prompts, cfg, seeds, progress)
    # a reused preparation cost nothing in this run
    phase_times = {"calibrate": 0.0, "sensitivity": 0.0} if reused else dict(prepared.timings)
    alloc = plan(runner, prepared, cfg, progress)
    progress.check()
    qmodel, _ = quantize(model, alloc, prepared.calib, device=stream_dev)  # (streamed: layer by layer into it)
    if alloc.speed is not None:  # the plan's speed as measured, against the float denoiser in this process
        alloc.speed.update(measured_speed(model, qmodel, prepared.calib))
    rep = report(prepared, alloc, cfg, model, qmodel, model_name,
                 {**phase_times, "allocate": alloc.seconds, "total": time.time() - t_start})
    rep["sensitivity_cached"] = prepared.sens.cached or reused
    if stream_dev is not None:
        rep["streamed"] = {"device": str(stream_dev), "sensitivity_mode": cfg.sens_mode}
    return qmodel, rep, prepared.calib


def for_streamed(model: nn.Module, cfg: QuantizeConfig) -> QuantizeConfig:
    """The settings a model streamed through its device (quant/offload.py) runs with: nothing timed (a layer's time
    there is mostly its weights' copy); the sensitivity as asked (the fast one's backward recomputes the model block
    by block: offload.recomputed). `cfg` itself for any other model."""
    if streamed_device(model) is None or cfg.speed == "off":
        return cfg
    return replace(cfg, speed="off")


def measured_speed(model: nn.Module, qmodel: nn.Module, calib: Calibration) -> dict:
    """One denoiser call of the float and the quantized model, timed in interleaved rounds on the call the speeds
    were measured on."""
    t = compare_calls({"fp": model, "q": qmodel}, timing_call(calib.calls))
    return {"measured_fp_ms": t["fp"] * 1e3, "measured_ms": t["q"] * 1e3, "measured_speed": t["fp"] / t["q"]}


def report(prepared: Prepared, alloc: Allocation, cfg: QuantizeConfig, model: nn.Module,
           qmodel: nn.Module | None = None, model_name: str = "", timings: dict | None = None) -> dict:
    """The report JSON (architecture.md) of a plan: per-layer formats, bytes and sensitivities, averages, sizes,
    predicted quality, the coupling candidates and the curve. Without `qmodel` (planned, not yet quantized) the
    quantized size is the plan's predicted one (`bytes_quantized_predicted`)."""
    layers, calib, sens, plan_ = prepared.layers, prepared.calib, prepared.sens, alloc.plan
    st = plan_stats(layers, plan_, calib.act_elements)
    out_layers = []
    sp = prepared.speed if alloc.speed is not None else None
    for li in layers:
        f = plan_[li.name]
        times = {} if sp is None else {"time_ms": sp.time(li.name, f) * 1e3, "fp_time_ms": sp.layer_fp[li.name] * 1e3}
        out_layers.append({"name": li.name, "role": li.role, "kind": li.kind, "w_bits": f.w_bits, "a_bits": f.a_bits,
                           "format": f.name, "params": li.params, "protected": li.protected, **times,
                           "bytes": f.weight_bytes(li.out_features, li.in_features),
                           **({"sensitivity": {k: sens.metric(li.name, k) for k in sens.loss.get(li.name, {})}}
                              if li.name in sens.loss else {})})
    pred = predicted(alloc.problem, sens, plan_)
    out = {
        "model": model_name, "method": "mixdq-milp", "target": cfg.target,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "layers": out_layers,
        "avg_w_bits": st["avg_w_bits"], "avg_a_bits": st["avg_a_bits"],
        "bytes_fp16": fp16_bytes(model),
        "bytes_quantized": (deploy_bytes(qmodel) if qmodel is not None
                            else int(alloc.problem.fixed_bytes + st["weight_bytes"])),
        "quality": {"predicted_sqnr_db": pred["sqnr_db"], "predicted_ssim": pred["ssim"]},
        "timings_s": dict(timings or {}),
        "sensitivity_cached": sens.cached,
        "sensitivity_mode": cfg.sens_mode,
        "weight_search": _search_name(alloc.search),
        "coupling": {"chosen_content_weight": alloc.content_weight,
                     "candidates": [{k: v for k, v in c.items() if k != "plan"} for c in alloc.candidates]},
        "curve": alloc.curve,
        "speed": alloc.speed,
        "bos_layers": sorted(calib.bos()) if use_bos(cfg) else [],
        "split_layers": sorted(n for n, r in calib.ranges().items() if r.split is not None
                               and plan_.get(n, LayerFormat(16, 16)).a_bits < 16),
        "balanced_layers": sorted(n for n in calib.balance if not plan_.get(n, LayerFormat(16, 16)).is_float),
        "act_groups": calib.n_groups,
        "prompts": len(calib.prompts),
    }
    if qmodel is None:
        out["bytes_quantized_predicted"] = True
    return out
