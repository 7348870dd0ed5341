"""quant/'s DenoiserRunner for ComfyUI: runs the user's sampler through ComfyUI's own sampling code
(comfy.sample.sample, as the stock KSampler does) so that quant/ can record, probe and compare the diffusion model.
ComfyUI is imported inside the methods only."""
from __future__ import annotations

import bisect
import hashlib
import torch

from ..quant.errors import MixQuantError
from ..quant.runner import DenoiserRunner, SamplerSettings


def _tensors_id(named) -> str:
    """A cheap identity of (name, tensor) pairs: names, shapes and a strided sample of each float tensor."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(f"{float(flat[::step][:64].float().abs().sum()):.4e}".encode())
    return h.hexdigest()[:16]


def _module_id(m: torch.nn.Module) -> str:
    """A cheap identity of a text encoder's weights."""
    return _tensors_id(m.state_dict().items())


def interrupted() -> bool:
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    return mm.processing_interrupted()


def conditioning_id(cond) -> str:
    """A cheap identity of a CONDITIONING ([[tensor, {..., "pooled_output": tensor}], ...]): every tensor in it."""
    named = []
    for i, item in enumerate(cond or []):
        named.append((str(i), item[0]))
        extra = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
        named += [(f"{i}.{k}", extra[k]) for k in sorted(extra) if isinstance(extra[k], torch.Tensor)]
    return _tensors_id(named)


def zeroed(cond):
    """ComfyUI's ConditioningZeroOut: the same conditioning with every tensor zero (a negative for a model with no
    negative prompt of its own)."""
    out = []
    for t, d in cond:
        d = dict(d)
        if isinstance(d.get("pooled_output"), torch.Tensor):
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(t), d])
    return out


