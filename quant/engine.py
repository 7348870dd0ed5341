"""The whole method in one call: calibrate on the prompts -> measure sensitivity (cached) -> allocate bits by
integer programming under the budget (with MixDQ's content/quality coupling sweep) -> quantize -> report.

Configs are data (QuantizeConfig); the sampler comes in through a DenoiserRunner; nothing here knows diffusers or
ComfyUI. The runner's denoiser is never modified: the result is a quantized copy.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .allocate import Option, solve
from .apply import quantize_model
from .calibration import Calibration, calibrate
from .errors import MixQuantError
from .fileformat import fingerprint
from .formats import LayerFormat
from .layers import QuantConv2d, QuantLinear, attach_act_group_switch, set_act_group
from .roles import LayerInfo, discover_layers
from .runner import DenoiserRunner, Progress
from .sensitivity import Sensitivity, content_ssim, measure_sensitivity

TARGETS = ("mixquant", "comfyui-native")
WEIGHT_SEARCHES = ("best", "mse", "minmax")
_RANGE_BUFFERS = ("input_scale", "input_zero", "bos_in", "bos_out")


@dataclass
class QuantizeConfig:
    avg_w_bits: float | None = None  # budget as the average weight bits over all quantizable layers, or
    budget_mb: float | None = None  # as megabytes (1e6 bytes) of the whole denoiser with its float part in fp16
    a_bits: int = 8  # activations of the quantized layers (8, or 16 = weight-only)
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
    sens_mode: str = "full"  # "full": MixDQ's decoupled metrics; "local": layer-output noise (fast, approximate)
    coupling: tuple = (0.2, 0.35, 0.5, 0.65, 0.8)  # share of the loss weight given to content layers
    # weights below 8 bits: "mse" clips each group's range to the least squared weight error, "minmax" keeps the full
    # range, "best" measures with "mse" and then tries the chosen plan with min-max ranges too, keeping whichever
    # images come closer to FP (clipping shrinks the largest weights, a bias that can cost content more than the
    # rounding error it saves)
    weight_search: str = "best"
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
        if self.avg_w_bits is not None and not (1 <= self.avg_w_bits <= 16):
            raise MixQuantError("the average weight bits must be between 1 and 16.")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise MixQuantError("the budget in MB must be positive.")


def measure_search(cfg: QuantizeConfig) -> str:
    """The weight range search of the sensitivity probes and the coupling sweep ("auto": MSE-clipped below 8 bits,
    min-max at 8, as quantize_weight does)."""
    return "minmax" if cfg.weight_search == "minmax" else "auto"


def _has_low_bits(plan: dict) -> bool:
    return any(f.w_bits < 8 for f in plan.values())


def use_bos(cfg: QuantizeConfig) -> bool:
    """BOS-aware to_k/to_v cannot be expressed in ComfyUI's native format: off for that target."""
    return cfg.bos and cfg.target != "comfyui-native"


def menu(li: LayerInfo, cfg: QuantizeConfig) -> list[LayerFormat]:
    """The joint formats a layer may take under the target."""
    if li.protected:
        return [LayerFormat(16, 16)]
    g = cfg.group_size
    if cfg.target == "comfyui-native":  # int8_tensorwise (W8 per-row + dynamic per-token A8), awq_w4a16 (group 64)
        if li.kind != "linear":
            return [LayerFormat(16, 16)]
        return [LayerFormat(8, 8, None, "dynamic"), LayerFormat(4, 16, 64), LayerFormat(16, 16)]
    bits = cfg.w_bits_content if li.role == "content" else cfg.w_bits_quality
    acts = (cfg.a_bits, 16) if cfg.a_bits < 16 else (16,)
    return [LayerFormat(b, a, g if b < 8 else None) for b in bits for a in acts]


def weight_only(f: LayerFormat) -> LayerFormat:
    return LayerFormat(f.w_bits, 16, f.group_size)


def act_only(f: LayerFormat) -> LayerFormat | None:
    return None if f.a_bits >= 16 else LayerFormat(16, f.a_bits, None, f.a_mode)


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


def _fp16_bytes(model: nn.Module) -> int:
    return sum(t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size()
               for t in model.state_dict().values())


