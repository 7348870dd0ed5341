"""The diffusers side of quant/'s DenoiserRunner: drives a StableDiffusion(XL)Pipeline with the user's sampler
settings so that quant/ can record, probe and compare its UNet without knowing diffusers."""
from __future__ import annotations

import copy
import torch

from ...quant.runner import DenoiserRunner, SamplerSettings
from .files import diffusers_timestep


class PipelineRunner(DenoiserRunner):
    def __init__(self, pipe, settings: SamplerSettings):
        from .models import set_scheduler

        settings.check()
        self.pipe, self.s = pipe, settings
        set_scheduler(pipe, settings.scheduler)
        self.denoiser = pipe.unet
        self.max_batch = settings.batch_size  # sample() never splits a batch of this size

    def settings(self) -> dict:
        return self.s.trajectory()

    @torch.no_grad()
    def sample(self, prompts, seeds):
        out = []
        self.pipe.unet = self.denoiser
        for i in range(0, len(prompts), self.s.batch_size):
            ps, ss = prompts[i:i + self.s.batch_size], seeds[i:i + self.s.batch_size]
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
            neg = [self.s.negative_prompt] * len(ps) if self.s.guidance > 1 else None
            imgs = self.pipe(list(ps), negative_prompt=neg, num_inference_steps=self.s.steps,
                             guidance_scale=self.s.guidance, width=self.s.width, height=self.s.height,
                             generator=gens, output_type="pt").images
            out.append(imgs.float().cpu())
        return torch.cat(out)

    def timestep_of(self, args, kwargs) -> float:
        return diffusers_timestep(args, kwargs)

    def output_of(self, out):
        return out.sample if hasattr(out, "sample") else out[0]

    def context_of(self, args, kwargs):
        return kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)

    def timesteps(self):
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(self.s.steps)
        return [float(t) for t in sched.timesteps]

    def expected_calls(self, n_prompts: int) -> int:
        return self.s.steps * -(-n_prompts // self.s.batch_size)
