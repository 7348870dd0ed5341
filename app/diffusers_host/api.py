"""One call for diffusers users: quantize a pipeline's denoiser on your prompts under your budget.

    from mixquant.app.diffusers_host.api import quantize_pipeline
    qpipe, report = quantize_pipeline(pipe, prompts, avg_w_bits=4, a_bits=8)

The input pipeline is not modified: the result shares its text encoder, VAE and scheduler and has a quantized copy
of the denoiser (UNet or diffusion transformer). `report` is the report JSON of architecture.md (per-layer bits,
bytes, quality, timings, curve).
"""
from __future__ import annotations

import dataclasses
import time

from ...quant import engine
from ...quant.errors import MixQuantError
from ...quant.runner import Progress
from .runner import PipelineRunner, SamplerSettings


def pipeline_with_denoiser(pipe, denoiser):
    """A new pipeline object with the same components but another denoiser (UNet or transformer; the input pipeline
    is left as it was)."""
    import inspect

    from .models import denoiser_attr

    comps = dict(pipe.components)
    comps[denoiser_attr(pipe)] = denoiser
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        comps["requires_safety_checker"] = False  # (none is loaded; diffusers would warn on every construction)
    new = type(pipe)(**comps)
    new.set_progress_bar_config(disable=True)
    return new


def quantize_pipeline(pipe, prompts: list[str], *, avg_w_bits: float | None = None, budget_mb: float | None = None,
                      a_bits: int = 8, target: str = "mixquant", sampler: SamplerSettings | None = None,
                      seeds: list[int] | None = None, evaluate: bool = True, model_name: str = "",
                      progress=None, should_stop=None, prepared=None, **config):
    """Calibrate on `prompts` with the sampler settings, allocate bits under the budget, quantize the denoiser.
    `config` takes any other QuantizeConfig field (act_groups, group_size, w_bits_content, cache_dir, ...).
    `prepared` (engine.prepare on the same prompts/settings) skips calibration and sensitivity.
    Returns (pipeline with the quantized UNet, report)."""
    prompts = [p.strip() for p in (prompts or []) if p and p.strip()]  # (a list: a "#" starts no comment here)
    if not prompts:
        raise MixQuantError("the prompt list is empty: give at least one prompt to calibrate on.")
    fields = {f.name for f in dataclasses.fields(engine.QuantizeConfig)}
    unknown = set(config) - fields
    if unknown:
        raise MixQuantError(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = engine.QuantizeConfig(avg_w_bits=avg_w_bits, budget_mb=budget_mb, a_bits=a_bits, target=target, **config)
    sampler = sampler or SamplerSettings()
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise MixQuantError("give one seed per prompt (or none)")
    t0 = time.time()
    runner = PipelineRunner(pipe, sampler)
    qunet, report, calib = engine.run(runner, prompts, cfg, seeds,
                                      Progress(callback=progress, should_stop=should_stop), model_name,
                                      prepared=prepared)
    qpipe = pipeline_with_denoiser(pipe, qunet)
    qpipe._mixquant_act_groups = getattr(qunet, "_mixquant_act_groups", None)
    report["sampler"] = runner.settings()
    if evaluate:
        from .harness import compare_pipelines

        t1 = time.time()
        q = compare_pipelines(pipe, qpipe, prompts, [0], steps=sampler.steps, guidance=sampler.guidance,
                              scheduler=runner.s.scheduler, negative_prompt=sampler.negative_prompt or None,
                              height=sampler.height, width=sampler.width)
        report["quality"].update({k: v for k, v in q.items() if isinstance(v, (int, float)) or v is None})
        report["timings_s"]["evaluate"] = time.time() - t1
    report["timings_s"]["total"] = time.time() - t0
    return qpipe, report