def deploy_bytes(model: nn.Module) -> int:
    """Real bytes of the model's tensors as deployed: packed blobs as stored, float weights/biases in fp16,
    activation ranges and BOS vectors in fp32."""
    total = 0
    for k, t in model.state_dict().items():
        if t.is_floating_point() and not k.endswith(_RANGE_BUFFERS):
            total += t.numel() * 2
        else:
            total += t.numel() * t.element_size()
    return total


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

    def build(self, sens: Sensitivity, lam: float) -> list[list[Option]]:
        out = []
        for li, fmts in zip(self.layers, self.options):
            opts = []
            for f in fmts:
                loss = 0.0 if li.protected else joint_loss(sens, li.name, f)
                w = lam / self.content_norm if li.role == "content" else (1 - lam) / self.quality_norm
                cost = f.weight_bytes(li.out_features, li.in_features) if self.use_bytes else f.w_bits * li.params
                a16 = float(self.act_elems.get(li.name, 0)) if (f.a_bits == 16 and not li.protected) else 0.0
                opts.append(Option(f, loss * w, float(cost), (a16,) if self.a16_limit is not None else ()))
            out.append(opts)
        return out

    def solve(self, sens: Sensitivity, lam: float, budget_cost: float | None = None) -> dict[str, LayerFormat]:
        opts = self.build(sens, lam)
        extra = (self.a16_limit,) if self.a16_limit is not None else ()
        choice = solve(opts, self.budget_cost if budget_cost is None else budget_cost, extra)
        return {li.name: opts[i][j].fmt for i, (li, j) in enumerate(zip(self.layers, choice))}

    def min_feasible(self) -> float:
        fmts_cost = 0.0
        for li, fmts in zip(self.layers, self.options):
            fmts_cost += min(f.weight_bytes(li.out_features, li.in_features) if self.use_bytes
                             else f.w_bits * li.params for f in fmts)
        return fmts_cost


def problem(layers, cfg: QuantizeConfig, calib: Calibration, sens: Sensitivity, model: nn.Module) -> Problem:
    """The allocation problem for this config's budget and target (menus, exact costs, normalised losses)."""
    options = [menu(li, cfg) for li in layers]
    params_total = sum(li.params for li in layers)
    use_bytes = cfg.budget_mb is not None
    fixed = _fp16_bytes(model) - sum(2 * li.params for li in layers)
    budget = (cfg.budget_mb * 1e6 - fixed) if use_bytes else cfg.avg_w_bits * params_total
    norms = {}
    for role in ("content", "quality"):
        worst = [max(joint_loss(sens, li.name, f) for f in fmts)
                 for li, fmts in zip(layers, options) if li.role == role and not li.protected]
        norms[role] = max(sum(worst), 1e-12)
    a16 = None
    if cfg.target == "mixquant" and cfg.a_bits < 16:
        total_elems = sum(calib.act_elements.get(li.name, 0) for li in layers if not li.protected)
        a16 = cfg.a16_share * total_elems
    return Problem(layers, options, norms["content"], norms["quality"], fixed, budget, use_bytes, a16,
                   dict(calib.act_elements))


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
                cls = QuantLinear if isinstance(src, nn.Linear) else QuantConv2d
                q = cls.from_float(src, f, mode="simulate", search=self.search)
                r = self.ranges.get(name)
                if r is not None and f.a_bits < 16 and f.a_mode == "static":
                    q.set_act_range(r.lo, r.hi, r.split)
                if name in self.bos and isinstance(q, QuantLinear):
                    q.set_bos(self.bos[name], src.weight.detach())
                self._set(name, q)
                self.saved[name] = src
        except BaseException:
            self.__exit__()
            raise
        return self

    def _set(self, name, m):
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, attr, m)

    def __exit__(self, *exc):
        for name, src in self.saved.items():
            self._set(name, src)
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


def check_budget(prob: Problem, cfg: QuantizeConfig, layers) -> None:
    """Raise one clear error naming the smallest feasible budget when the configured one cannot be met."""
    min_cost = prob.min_feasible()
    if min_cost <= prob.budget_cost:
        return
    if prob.use_bytes:
        smallest = (min_cost + prob.fixed_bytes) / 1e6
        raise MixQuantError(f"a budget of {cfg.budget_mb:g} MB cannot be met: the smallest feasible budget for "
                            f"this model and target is {math.ceil(smallest * 100) / 100:.2f} MB.")
    smallest = min_cost / sum(li.params for li in layers)
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
    return w_menu, ([LayerFormat(16, cfg.a_bits)] if cfg.a_bits < 16 else []), layers


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

    def matches(self, prompts, seeds, settings: dict, cfg: QuantizeConfig) -> bool:
        return self.key == _prepared_key(prompts, seeds, settings, cfg)


