"""The one interface through which quant/ sees a sampler: a DenoiserRunner.

quant/ never imports diffusers or ComfyUI. An adapter (app/ for diffusers, nodes/ for ComfyUI) subclasses
DenoiserRunner: it owns the text encoder, scheduler, VAE and the user's sampler settings, and drives `denoiser`.
quant/ then records what the denoiser sees (forward hooks), swaps layers in it, and asks for images.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .errors import InterruptedRun, MixQuantError


@dataclass
class SamplerSettings:
    """The user's sampler settings, as every runner takes them (each reads the fields its sampler has)."""
    steps: int = 8
    guidance: float = 4.0  # classifier-free guidance scale (ComfyUI's cfg)
    # diffusers: the scheduler class, which is the sampler (ddim | dpm | euler; auto: dpm, or a flow-matching model's
    # own Euler); ComfyUI: its scheduler (normal, karras, ...), with the sampler in `sampler_name` (euler, dpmpp_2m, ...)
    scheduler: str = "auto"
    sampler_name: str = ""
    width: int | None = None  # None: the model's native size
    height: int | None = None
    negative_prompt: str = ""
    batch_size: int = 64  # diffusers: the most prompts in one pipeline call

    def check(self):
        if self.steps < 1:
            raise MixQuantError("steps must be at least 1")
        if self.guidance < 0:
            raise MixQuantError("guidance must be >= 0")
        for v in (self.width, self.height):
            if v is not None and (v < 8 or v % 8):
                raise MixQuantError("width and height must be multiples of 8 (at least 8)")
        if self.batch_size < 1:
            raise MixQuantError("the batch size must be at least 1")

    def trajectory(self) -> dict:
        """The settings that change the sampler's trajectory (part of cache keys): all but the batch size, and the
        sampler name where the scheduler is the sampler."""
        d = asdict(self)
        d.pop("batch_size")
        if not d["sampler_name"]:
            d.pop("sampler_name")
        return d


class DenoiserRunner:
    """Subclass and implement `sample` and `timestep_of` (and set `denoiser`); the other methods have defaults that
    are right for a sampler that tells nothing more."""

    denoiser: nn.Module
    # The most prompts `sample` puts through the denoiser in one batch (it never splits a list of this many). quant/
    # batches several probes of one layer into one sampling run only when they fit; 1 = one prompt at a time.
    max_batch: int = 1

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Run the user's sampler (steps, guidance, size, negative prompt...) with `self.denoiser` as it is now, one
        image per (prompt, seed); return decoded images [B, C, H, W] in [0, 1] (float32, CPU)."""
        raise NotImplementedError

    def timestep_of(self, args: tuple, kwargs: dict) -> float:
        """The diffusion timestep (0..1000 scale or sigma, monotone in the step) of one denoiser call."""
        raise NotImplementedError

    def output_of(self, out) -> torch.Tensor:
        """The prediction tensor from whatever the denoiser's forward returns."""
        return out if isinstance(out, torch.Tensor) else out[0]

    def settings(self) -> dict:
        """Everything that changes the sampler's trajectory (part of cache keys)."""
        return {}

    def context_of(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The text conditioning [B, N, D] of a call, when the denoiser has one (BOS analysis)."""
        return None

    def timesteps(self) -> list[float] | None:
        """The timesteps of the schedule (noisiest first) as `timestep_of` reports them, when known before sampling
        (calibration then sorts each call into its timestep group as it happens); None: learnt from the calls."""
        return None

    def expected_calls(self, n_prompts: int) -> int:
        """How many denoiser calls sampling `n_prompts` prompts makes (progress bars); 0 = unknown."""
        return 0

    def load(self) -> None:
        """Make `denoiser` the module sampling runs, where it runs (ComfyUI loads the MODEL to its device first)."""


@dataclass
class DenoiserCall:
    args: tuple
    kwargs: dict
    timestep: float
    step: int  # index of the call in its sampling run (0 = first, noisiest)
    output: torch.Tensor | None = None


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


@dataclass
class Progress:
    """Progress reporting and cooperative interruption for long runs. `callback(done, total, message)`;
    `should_stop()` -> True asks the run to stop at the next safe point."""
    callback: Callable[[int, int, str], None] | None = None
    should_stop: Callable[[], bool] | None = None
    done: int = 0
    total: int = 0
    _phase: str = field(default="")

    def start(self, total: int, phase: str):
        self.done, self.total, self._phase = 0, total, phase
        self.tick(0)

    def tick(self, n: int = 1):
        self.check()
        self.done += n
        if self.callback:
            self.callback(self.done, self.total, self._phase)

    def rename(self, phase: str):
        """Say more about the running phase (e.g. its estimated time) without restarting its count."""
        if phase != self._phase:
            self._phase = phase
            if self.callback:
                self.callback(self.done, self.total, self._phase)

    def check(self):
        if self.should_stop and self.should_stop():
            raise InterruptedRun(f"{self._phase or 'run'} was interrupted; the model is unchanged. Start it again "
                                 "when you are ready.")


def capture_calls(runner: DenoiserRunner, prompts: list[str], seeds: list[int],
                  on_call: Callable[[DenoiserCall], None] | None = None,
                  keep: bool = True) -> tuple[list[DenoiserCall], torch.Tensor]:
    """Run the FP sampler once and record every denoiser call's inputs, timestep and output. `on_call` runs inside
    the call's forward (before the layers run), e.g. to set the timestep group of activation observers. Returns
    (calls, the FP images)."""
    if not prompts:
        raise MixQuantError("the prompt list is empty: give at least one prompt to calibrate on.")
    calls: list[DenoiserCall] = []
    state = {"step": 0}

    def pre(mod, args, kwargs):
        c = DenoiserCall(_detach(args) if keep else (), _detach(kwargs) if keep else {},
                         float(runner.timestep_of(args, kwargs)), state["step"])
        state["step"] += 1
        calls.append(c)
        if on_call:
            on_call(c)

    def post(mod, args, kwargs, out):
        y = runner.output_of(out).detach()
        if not torch.isfinite(y).all():
            raise MixQuantError("the model produced NaN/inf during calibration: check it runs in full precision "
                                "with these settings (dtype, guidance, size) before quantizing.")
        if keep:
            calls[-1].output = y.clone()

    h1 = runner.denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = runner.denoiser.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            images = runner.sample(prompts, seeds)
    finally:
        h1.remove()
        h2.remove()
    if not calls:
        raise MixQuantError("the sampler never called the denoiser: nothing to calibrate on.")
    return calls, images


def timestep_groups(calls: list[DenoiserCall], n_groups: int) -> dict[float, int]:
    """Split the distinct timesteps into `n_groups` contiguous groups (noisiest first)."""
    ts = sorted({c.timestep for c in calls}, reverse=True)
    n = max(1, min(n_groups, len(ts)))
    return {t: min(n - 1, i * n // len(ts)) for i, t in enumerate(ts)}


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
