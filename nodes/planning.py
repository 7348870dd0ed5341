"""Plan from an existing calibration: quant/engine.run's sensitivity -> allocation -> report steps, without the
calibration before them (the Calibrate node ran it) and without quantizing after them (the Quantize node does).

engine.run does these steps inline; `plan_from_calibration` below composes the same public pieces of quant/ in the
same order. (Proposed to the lead to move into quant/engine.py and have `run` call it; then this module becomes an
import.) Nothing here touches ComfyUI.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..quant import engine
from ..quant.calibration import Calibration
from ..quant.errors import MixQuantError
from ..quant.fileformat import fingerprint
from ..quant.formats import LayerFormat
from ..quant.layers import set_act_group
from ..quant.roles import discover_layers
from ..quant.runner import DenoiserRunner, Progress
from ..quant.sensitivity import content_ssim, measure_sensitivity


@dataclass
class PlanResult:
    """What a plan carries from the Plan node to Quantize / KSampler / Report."""
    plan: dict  # layer name -> LayerFormat (float entries included)
    ranges: dict  # layer name -> ActRange (static activations)
    bos: dict  # layer name -> BOS embedding (to_k / to_v computed in FP for token 0)
    group_bounds: list  # lowest timestep of each activation group (noisiest first); [] or one entry: no switching
    base_fingerprint: dict
    report: dict
    config: dict = field(default_factory=dict)

    def quantized_names(self) -> list[str]:
        return [n for n, f in self.plan.items() if not f.is_float]


def plan_from_calibration(runner: DenoiserRunner, calib: Calibration, cfg: engine.QuantizeConfig,
                          progress: Progress | None = None, model_name: str = "",
                          base_fingerprint: dict | None = None) -> PlanResult:
    """Sensitivity (cached on disk) -> MILP allocation with the content/quality coupling sweep -> report. The
    runner's denoiser is swapped only temporarily (every swap is undone)."""
    cfg.check()
    progress = progress or Progress()
    model = runner.denoiser
    t_start = time.time()
    layers = discover_layers(model)
    if not layers:
        raise MixQuantError("this model has no Linear/Conv2d layers MixQuant can quantize.")
    base_fingerprint = base_fingerprint or fingerprint(model)
    if hasattr(engine, "menus"):
        w_menu, a_menu, layers_s = engine.menus(cfg, layers)
    else:
        w_menu = {"content": [LayerFormat(b, 16, cfg.group_size if b < 8 else None) for b in cfg.w_bits_content],
                  "quality": [LayerFormat(b, 16, cfg.group_size if b < 8 else None) for b in cfg.w_bits_quality]}
        a_menu = [LayerFormat(16, cfg.a_bits)] if cfg.a_bits < 16 else []
        layers_s = layers
        if cfg.target == "comfyui-native":
            w_menu = {r: [LayerFormat(8, 16), LayerFormat(4, 16, 64)] for r in ("content", "quality")}
            a_menu = [LayerFormat(16, 8, None, "dynamic")]
            layers_s = [li for li in layers if li.kind == "linear"]
    sens = measure_sensitivity(runner, calib, layers_s, w_menu, a_menu, base_fingerprint["id"], cfg.sens_calls,
                               cfg.sens_prompts, cfg.bos, cfg.cache_dir, progress,
                               **({"mode": cfg.sens_mode} if hasattr(cfg, "sens_mode") else {}))
    t0 = time.time()
    problem = (getattr(engine, "problem", None) or engine._problem)(layers, cfg, calib, sens, model)
    engine.check_budget(problem, cfg, layers)
    ranges = calib.ranges()
    bos = calib.bos() if cfg.bos else {}
    n_eval = min(cfg.sens_prompts, len(calib.prompts))
    ev_prompts, ev_seeds = calib.prompts[:n_eval], calib.seeds[:n_eval]
    coupling = list(cfg.coupling)
    progress.start(len(coupling) + 1, "allocating bits")
    candidates, seen = [], {}
    with torch.no_grad():
        ref = calib.fp_images[:n_eval] if calib.fp_images is not None and len(calib.fp_images) >= n_eval \
            else runner.sample(ev_prompts, ev_seeds)
        progress.tick()
        switch = model.register_forward_pre_hook(
            lambda mod, args, kwargs: set_act_group(mod, calib.group_of(float(runner.timestep_of(args, kwargs)))),
            with_kwargs=True) if calib.n_groups > 1 else None
        try:
            for lam in coupling:
                plan = problem.solve(sens, lam)
                key = tuple(sorted((k, v.name) for k, v in plan.items()))
                if key not in seen:  # the same plan from two ratios is evaluated once
                    if len(seen) == 0 and len(coupling) == 1:
                        seen[key] = float("nan")  # one candidate: nothing to choose, no sampling
                    else:
                        with engine._Swap(model, plan, ranges, bos):
                            seen[key] = content_ssim(ref, runner.sample(ev_prompts, ev_seeds))
                candidates.append({"content_weight": lam, "ssim_vs_fp": seen[key], "plan": plan,
                                   **engine.plan_stats(layers, plan, calib.act_elements)})
                progress.tick()
        finally:
            if switch is not None:
                switch.remove()
    best = max(candidates, key=lambda c: (-1.0 if math.isnan(c["ssim_vs_fp"]) else c["ssim_vs_fp"],
                                          -c["content_weight"]))
    plan, lam = best["plan"], best["content_weight"]
    curve = engine.quality_size_curve(problem, sens, lam, layers, calib.act_elements)
    t_alloc = time.time() - t0
    progress.check()
    report = engine.build_report(model_name, cfg, layers, plan, model, model, calib, sens, problem, candidates, lam,
                                 curve, {"sensitivity": sens.seconds if not sens.cached else 0.0,
                                         "allocate": t_alloc, "total": time.time() - t_start})
    st = engine.plan_stats(layers, plan, calib.act_elements)
    report["bytes_quantized"] = int(problem.fixed_bytes + st["weight_bytes"])  # predicted; Quantize measures it
    report["bytes_quantized_predicted"] = True
    bounds = calib.group_bounds() if calib.n_groups > 1 else []
    return PlanResult(plan, ranges, {k: v for k, v in bos.items() if not plan.get(k, LayerFormat(16, 16)).is_float},
                      bounds, base_fingerprint, report,
                      {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()})