def _prepared_key(prompts, seeds, settings, cfg: QuantizeConfig) -> dict:
    fields = ("target", "a_bits", "w_bits_content", "w_bits_quality", "group_size", "act_groups", "range_method",
              "bos", "sens_calls", "sens_prompts", "sens_mode", "weight_search")
    return {"prompts": list(prompts), "seeds": list(seeds), "settings": settings,
            **{f: getattr(cfg, f) for f in fields}}


def prepare(runner: DenoiserRunner, prompts: list[str], cfg: QuantizeConfig, seeds: list[int] | None = None,
            progress: Progress | None = None) -> Prepared:
    """Calibrate on the prompts and measure (or load from the cache) every layer's sensitivity."""
    progress = progress or Progress()
    model = runner.denoiser
    layers = discover_layers(model)
    if not layers:
        raise MixQuantError("this model has no Linear/Conv2d layers MixQuant can quantize.")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    fp_id = fingerprint(model)["id"]
    t0 = time.time()
    calib = calibrate(runner, prompts, seeds, cfg.act_groups, cfg.range_method, progress=progress)
    t_cal = time.time() - t0
    w_menu, a_menu, layers_s = menus(cfg, layers)
    sens = measure_sensitivity(runner, calib, layers_s, w_menu, a_menu, fp_id, cfg.sens_calls, cfg.sens_prompts,
                               use_bos(cfg), cfg.cache_dir, progress, mode=cfg.sens_mode,
                               search=measure_search(cfg))
    return Prepared(layers, calib, sens, fp_id, _prepared_key(prompts, seeds, runner.settings(), cfg),
                    {"calibrate": t_cal, "sensitivity": 0.0 if sens.cached else sens.seconds})


@dataclass
class Allocation:
    plan: dict  # layer name -> LayerFormat
    content_weight: float  # the coupling chosen
    search: str  # the weight range search to quantize with (quantize_weight's: "auto" or "minmax")
    candidates: list  # every plan tried: content_weight, weight_search, ssim_vs_fp, plan, stats
    curve: list  # the predicted quality/size curve at the chosen coupling
    problem: Problem
    seconds: float


def _best(candidates: list) -> dict:
    # the closest images to FP; ties: the lower content weight, then MSE-searched weights (a single untried
    # candidate has nan)
    return max(candidates, key=lambda c: (-1.0 if math.isnan(c["ssim_vs_fp"]) else c["ssim_vs_fp"],
                                          -c["content_weight"], c["weight_search"] == "mse"))


def allocate(runner: DenoiserRunner, calib: Calibration, sens: Sensitivity, cfg: QuantizeConfig, layers: list,
             progress: Progress | None = None, ref: torch.Tensor | None = None) -> Allocation:
    """Bits per layer (MixDQ §5): the MILP under the budget at each content/quality coupling of `cfg.coupling`, each
    plan's images compared with FP on the first prompts, the closest kept; with weight_search="best" that plan is
    tried once more with min-max weight ranges. `ref`: the FP images of those prompts when already at hand. The
    runner's denoiser is only swapped temporarily (every swap is undone)."""
    progress = progress or Progress()
    model = runner.denoiser
    t0 = time.time()
    prob = problem(layers, cfg, calib, sens, model)
    check_budget(prob, cfg, layers)
    ranges = calib.ranges()
    bos = calib.bos() if use_bos(cfg) else {}
    n_eval = min(cfg.sens_prompts, len(calib.prompts))
    ev_prompts, ev_seeds = calib.prompts[:n_eval], calib.seeds[:n_eval]
    search = measure_search(cfg)
    retry = cfg.weight_search == "best"
    single = len(cfg.coupling) == 1 and not retry  # nothing to choose between: no sampling
    progress.start(len(cfg.coupling) + 1 + retry, "allocating bits")
    candidates, seen = [], {}
    with torch.no_grad():
        if ref is None and not single:
            ref = runner.sample(ev_prompts, ev_seeds)
        progress.tick()
        switch = model.register_forward_pre_hook(
            lambda mod, args, kwargs: set_act_group(mod, calib.group_of(float(runner.timestep_of(args, kwargs)))),
            with_kwargs=True) if calib.n_groups > 1 else None
        try:
            def trial(plan, how):
                key = (how, tuple(sorted((k, v.name) for k, v in plan.items())))
                if key not in seen:  # the same plan from two ratios is evaluated once
                    if single:
                        seen[key] = float("nan")
                    else:
                        with _Swap(model, plan, ranges, bos, how):
                            seen[key] = content_ssim(ref, runner.sample(ev_prompts, ev_seeds))
                return seen[key]

            for lam in cfg.coupling:
                plan = prob.solve(sens, lam)
                candidates.append({"content_weight": lam, "weight_search": _search_name(search),
                                   "ssim_vs_fp": trial(plan, search), "plan": plan,
                                   **plan_stats(layers, plan, calib.act_elements)})
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
    return Allocation(best["plan"], best["content_weight"], "minmax" if best["weight_search"] == "minmax" else "auto",
                      candidates, curve, prob, time.time() - t0)


