"""Plan from an existing calibration (the Calibrate node ran it; the Quantize node quantizes after): quant/engine's
prepare (sensitivity only) -> plan -> report, the same calls `engine.run` makes. Nothing here touches ComfyUI.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..quant import engine
from ..quant.calibration import Calibration
from ..quant.fileformat import fingerprint
from ..quant.runner import DenoiserRunner, Progress


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
    """Sensitivity (cached on disk) -> MILP allocation with the content/quality coupling sweep -> report (with the
    predicted quantized size; Quantize measures it). The runner's denoiser is swapped only temporarily."""
    cfg.check()
    engine.check_budget(runner.denoiser, cfg)  # before minutes of sensitivity measurement, not after (as engine.run)
    t_start = time.time()
    base_fingerprint = base_fingerprint or fingerprint(runner.denoiser)
    prepared = engine.prepare(runner, calib.prompts, cfg, calib.seeds, progress, calibration=calib,
                              fingerprint_id=base_fingerprint["id"])
    alloc = engine.plan(runner, prepared, cfg, progress)
    (progress or Progress()).check()
    report = engine.report(prepared, alloc, cfg, runner.denoiser, model_name=model_name,
                           timings={"sensitivity": prepared.timings["sensitivity"], "allocate": alloc.seconds,
                                    "total": time.time() - t_start})
    return PlanResult(alloc.plan, alloc.ranges, alloc.bos, alloc.group_bounds, base_fingerprint, report,
                      {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, alloc.search)
