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

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .apply import quantized_layer, set_submodule
from .offload import recomputed, recomputing, streamed_device, with_params_on
from .calibration import Calibration
from .errors import MixQuantError, reason
from .formats import LayerFormat
from .layers import QuantLayer, attach_act_group_switch
from .metrics import ssim
from .roles import LayerInfo, is_transformer
from . import distributed
from .runner import DenoiserRunner, Progress, stable_hash

CACHE_VERSION = 2
MODES = ("fast", "full", "local")


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
        return obj.index_select(0, ix.to(obj.device)) if obj.dim() > 0 and obj.shape[0] == batch else obj
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
    ix = torch.tensor(keep)  # (moved to each tensor's device: CUDA's index_select takes no CPU index)
    return type(c)(_select(c.args, b, ix), _select(c.kwargs, b, ix), c.timestep, c.step,
                   c.output.index_select(0, ix.to(c.output.device)))


def observe_inputs(model: nn.Module, names, on_input, calls) -> None:
    """Replay `calls` (recorded DenoiserCalls) on `model` without gradients, calling `on_input(name, module, x)` with
    each named layer's input as it runs; the hooks are always removed."""
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, args, n=n: on_input(n, m, args[0])) for n in names]
    try:
        with torch.no_grad():
            for c in calls:
                model(*c.args, **c.kwargs)
    finally:
        for h in handles:
            h.remove()


def _record_inputs(model: nn.Module, calls, names, group_of) -> dict[str, list]:
    """Each layer's FP input (and timestep group) on the probe calls."""
    rec = {n: [] for n in names}
    current = {"group": 0}

    def grouped():
        for c in calls:
            current["group"] = group_of(c.timestep)
            yield c

    observe_inputs(model, names, lambda n, m, x: rec[n].append((x.detach(), current["group"])), grouped())
    return rec


def _input_bytes(model: nn.Module, call, names) -> dict[str, int]:
    """Bytes of each layer's input on one call (one forward; nothing is kept)."""
    size: dict[str, int] = {}
    observe_inputs(model, names, lambda n, m, x: size.__setitem__(n, size.get(n, 0) + x.numel() * x.element_size()),
                   [call])
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


def _channel_dim(y: torch.Tensor, module: nn.Module) -> int:
    """The channel dimension of a layer's output: 1 for a convolution (B, C, H, W), the last one for a Linear."""
    return 1 if isinstance(module, nn.Conv2d) and y.dim() == 4 else y.dim() - 1


def _positions(t: torch.Tensor, cd: int) -> list[int]:
    """The dimensions of a layer output that are neither the batch nor the channel: tokens, or a conv's pixels."""
    return [d for d in range(1, t.dim()) if d != cd % t.dim()]


def coherent_split(e: torch.Tensor, cd: int) -> torch.Tensor:
    """[3, C]: per channel, the summed squares of an error's part that varies over positions, of its mean over the
    positions (once per sample: what every token / pixel shares), and of that mean counted at every position. A
    weight error on identical inputs (the padding tokens of a text context: most of the 77, or 512, positions) is the
    same at every position, and its effect on the denoiser output adds up coherently: the diagonal estimate (each
    element's noise independent) undercounts it by up to the number of positions (500x on Flux's text stream)."""
    pos = _positions(e, cd)
    if not pos:
        z = _per_channel(e ** 2, cd, "sum")
        return torch.stack([torch.zeros_like(z), z, z])
    mean = e.mean(dim=pos, keepdim=True)
    n_pos = math.prod(e.shape[d] for d in pos)
    m = _per_channel(mean ** 2, cd, "sum")
    return torch.stack([_per_channel((e - mean) ** 2, cd, "sum"), m, m * n_pos])


def coherent_gains(g: torch.Tensor, cd: int) -> torch.Tensor:
    """[2, C]: per channel, the mean over elements of g^2 (the gain of independent noise), and the mean over samples
    of (sum of g over the positions)^2 (the gain of an error every position shares); weights for coherent_split."""
    g = g.float()
    pos = _positions(g, cd)
    summed = g.sum(dim=pos) if pos else g
    if summed.dim() == 1:
        summed = summed[None]
    return torch.stack([_per_channel(g ** 2, cd, "mean"), (summed ** 2).mean(0)])