class ComfyRunner(DenoiserRunner):
    """`model` is the FP MODEL (ModelPatcher), `clip` a CLIP (encodes the prompts), `vae` an optional VAE. Without a
    VAE, images for the content metric come from ComfyUI's latent-to-RGB preview factors (cheap and monotone in the
    image). Instead of a CLIP: `conditioning` (a CONDITIONING from any node: a text encoder loaded elsewhere, an
    img2img or edit workflow), used for every prompt (then labels of seeds), with `negative_conditioning` (default:
    the conditioning zeroed, as ConditioningZeroOut makes it)."""

    def __init__(self, model, clip, settings: SamplerSettings, vae=None, conditioning=None,
                 negative_conditioning=None):
        settings.check()
        if settings.width is None or settings.height is None or not settings.sampler_name:
            raise MixQuantError("give the sampler name, width and height of the ComfyUI sampler.")
        if clip is None and conditioning is None:
            raise MixQuantError("connect a CLIP (from the checkpoint loader) to encode your prompts, or a "
                                "CONDITIONING to calibrate on.")
        if conditioning is not None and not (isinstance(conditioning, list) and conditioning
                                             and isinstance(conditioning[0][0], torch.Tensor)):
            raise MixQuantError("the conditioning input is not a CONDITIONING: connect the output of a text encode "
                                "(or any conditioning) node.")
        dims = getattr(getattr(model.model, "latent_format", None), "latent_dimensions", 2)
        if dims != 2:
            kind = {1: "an audio", 3: "a video"}.get(dims, f"a {dims}-D latent")
            raise MixQuantError(f"this is {kind} model ({type(model.model).__name__}); MixQuant quantizes text-to-image "
                                "models (2-D image latents) today: SD1.x, SD2.x, SDXL, Flux and SD3.")
        self.model, self.clip, self.vae, self.s = model, clip, vae, settings
        self.conditioning, self.negative_conditioning = conditioning, negative_conditioning
        self.denoiser = model.model.diffusion_model
        self._conds: dict[str, object] = {}
        self._schedule: list[float] | None = None
        self._clip_id: str | None = None

    # --- what quant/ asks -------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        d = self.s.trajectory()
        d["clip"] = self.clip_id()
        d["vae"] = type(self.vae).__name__ if self.vae is not None else "latent-rgb"
        patches = getattr(self.model, "patches", {})
        if patches:  # a LoRA on the FP model changes the trajectory
            d["patches"] = str(getattr(self.model, "patches_uuid", len(patches)))
        return d

    def clip_id(self) -> str:
        if self._clip_id is None and self.conditioning is not None:
            neg = self.negative_conditioning
            self._clip_id = "conditioning:" + conditioning_id(self.conditioning) + (
                ":" + conditioning_id(neg) if neg is not None else "")
        if self._clip_id is None:
            m = getattr(self.clip, "cond_stage_model", None)
            self._clip_id = _module_id(m) if isinstance(m, torch.nn.Module) else type(self.clip).__name__
        return self._clip_id

    def timesteps(self) -> list[float]:
        """The diffusion-model timesteps of the schedule, as the model sees them (model_sampling.timestep(sigma))."""
        if self._schedule is None:
            import comfy.samplers

            ks = comfy.samplers.KSampler(self.model, steps=self.s.steps, device=self.model.load_device,
                                         sampler=self.s.sampler_name, scheduler=self.s.scheduler, denoise=1.0,
                                         model_options=self.model.model_options)
            ms = self.model.get_model_object("model_sampling")
            ts = ms.timestep(ks.sigmas[:-1])
            self._schedule = sorted({float(t) for t in ts.reshape(-1).cpu()})
        return sorted(self._schedule, reverse=True)

    def timestep_of(self, args, kwargs) -> float:
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        if t is None:
            raise MixQuantError("the diffusion model was called without a timestep")
        t = float(torch.as_tensor(t).reshape(-1)[0])
        sched = self._schedule
        if sched:  # snap to the schedule: extra evaluations between steps (Heun, DPM2) join their neighbour's group
            i = bisect.bisect_left(sched, t)
            near = [sched[j] for j in (i - 1, i) if 0 <= j < len(sched)]
            t = min(near, key=lambda v: abs(v - t))
        return t

    def output_of(self, out):
        return out if isinstance(out, torch.Tensor) else out[0]

    def context_of(self, args, kwargs):
        return kwargs.get("context")

    def expected_calls(self, n_prompts: int) -> int:
        return self.s.steps * n_prompts

    # --- sampling -------------------------------------------------------------------------------------------------
    def _encode(self, text: str):
        if self.conditioning is not None:  # (the prompts are labels of the seeds)
            return self.conditioning
        if text not in self._conds:
            tokens = self.clip.tokenize(text)
            self._conds[text] = self.clip.encode_from_tokens_scheduled(tokens)
        return self._conds[text]

    def _to_images(self, samples: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            img = self.vae.decode(samples)  # [B, H, W, C] in 0..1
            if img.dim() == 5:  # video VAEs: [B, T, H, W, C]
                img = img.reshape(-1, *img.shape[-3:])
            return img.permute(0, 3, 1, 2).float().cpu().clamp(0, 1)
        fmt = self.model.model.latent_format
        x = fmt.process_in(samples.float())
        factors = getattr(fmt, "latent_rgb_factors", None)
        if factors is not None and len(factors) == x.shape[1]:
            f = torch.tensor(factors, dtype=x.dtype, device=x.device)
            rgb = torch.einsum("bchw,cr->brhw", x, f)
            bias = getattr(fmt, "latent_rgb_factors_bias", None)
            if bias is not None:
                rgb = rgb + torch.tensor(bias, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            return ((rgb + 1) / 2).clamp(0, 1).cpu()
        return torch.sigmoid(x[:, :3]).cpu()

    def sample_latents(self, model, prompts, seeds, callback=None) -> torch.Tensor:
        """Sample with `model` (a MODEL; the FP one or a quantized clone) through comfy.sample.sample."""
        import comfy.model_management as mm
        import comfy.sample

        out = []
        if self.conditioning is not None:
            neg = self.negative_conditioning if self.negative_conditioning is not None else zeroed(self.conditioning)
        else:
            neg = self._encode(self.s.negative_prompt)
        channels = getattr(model.model.latent_format, "latent_channels", 4)
        for prompt, seed in zip(prompts, seeds):
            mm.throw_exception_if_processing_interrupted()
            latent = torch.zeros([1, channels, self.s.height // 8, self.s.width // 8], device="cpu")
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = comfy.sample.prepare_noise(latent, int(seed))

            def cb(step, x0, x, total, _cb=callback):
                mm.throw_exception_if_processing_interrupted()
                if _cb is not None:
                    _cb(step, total)

            samples = comfy.sample.sample(model, noise, self.s.steps, self.s.guidance, self.s.sampler_name,
                                          self.s.scheduler, self._encode(prompt), neg, latent, denoise=1.0,
                                          callback=cb, disable_pbar=True, seed=int(seed))
            out.append(samples)
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, prompts, seeds):
        self.timesteps()  # the schedule first: timestep_of snaps to it
        return self._to_images(self.sample_latents(self.model, list(prompts), list(seeds)))

    def load(self):
        """Load the FP MODEL as ComfyUI would for sampling, so its diffusion model is the one quant/ sees."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.model])
        self.denoiser = self.model.model.diffusion_model
