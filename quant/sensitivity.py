"""Metric-decoupled sensitivity (MixDQ §4), fast enough for an app.

One layer at a time, weights and activations separately, at each candidate format, everything else in full
precision:
- quality layers: relative noise power of the denoiser output vs FP (SQNR = -10 log10 of it), measured on a
  subsample of the recorded calibration calls: the FP inputs and outputs are reused, nothing is re-sampled;
- content layers: 1 - SSIM of the final decoded images vs FP (window nearly as large as the image), on a subset
  of the prompts, through the user's sampler.
Layers are swapped for simulate-mode quantized layers (no repacking), the swap is always undone, results are
cached on disk keyed by model fingerprint + prompts + settings + menu.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .apply import quantized_layer, set_submodule
from .calibration import Calibration
from .formats import LayerFormat
from .layers import QuantLayer, attach_act_group_switch
from .metrics import ssim
from .roles import LayerInfo
from . import distributed
from .runner import DenoiserRunner, Progress, stable_hash

CACHE_VERSION = 2


def default_cache_dir() -> str:
    base = os.environ.get("MIXQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mixquant")
    return os.path.join(base, "sensitivity")


@dataclass
class Sensitivity:
    """loss[layer][format name]: weight-only formats (A16) and activation-only formats (W16) per layer."""
    loss: dict = field(default_factory=dict)
    role: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    measured: int = 0  # probes this process ran (its share of them when several processes measure)

    def metric(self, layer: str, fmt_name: str) -> float:
        """SQNR (dB) for quality layers, SSIM for content layers, from the stored loss."""
        loss = self.loss[layer][fmt_name]
        if self.role[layer] == "content":
            return 1.0 - loss
        return math.inf if loss <= 0 else -10 * math.log10(loss)

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, "loss": self.loss, "role": self.role, "seconds": self.seconds}


def content_ssim(ref: torch.Tensor, test: torch.Tensor) -> float:
    h, w = ref.shape[-2:]
    win = max(3, (min(h, w) * 7) // 8) | 1  # MixDQ: a window nearly as large as the image
    return ssim(ref, test, window_size=min(win, min(h, w)))


def _select(obj, batch: int, ix: torch.Tensor):
    """Keep the samples `ix` of every tensor whose first dimension is the call's batch (recursively)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, ix) if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_select(o, batch, ix) for o in obj)
    if isinstance(obj, dict):
        return {k: _select(v, batch, ix) for k, v in obj.items()}
    return obj