def run(runner: DenoiserRunner, prompts: list[str], cfg: QuantizeConfig, seeds: list[int] | None = None,
        progress: Progress | None = None, model_name: str = "",
        prepared: Prepared | None = None) -> tuple[nn.Module, dict, Calibration]:
    """Calibrate, measure, allocate, quantize. Returns (quantized copy of the denoiser, report, calibration).
    `prepared` (from `prepare` with the same prompts, seeds, settings and menus) skips the first two steps."""
    cfg.check()
    progress = progress or Progress()
    model = runner.denoiser
    t_start = time.time()
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    reused = prepared is not None and prepared.matches(prompts, seeds, runner.settings(), cfg)
    if not reused:
        prepared = prepare(runner, prompts, cfg, seeds, progress)
    layers, calib, sens = prepared.layers, prepared.calib, prepared.sens
    # a reused preparation cost nothing in this run
    phase_times = {"calibrate": 0.0, "sensitivity": 0.0} if reused else dict(prepared.timings)
    alloc = allocate(runner, calib, sens, cfg, layers, progress)
    plan, lam = alloc.plan, alloc.content_weight
    ranges = calib.ranges()
    bos = calib.bos() if use_bos(cfg) else {}
    progress.check()

    qmodel, stats = quantize_model(model, plan, ranges, bos=bos, search=alloc.search)
    if calib.n_groups > 1:
        attach_act_group_switch(qmodel, calib.group_bounds(), runner.timestep_of)
    report = build_report(model_name, cfg, layers, plan, model, qmodel, calib, sens, alloc.problem,
                          alloc.candidates, lam, alloc.curve,
                          {**phase_times, "allocate": alloc.seconds, "total": time.time() - t_start}, alloc.search)
    report["sensitivity_cached"] = sens.cached or reused
    return qmodel, report, calib


def build_report(model_name, cfg, layers, plan, model, qmodel, calib, sens, prob, candidates, lam, curve,
                 timings, search: str = "auto") -> dict:
    st = plan_stats(layers, plan, calib.act_elements)
    ranges = calib.ranges()
    out_layers = []
    for li in layers:
        f = plan[li.name]
        out_layers.append({"name": li.name, "role": li.role, "kind": li.kind, "w_bits": f.w_bits, "a_bits": f.a_bits,
                           "format": f.name, "params": li.params, "protected": li.protected,
                           "bytes": f.weight_bytes(li.out_features, li.in_features),
                           **({"sensitivity": {k: sens.metric(li.name, k) for k in sens.loss.get(li.name, {})}}
                              if li.name in sens.loss else {})})
    pred = predicted(prob, sens, plan)
    return {
        "model": model_name, "method": "mixdq-milp", "target": cfg.target,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "layers": out_layers,
        "avg_w_bits": st["avg_w_bits"], "avg_a_bits": st["avg_a_bits"],
        "bytes_fp16": _fp16_bytes(model), "bytes_quantized": deploy_bytes(qmodel),
        "quality": {"predicted_sqnr_db": pred["sqnr_db"], "predicted_ssim": pred["ssim"]},
        "timings_s": timings,
        "sensitivity_cached": sens.cached,
        "sensitivity_mode": cfg.sens_mode,
        "weight_search": _search_name(search),
        "coupling": {"chosen_content_weight": lam,
                     "candidates": [{k: v for k, v in c.items() if k != "plan"} for c in candidates]},
        "curve": curve,
        "bos_layers": sorted(calib.bos()) if use_bos(cfg) else [],
        "split_layers": sorted(n for n, r in ranges.items() if r.split is not None
                               and plan.get(n, LayerFormat(16, 16)).a_bits < 16),
        "act_groups": calib.n_groups,
        "prompts": len(calib.prompts),
    }