def _per_channel(t: torch.Tensor, dim: int, reduce: str = "sum") -> torch.Tensor:
    t = t.movedim(dim, -1).reshape(-1, t.shape[dim])
    return t.sum(0) if reduce == "sum" else t.mean(0)


def _lowpass_probe(out: torch.Tensor, gen: torch.Generator, factor: int = 8) -> torch.Tensor:
    """A random output-space direction with only large-scale structure: white noise on a grid `factor` times coarser,
    upsampled bilinearly (for a spatial output; white noise otherwise)."""
    if out.dim() != 4 or min(out.shape[-2:]) < 2:
        return torch.randn(out.shape, generator=gen).to(out)
    h, w = max(1, out.shape[-2] // factor), max(1, out.shape[-1] // factor)
    coarse = torch.randn((*out.shape[:2], h, w), generator=gen).to(out)
    r = torch.nn.functional.interpolate(coarse, size=out.shape[-2:], mode="bilinear", align_corners=False)
    return r * (out.numel() / max(float((r ** 2).sum()), 1e-30)) ** 0.5  # the power of a white probe


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (fewer when n < k)."""
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(k, n))})


def _ordinary_tensors(model: nn.Module) -> None:
    """A host that builds its models in inference mode (ComfyUI runs every node under torch.inference_mode) gives
    tensors autograd can neither save nor version: each such parameter and buffer is replaced, one at a time, by an
    ordinary copy with the same values (memory-neutral; the model computes exactly as before, in any mode)."""
    with torch.inference_mode(False):
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and (p.is_inference() or p.data.is_inference()):
                    # (a new Parameter: an inference Parameter keeps no version counter whatever its data)
                    m._parameters[name] = nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


def output_gains(model: nn.Module, runner: DenoiserRunner, calls, names: list[str], kinds=("quality", "content"),
                 seed: int = 0, call_kinds: list | None = None) -> dict:
    """How much of each layer's output noise reaches the denoiser output, per output channel, from one backward pass
    per call and kind (every layer at once; Hutchinson's estimator of the Gauss-Newton diagonal):
    gains[kind][layer][i] = [2, C]: [0, c] the mean over the channel's elements of E_r (d(r . out) / dy)^2 on call i,
    [1, c] the mean over samples of E_r (sum over positions of d(r . out) / dy_c)^2, so that the output noise power
    caused by a layer-output error e is about sum_c gain[0, c] * (e_c's part varying over positions)^2 + gain[1, c] *
    (its mean over positions)^2 summed (coherent_split: a first-order estimate, diagonal but for what every position
    shares). kind "quality": r is white (the whole output, as SQNR sees it); "content": r has only
    large-scale structure (what a nearly image-sized SSIM window sees: MixDQ's content metric). call_kinds[i]: the
    kinds measured on call i (default all); the others get None there."""
    mods = dict(model.named_modules())
    gains = {k: {n: [] for n in names} for k in kinds}
    gen = torch.Generator().manual_seed(seed)
    _ordinary_tensors(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    # A host's model may add into a tensor autograd saved for the backward pass (`x += n` after a LayerNorm read x:
    # WebUI Forge's UNet): then the pass is made again with autograd keeping copies of what it saves.
    copies = [False]
    # The backward recomputes the model's blocks (offload.recomputed) unless a first try shows it does not replay alike
    recompute = [True]

    def saving():
        if not copies[0]:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)

    def one_call(c, wanted) -> dict:
        # Each layer's output gradient is reduced to its [2, C] gains by a hook as the backward pass reaches it (no
        # layer output is held for it); the backward recomputes the model's blocks (offload.recomputed): it holds
        # one block's saved activations at a time, and one block's weights of a model streamed through its device.
        got = {kind: {} for kind in wanted}
        now = [None]  # the kind whose backward pass runs
        taps = {}  # layer -> (its output's hook, (channels, device) for a layer no gradient reaches)

        def tap(g, n, cd):
            got[now[0]][n] = coherent_gains(g.detach(), cd)

        def keep(m, args, y, n):
            if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                return None
            if not y.requires_grad:  # fed only by inputs without gradient (time embedding, text context)
                y = y.detach().requires_grad_(True)
            if recomputing():  # (a block recomputed in the backward: tapped in the forward already)
                return y
            cd = _channel_dim(y, m)
            if n in taps:  # (a layer called twice in one call: its last output counts)
                taps[n][0].remove()
            taps[n] = (y.register_hook(lambda g, n=n, cd=cd: tap(g, n, cd)), (y.shape[cd], y.device))
            return y

        # (kept through the backward passes: a block recomputed there must compute as in the forward, leaves too)
        handles = [mods[n].register_forward_hook(lambda m, a, y, n=n: keep(m, a, y, n)) for n in names]
        # (hosts may sample in inference mode: the whole pass runs outside it, with gradients)
        with torch.inference_mode(False), torch.enable_grad(), saving(), \
                recomputed(model) if recompute[0] else contextlib.nullcontext():
            try:
                args = [a.detach().clone().requires_grad_(True)
                        if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in c.args]
                out = runner.output_of(model(*args, **c.kwargs))
                for i, kind in enumerate(wanted):  # (each kind's gradients reduced as they come, then the next's)
                    now[0] = kind
                    r = torch.randn(out.shape, generator=gen).to(out) if kind == "quality" \
                        else _lowpass_probe(out, gen)
                    torch.autograd.backward(out, grad_tensors=r, retain_graph=i < len(wanted) - 1)
            finally:
                for h in handles + [h for h, _ in taps.values()]:
                    h.remove()
        for kind in wanted:  # a layer the gradient never reached: no gain
            for n, (_, (channels, device)) in taps.items():
                got[kind].setdefault(n, torch.zeros(2, channels, device=device))
        return got

    try:
        for i_call, c in enumerate(calls):
            wanted = [k for k in kinds if call_kinds is None or k in call_kinds[i_call]]
            state = gen.get_state()
            while True:
                try:
                    got = one_call(c, wanted)
                    break
                except RuntimeError as e:
                    if isinstance(e, torch.OutOfMemoryError):  # (a plain backward would need more)
                        raise
                    inplace = "modified by an inplace operation" in str(e)
                    dev = streamed_device(model)
                    if recompute[0] and dev is not None:
                        raise MixQuantError(
                            f"The fast sensitivity could not recompute this model's blocks one at a time "
                            f"({reason(e)}); without that, its backward pass would hold every block's weights on "
                            f"{dev}, which the model does not fit. Use the local sensitivity (sensitivity mode "
                            f"`local`: forward passes only).") from e
                    if recompute[0]:  # (a host's model that does not replay alike, or will not run in a region)
                        recompute[0] = False  # one plain backward
                    elif inplace and not copies[0]:
                        copies[0] = True
                    else:
                        raise
                gen.set_state(state)  # (the same probes as a first try would have drawn)
            for kind, per_layer in got.items():
                for n, v in per_layer.items():
                    gains[kind][n].append(v)
            for kind in kinds:  # a layer the call never ran (none in a UNet) gets no weight
                for n in names:
                    if len(gains[kind][n]) <= i_call:
                        gains[kind][n].append(None)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return gains


def _channel_noise(src: nn.Module, probe: QuantLayer, inputs) -> list:
    """Per recorded call, the quantized layer's squared error summed per output channel, split into the part that
    varies over positions and the part every position shares (coherent_split)."""
    out = []
    with torch.no_grad():
        for x, group in inputs:
            probe.act_group = group
            y = src(x).float()
            e = probe(x).float() - y
            out.append(coherent_split(e, _channel_dim(e, src)))
    return out


def _weighted(noise: list, gains: list, coherent: bool = False) -> float:
    """The output noise a layer's error causes, from coherent_split's parts and coherent_gains' weights: the diagonal
    estimate (every element's noise independent), or with `coherent` (diffusion transformers) the coherent one (the
    part of the error every position shares acting as one vector, the rest independent); both first-order.
    Measured per layer and format against the real output noise on Flux's layout: on the text stream (inputs that
    repeat over the padding tokens, and attention that sums over them) the diagonal estimate was 300-1000x low and
    the coherent one within 3x, and its plan (the coupling sweep's best) beats uniform W4 at equal bytes where the
    diagonal one's lost by 7 dB. On digits (a UNet) the coherent estimate was closer on cross-attention's to_v but
    overestimated self-attention's to_v 3-4x and its plans drew worse images: UNets keep the diagonal estimate, with
    which this method was validated against the exhaustive measurement."""
    if coherent:
        return sum(float((g[0] * e[0] + g[1] * e[1]).sum()) for e, g in zip(noise, gains) if g is not None)
    return sum(float((g[0] * (e[0] + e[2])).sum()) for e, g in zip(noise, gains) if g is not None)


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
        # a first probe may also pay for recording a chunk of layer inputs: estimate from a few of each kind
        self.enough = {r: min(k, max(3, math.ceil(0.02 * k))) for r, k in todo.items()}

    def done(self, role: str, n: int, seconds: float):
        self.seconds[role] = self.seconds.get(role, 0.0) + seconds
        self.count[role] = self.count.get(role, 0) + n
        self.left[role] = self.left.get(role, 0) - n
        if sum(self.left.values()) <= 0 or any(k > 0 and self.count.get(r, 0) < self.enough[r]
                                               for r, k in self.left.items()):
            return  # nothing left, or a kind still to come not timed enough yet
        eta = sum(k * self.seconds[r] / self.count[r] for r, k in self.left.items() if k > 0)
        if self.said is None or abs(eta - self.said) > max(0.25 * self.said, 10.0):
            self.said = eta
            self.progress.rename(f"{self.phase} (about {_duration(eta)} left)")


def measure_sensitivity(runner: DenoiserRunner, calib: Calibration, layers: list[LayerInfo],
                        w_menu: dict[str, list[LayerFormat]], a_menu: list[LayerFormat], fingerprint_id: str,
                        n_calls: int = 4, n_prompts: int = 8, use_bos: bool = True, cache_dir: str | None = None,
                        progress: Progress | None = None, call_batch: int | None = None, mode: str = "fast",
                        search: str = "auto", inputs_budget: int = 1 << 30, gain_batch: int = 2) -> Sensitivity:
    """w_menu: role -> weight formats to score (their a_bits must be 16); a_menu: activation formats (w_bits 16).
    mode="fast" (the default; what scales to SDXL): each probe's noise on the layer's own output, computed from its
    recorded FP inputs, per output channel, weighted by how much of it reaches the denoiser output (output_gains: one
    backward pass per probe call and role, for every layer at once): quality layers by the white-probe gains
    (denoiser-output noise, SQNR's scale) on the probe calls, content layers by the large-scale-probe gains (output
    structure, as SSIM's large window sees it) on calls from the first steps.
    mode="full": MixDQ's decoupled metrics (denoiser-output SQNR for quality layers, image SSIM for content layers),
    one denoiser or sampler run per layer and format: the reference.
    mode="local": every layer scored by the relative noise of its own output (it does not see how errors propagate).
    fast and local hold the recorded inputs at most `inputs_budget` bytes at a time (StreamedInputs).
    Quality layers are scored on `n_calls` recorded calls spread over the timesteps, `call_batch` samples of each
    (conditional and unconditional halves alike when guidance batches them; default 2 in fast mode, else 8).
    `search`: the probes' weight range search (quantize_weight's; "auto" = MSE-clipped below 8 bits)."""
    progress = progress or Progress()
    if call_batch is None:  # the fast mode's ranks hold with 2 samples per call (bench/scale.py): 4x fewer inputs
        call_batch = 2 if mode == "fast" else 8
    todo = [li for li in layers if not li.protected]
    # diffusion transformers (no Conv2d to quantize): errors that every token shares are weighed as such (_weighted)
    coherent = mode == "fast" and is_transformer(todo)
    key = stable_hash({"v": CACHE_VERSION, "model": fingerprint_id, "prompts": calib.prompts, "seeds": calib.seeds,
                       "settings": calib.settings, "groups": calib.n_groups, "range": calib.range_method,
                       "w": {r: [f.name for f in fs] for r, fs in w_menu.items()}, "a": [f.name for f in a_menu],
                       "layers": [li.name for li in todo], "calls": n_calls, "prompts_n": n_prompts, "bos": use_bos,
                       "call_batch": call_batch, "mode": mode, **({"search": search} if search != "auto" else {}),
                       **({"coherent": 1} if coherent else {}),
                       **({"balance": list(calib.balance_rule)} if calib.balance else {}),
                       **({"gain_batch": gain_batch, "content_calls": "first tenth"} if mode == "fast" else {})})
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
    idx = _spread(len(calls), n_calls)
    kinds_of = {i: {"quality", "content"} for i in idx}
    if mode == "fast":
        # content layers: the image's structure is decided in the noisiest steps (MixDQ), so their noise is weighed
        # on calls from the first tenth of the steps, the first step at least (different prompts where there are
        # several); measured on digits, wider windows (a quarter, all steps) gave plans with lower SSIM
        last = max(c.step for c in calls)
        early = [i for i, c in enumerate(calls) if c.step <= last / 10]
        kinds_of = {i: {"quality"} for i in idx}
        for j in _spread(len(early), max(1, n_calls // 2)):
            kinds_of.setdefault(early[j], set()).add("content")
    order = sorted(kinds_of)
    probe_calls = [subsample_call(calls[i], call_batch) for i in order]
    call_kinds = [kinds_of[i] for i in order]
    power = [float((c.output.float() ** 2).sum()) for c in probe_calls]
    role_signal = {r: sum(p for p, k in zip(power, call_kinds) if r in k) for r in ("quality", "content")}
    prompts = calib.prompts[:n_prompts]
    seeds = calib.seeds[:n_prompts]
    modules = dict(model.named_modules())
    jobs = []
    for li in todo:
        for f in w_menu.get(li.role, []):
            if f.takes(li.kind):
                jobs.append((li, f))
        for f in a_menu:
            if not f.takes(li.kind):
                continue
            if f.a_mode == "dynamic" and li.kind == "linear" or f.a_mode == "static" and li.name in ranges:
                jobs.append((li, f))
    mine = set(distributed.share(list(dict.fromkeys(li.name for li, _ in jobs))))
    jobs = [(li, f) for li, f in jobs if li.name in mine]  # this process's share (all of them without torchrun)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    n_content = sum(1 for li, _ in jobs if li.role == "content") if mode == "full" else 0
    progress.start(len(jobs) + (1 if n_content else 0) + (1 if mode == "fast" and jobs else 0),
                   "measuring sensitivity")
    eta = _Estimate(progress, {"content": n_content, "quality": len(jobs) - n_content}, "measuring sensitivity")
    fp_images = None
    switch = attach_act_group_switch(model, calib.group_bounds(), runner.timestep_of, remember=False) \
        if calib.n_groups > 1 else None
    out = Sensitivity(role={li.name: li.role for li in todo}, key=key)
    max_batch = max(1, int(runner.max_batch))
    by_layer: dict[str, list] = {}

    def probe(name, fmt, src=None):  # a simulate-mode quantized version of the layer, with its range and BOS
        return quantized_layer(modules[name] if src is None else src, fmt, mode="simulate", search=search,
                               act_range=ranges.get(name), bos=bos.get(name))

    for li, fmt in jobs:
        by_layer.setdefault(li.name, [li, []])[1].append(fmt)
    streamed = mode in ("local", "fast")
    inputs = StreamedInputs(model, probe_calls, list(by_layer), calib.group_of, inputs_budget) if streamed else {}
    gains = None
    try:
        with torch.no_grad():
            if n_content:
                fp_images = runner.sample(prompts, seeds)
                progress.tick()
            if mode == "fast" and by_layer:
                gain_calls = [subsample_call(c, gain_batch) for c in probe_calls]
                gains = output_gains(model, runner, gain_calls, list(by_layer),
                                     kinds=tuple(sorted({li.role for li, _ in by_layer.values()})),
                                     call_kinds=call_kinds)
                progress.tick()
            for name, (li, fmts) in by_layer.items():
                src = modules[name]
                if streamed:
                    recorded = inputs[name]
                    # (a model streamed through the device, quant/offload.py: the layer's weights go to its inputs)
                    here = with_params_on(src, recorded[0][0].device) if recorded else src
                    for fmt in fmts:
                        t_probe = time.time()
                        if mode == "local":
                            loss = _local_loss(here, probe(name, fmt, here), recorded)
                        else:
                            # (gains are per element: computed on fewer samples, they weigh every sample's noise)
                            loss = _weighted(_channel_noise(here, probe(name, fmt, here), recorded),
                                             gains[li.role][name], coherent) / max(role_signal[li.role], 1e-30)
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
                            losses = [n / max(role_signal["quality"], 1e-30) for n in noise]
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
