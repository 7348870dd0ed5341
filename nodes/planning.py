"""Plan from an existing calibration: quant/engine.run's sensitivity -> allocation -> report steps, without the
calibration before them (the Calibrate node ran it) and without quantizing after them (the Quantize node does).
The allocation itself (MILP + coupling sweep) is engine.allocate, the same function engine.run calls. Nothing here
touches ComfyUI.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..quant import engine
from ..quant.calibration import Calibration
from ..quant.errors import MixQuantError
from ..quant.fileformat import fingerprint
from ..quant.formats import LayerFormat
from ..quant.roles import discover_layers
from ..quant.runner import DenoiserRunner, Progress
from ..quant.sensitivity import measure_sensitivity


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
    search: str = "auto"  # the weight range search to quantize with (quantize_weight's)

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
    w_menu, a_menu, layers_s = engine.menus(cfg, layers)
    sens = measure_sensitivity(runner, calib, layers_s, w_menu, a_menu, base_fingerprint["id"], cfg.sens_calls,
                               cfg.sens_prompts, engine.use_bos(cfg), cfg.cache_dir, progress, mode=cfg.sens_mode,
                               search=engine.measure_search(cfg))
    n_eval = min(cfg.sens_prompts, len(calib.prompts))
    ref = calib.fp_images[:n_eval] if calib.fp_images is not None and len(calib.fp_images) >= n_eval else None
    alloc = engine.allocate(runner, calib, sens, cfg, layers, progress, ref=ref)
    plan = alloc.plan
    progress.check()
    report = engine.build_report(model_name, cfg, layers, plan, model, model, calib, sens, alloc.problem,
                                 alloc.candidates, alloc.content_weight, alloc.curve,
                                 {"sensitivity": sens.seconds if not sens.cached else 0.0,
                                  "allocate": alloc.seconds, "total": time.time() - t_start}, alloc.search)
    st = engine.plan_stats(layers, plan, calib.act_elements)
    report["bytes_quantized"] = int(alloc.problem.fixed_bytes + st["weight_bytes"])  # predicted; Quantize measures it
    report["bytes_quantized_predicted"] = True
    bounds = calib.group_bounds() if calib.n_groups > 1 else []
    bos = calib.bos() if engine.use_bos(cfg) else {}
    return PlanResult(plan, calib.ranges(),
                      {k: v for k, v in bos.items() if not plan.get(k, LayerFormat(16, 16)).is_float},
                      bounds, base_fingerprint, report,
                      {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, alloc.search)