def subsample_call(c, n: int):
    """At most n samples of a recorded call; with classifier-free guidance the batch is [uncond..., cond...],
    so both halves are kept alike."""
    b = c.output.shape[0]
    if b <= n:
        return c
    keep = list(range(n // 2)) + list(range(b // 2, b // 2 + n - n // 2)) if b % 2 == 0 else list(range(n))
    ix = torch.tensor(keep)
    return type(c)(_select(c.args, b, ix), _select(c.kwargs, b, ix), c.timestep, c.step, c.output.index_select(0, ix))


def _record_inputs(model: nn.Module, calls, names, group_of) -> dict[str, list]:
    """Each layer's FP input (and timestep group) on the probe calls."""
    rec = {n: [] for n in names}
    mods = dict(model.named_modules())
    current = {"group": 0}
    handles = [mods[n].register_forward_pre_hook(
        lambda m, args, n=n: rec[n].append((args[0].detach(), current["group"]))) for n in names]
    try:
        with torch.no_grad():
            for c in calls:
                current["group"] = group_of(c.timestep)
                model(*c.args, **c.kwargs)
    finally:
        for h in handles:
            h.remove()
    return rec


def _input_bytes(model: nn.Module, call, names) -> dict[str, int]:
    """Bytes of each layer's input on one call (one forward; nothing is kept)."""
    size: dict[str, int] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(
        lambda m, args, n=n: size.__setitem__(n, size.get(n, 0) + args[0].numel() * args[0].element_size()))
        for n in names]
    try:
        with torch.no_grad():
            model(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return size


class StreamedInputs:
    """Each layer's FP inputs on the probe calls, recorded a chunk of layers at a time, in the order the layers are
    asked for, so that at most `budget` bytes of recorded inputs are held at once (one pass over the probe calls per
    chunk; a layer whose inputs alone exceed the budget is a chunk of its own). Holding every layer's inputs at once
    would take tens of GB for an SDXL-size UNet at 1024 px."""

    def __init__(self, model: nn.Module, calls, names: list[str], group_of, budget: int):
        self.model, self.calls, self.group_of = model, calls, group_of
        per_call = _input_bytes(model, calls[0], names) if calls and names else {}
        chunks, current, held = [], [], 0
        for n in names:
            need = per_call.get(n, 0) * len(calls)
            if current and held + need > budget:
                chunks.append(current)
                current, held = [], 0
            current.append(n)
            held += need
        if current:
            chunks.append(current)
        self.chunks = chunks
        self.chunk_of = {n: i for i, c in enumerate(chunks) for n in c}
        self.current, self.data, self.passes = None, {}, 0

    def __getitem__(self, name: str):
        i = self.chunk_of[name]
        if i != self.current:
            self.data = {}  # the previous chunk is freed before the next one is recorded
            self.data = _record_inputs(self.model, self.calls, self.chunks[i], self.group_of)
            self.current, self.passes = i, self.passes + 1
        return self.data[name]


def _local_loss(src: nn.Module, probe: QuantLayer, inputs) -> float:
    noise = signal = 0.0
    with torch.no_grad():
        for x, group in inputs:
            probe.act_group = group
            y = src(x).float()
            signal += float((y ** 2).sum())
            noise += float(((probe(x).float() - y) ** 2).sum())
    return noise / max(signal, 1e-30)


def _repeat(obj, batch: int, k: int):
    """Every tensor whose first dimension is the call's batch, repeated k times along it."""
    if isinstance(obj, torch.Tensor):
        return torch.cat([obj] * k) if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_repeat(o, batch, k) for o in obj)
    if isinstance(obj, dict):
        return {key: _repeat(v, batch, k) for key, v in obj.items()}
    return obj


class MultiProbe(nn.Module):
    """Several quantized versions of one layer in one batched run: the batch is [outer, K, chunk, ...] (outer = 2
    when classifier-free guidance stacks unconditional and conditional halves) and version k sees chunk k."""

    def __init__(self, probes: list, chunk: int):
        super().__init__()
        self.probes, self.chunk = probes, chunk

    def forward(self, x):
        k = len(self.probes)
        outer = x.shape[0] // (k * self.chunk)
        if outer * k * self.chunk != x.shape[0]:
            raise RuntimeError(f"batch {x.shape[0]} does not split into {k} probes of {self.chunk}")
        xs = x.reshape(outer, k, self.chunk, *x.shape[1:])
        ys = [p(xs[:, i].reshape(outer * self.chunk, *x.shape[1:])) for i, p in enumerate(self.probes)]
        ys = [y.reshape(outer, 1, self.chunk, *y.shape[1:]) for y in ys]
        return torch.cat(ys, dim=1).reshape(x.shape[0], *ys[0].shape[3:])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else (f"{seconds / 60:.0f} min" if seconds < 5400
                                                    else f"{seconds / 3600:.1f} h")


class _Estimate:
    """The time left of a measurement, from the probes timed so far (content probes sample whole images, quality
    probes run recorded calls: each kind has its own time per probe). It is said in the progress phase once both
    kinds still to come have been timed, and again when it has changed by more than a quarter (and 10 s)."""

    def __init__(self, progress: Progress, todo: dict, phase: str):
        self.progress, self.left, self.phase = progress, dict(todo), phase
        self.seconds, self.count, self.said = {}, {}, None

    def done(self, role: str, n: int, seconds: float):
        self.seconds[role] = self.seconds.get(role, 0.0) + seconds
        self.count[role] = self.count.get(role, 0) + n
        self.left[role] = self.left.get(role, 0) - n
        if sum(self.left.values()) <= 0 or any(k > 0 and r not in self.count for r, k in self.left.items()):
            return  # nothing left, or a kind still to come not timed yet
        eta = sum(k * self.seconds[r] / self.count[r] for r, k in self.left.items() if k > 0)
        if self.said is None or abs(eta - self.said) > max(0.25 * self.said, 10.0):
            self.said = eta
            self.progress.rename(f"{self.phase} (about {_duration(eta)} left)")


def measure_sensitivity(runner: DenoiserRunner, calib: Calibration, layers: list[LayerInfo],
                        w_menu: dict[str, list[LayerFormat]], a_menu: list[LayerFormat], fingerprint_id: str,
                        n_calls: int = 4, n_prompts: int = 8, use_bos: bool = True, cache_dir: str | None = None,
                        progress: Progress | None = None, call_batch: int = 8, mode: str = "full",
                        search: str = "auto", inputs_budget: int = 1 << 30) -> Sensitivity:
    """w_menu: role -> weight formats to score (their a_bits must be 16); a_menu: activation formats (w_bits 16).
    mode="full": MixDQ's decoupled metrics (denoiser-output SQNR for quality layers, image SSIM for content layers).
    mode="local": every layer scored by the relative noise of its own output, computed from its recorded FP input
    (one layer forward per probe instead of a whole network or sampler run: the fast approximation for big
    models on slow hardware; it does not see how errors propagate); the recorded inputs are held at most
    `inputs_budget` bytes at a time (StreamedInputs).
    Quality layers are scored on `n_calls` recorded calls spread over the timesteps, `call_batch` samples of each
    (conditional and unconditional halves alike when guidance batches them). `search`: the probes' weight range search
    (quantize_weight's; "auto" = MSE-clipped below 8 bits)."""
    progress = progress or Progress()
    todo = [li for li in layers if not li.protected]
    key = stable_hash({"v": CACHE_VERSION, "model": fingerprint_id, "prompts": calib.prompts, "seeds": calib.seeds,
                       "settings": calib.settings, "groups": calib.n_groups, "range": calib.range_method,
                       "w": {r: [f.name for f in fs] for r, fs in w_menu.items()}, "a": [f.name for f in a_menu],
                       "layers": [li.name for li in todo], "calls": n_calls, "prompts_n": n_prompts, "bos": use_bos,
                       "call_batch": call_batch, "mode": mode, **({"search": search} if search != "auto" else {})})
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    path = os.path.join(cache_dir, f"{key}.json") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            data = json.load(open(path))
            if data.get("version") == CACHE_VERSION:
                return Sensitivity(data["loss"], data["role"], data.get("seconds", 0.0), cached=True, key=key)
        except (OSError, ValueError):
            pass  # a damaged cache entry is simply recomputed
    t0 = time.time()
    model = runner.denoiser
    ranges = calib.ranges()
    bos = calib.bos() if use_bos else {}
    # quality: a subsample of recorded calls spread over the timesteps
    calls = calib.calls
    idx = sorted({round(i * (len(calls) - 1) / max(1, n_calls - 1)) for i in range(min(n_calls, len(calls)))})
    probe_calls = [subsample_call(calls[i], call_batch) for i in idx]
    signal = sum(float((c.output.float() ** 2).sum()) for c in probe_calls)
    prompts = calib.prompts[:n_prompts]
    seeds = calib.seeds[:n_prompts]
    modules = dict(model.named_modules())
    jobs = []
    for li in todo:
        for f in w_menu.get(li.role, []):
            jobs.append((li, f))
        for f in a_menu:
            if li.name in ranges or f.a_mode == "dynamic":
                jobs.append((li, f))
    mine = set(distributed.share(list(dict.fromkeys(li.name for li, _ in jobs))))
    jobs = [(li, f) for li, f in jobs if li.name in mine]  # this process's share (all of them without torchrun)
    if mode not in ("full", "local"):
        raise ValueError(f"mode must be 'full' or 'local', got {mode!r}")
    n_content = sum(1 for li, _ in jobs if li.role == "content") if mode == "full" else 0
    progress.start(len(jobs) + (1 if n_content else 0), "measuring sensitivity")
    eta = _Estimate(progress, {"content": n_content, "quality": len(jobs) - n_content}, "measuring sensitivity")
    fp_images = None
    switch = attach_act_group_switch(model, calib.group_bounds(), runner.timestep_of, remember=False) \
        if calib.n_groups > 1 else None
    out = Sensitivity(role={li.name: li.role for li in todo}, key=key)
    max_batch = max(1, int(runner.max_batch))
    by_layer: dict[str, list] = {}

    def probe(name, fmt):  # a simulate-mode quantized version of the layer, with its calibrated range and BOS
        return quantized_layer(modules[name], fmt, mode="simulate", search=search, act_range=ranges.get(name),
                               bos=bos.get(name))

    for li, fmt in jobs:
        by_layer.setdefault(li.name, [li, []])[1].append(fmt)
    inputs = StreamedInputs(model, probe_calls, list(by_layer), calib.group_of, inputs_budget) \
        if mode == "local" else {}
    try:
        with torch.no_grad():
            if n_content:
                fp_images = runner.sample(prompts, seeds)
                progress.tick()
            for name, (li, fmts) in by_layer.items():
                src = modules[name]
                if mode == "local":
                    for fmt in fmts:
                        t_probe = time.time()
                        loss = _local_loss(src, probe(name, fmt), inputs[name])
                        out.loss.setdefault(name, {})[fmt.name] = loss if math.isfinite(loss) else 1e6
                        eta.done("quality", 1, time.time() - t_probe)
                        progress.tick()
                    continue
                # all formats of this layer in one batched run where the sampler takes them in one batch: sample
                # chunk k goes through format k; a sampler that runs fewer prompts at once gets one format per run
                per_run = max(1, max_batch // len(prompts)) if li.role == "content" else len(fmts)
                for start in range(0, len(fmts), per_run):
                    group = fmts[start:start + per_run]
                    t_probe = time.time()
                    probes = [probe(name, f) for f in group]
                    try:
                        if li.role == "content":
                            set_submodule(model, name, MultiProbe(probes, len(prompts)) if len(group) > 1
                                          else probes[0])
                            imgs = runner.sample(prompts * len(group), seeds * len(group))
                            losses = [1.0 - content_ssim(fp_images, imgs[k * len(prompts):(k + 1) * len(prompts)])
                                      for k in range(len(group))]
                        else:
                            noise = [0.0] * len(group)
                            for c in probe_calls:  # (the timestep-group switch hook picks each call's ranges)
                                b = c.output.shape[0]
                                set_submodule(model, name, MultiProbe(probes, b))
                                y = runner.output_of(model(*_repeat(c.args, b, len(group)),
                                                           **_repeat(c.kwargs, b, len(group)))).float()
                                for k in range(len(group)):
                                    noise[k] += float(((y[k * b:(k + 1) * b] - c.output.float()) ** 2).sum())
                            losses = [n / max(signal, 1e-30) for n in noise]
                    finally:
                        set_submodule(model, name, src)  # always restore the FP layer
                    eta.done(li.role, len(group), time.time() - t_probe)
                    for f, loss in zip(group, losses):
                        out.loss.setdefault(name, {})[f.name] = max(0.0, float(loss)) if math.isfinite(loss) else 1e6
                        progress.tick(1)
    finally:
        if switch is not None:
            switch.remove()
    out.measured = len(jobs)
    out.loss = distributed.gather(out.loss)  # every process's share: the whole table, in every process
    out.seconds = time.time() - t0
    if path and distributed.is_main():
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(out.to_json(), f)
        os.replace(tmp, path)
    return out
