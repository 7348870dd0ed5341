"""The diffusers side of quant/'s DenoiserRunner: drives a text-to-image pipeline (StableDiffusion(XL), Flux, SD3)
with the user's sampler settings so that quant/ can record, probe and compare its denoiser (the UNet or the
diffusion transformer) without knowing diffusers."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from ...quant.runner import DenoiserRunner, SamplerSettings
from .files import diffusers_timestep


def native_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels the pipeline samples at by default (a Flux transformer's config has no sample_size:
    the pipeline's default_sample_size says it)."""
    native = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    scale = getattr(pipe, "vae_scale_factor", 8)
    return native * scale, native * scale


class PipelineRunner(DenoiserRunner):
    def __init__(self, pipe, settings: SamplerSettings):
        from .models import denoiser_of, is_flow, resolve_scheduler, set_scheduler

        settings.check()
        # "auto" is resolved here (cache keys and reports name the sampler that ran)
        settings = dataclasses.replace(settings, scheduler=resolve_scheduler(pipe, settings.scheduler))
        self.pipe, self.s = pipe, settings
        set_scheduler(pipe, settings.scheduler)
        self.denoiser = denoiser_of(pipe)
        self.family = type(pipe).__name__
        self.flow = is_flow(pipe)
        self.max_batch = settings.batch_size  # sample() never splits a batch of this size

    def settings(self) -> dict:
        return self.s.trajectory()

    def _call_kwargs(self, n: int) -> dict:
        """The pipeline's own arguments for the user's settings. Flux (distilled guidance): `guidance` goes into the
        guidance embedding and there is one pass per step (no negative prompt, cfg 1); SD and SD3: classifier-free
        guidance with the negative prompt."""
        kw = dict(num_inference_steps=self.s.steps, guidance_scale=self.s.guidance, width=self.s.width,
                  height=self.s.height, output_type="pt")
        if self.family != "FluxPipeline":
            kw["negative_prompt"] = [self.s.negative_prompt] * n if self.s.guidance > 1 else None
        return kw

    @torch.no_grad()
    def sample(self, prompts, seeds):
        from .models import set_denoiser

        out = []
        set_denoiser(self.pipe, self.denoiser)
        for i in range(0, len(prompts), self.s.batch_size):
            ps, ss = prompts[i:i + self.s.batch_size], seeds[i:i + self.s.batch_size]
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
            imgs = self.pipe(list(ps), generator=gens, **self._call_kwargs(len(ps))).images
            out.append(imgs.float().cpu())
        return torch.cat(out)

    def timestep_of(self, args, kwargs) -> float:
        return diffusers_timestep(args, kwargs)

    def output_of(self, out):
        return out.sample if hasattr(out, "sample") else out[0]

    def context_of(self, args, kwargs):
        return kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)

    def _size(self) -> tuple[int, int]:
        h, w = native_size(self.pipe)
        return self.s.height or h, self.s.width or w

    def timesteps(self):
        """The timesteps the denoiser will see, as `timestep_of` reads them (noisiest first), computed the way the
        pipeline computes them (Flux: shifted by the image's token count, and divided by 1000 before the call)."""
        sched = copy.deepcopy(self.pipe.scheduler)
        if not self.flow:
            sched.set_timesteps(self.s.steps)
            return [float(t) for t in sched.timesteps]
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = self._size()
        kw = {}
        if self.family == "FluxPipeline":
            scale = self.pipe.vae_scale_factor
            seq = (int(h) // (scale * 2)) * (int(w) // (scale * 2))
            kw["sigmas"] = np.linspace(1.0, 1 / self.s.steps, self.s.steps)
        else:
            patch = self.pipe.transformer.config.patch_size
            seq = (int(h) // self.pipe.vae_scale_factor // patch) * (int(w) // self.pipe.vae_scale_factor // patch)
        if sched.config.get("use_dynamic_shifting"):
            kw["mu"] = calculate_shift(seq, sched.config.get("base_image_seq_len", 256),
                                       sched.config.get("max_image_seq_len", 4096),
                                       sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
        if "sigmas" in kw:
            sched.set_timesteps(sigmas=kw["sigmas"], mu=kw.get("mu"))
        else:
            sched.set_timesteps(self.s.steps, mu=kw.get("mu"))
        div = 1000.0 if self.family == "FluxPipeline" else 1.0
        return [float(t) / div for t in sched.timesteps]

    def expected_calls(self, n_prompts: int) -> int:
        return self.s.steps * -(-n_prompts // self.s.batch_size)
