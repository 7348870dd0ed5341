"""How fast a plan runs on the user's device, by measurement: the time half of the allocation (MixDQ allocates under
memory; a plan that is smaller but slower than the float model is not what a user asked for).

`measure_speed(model, call, layers, formats, ranges, bos)` replays one recorded denoiser call on the float denoiser
where it runs (its device and dtype), captures every quantizable layer's input, and times, per distinct layer shape
(kind, geometry, input shape and dtype, activation split, BOS token, zero-point zone), the float layer and a packed
quantized layer in each candidate format, in interleaved rounds (best round), through the kernels the layer would
use (the CPU's per-shape route race, Triton on a GPU). The whole float call is timed too, and

    predicted(plan) = fp_call - sum(float layer times) + sum(the plan's layer times)

(the rest of the denoiser, attention products, norms and so on, is the same in both). Times are seconds per denoiser
call; a layer called twice in one call counts twice. `SpeedTable.limit` turns "at least this speed relative to the
float denoiser" into the bound on the summed layer times that quant/allocate.py's integer program takes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..kernels import timing
from .apply import quantized_layer, set_submodule
from .formats import LayerFormat
from .runner import Progress
from .sensitivity import observe_inputs, subsample_call


@dataclass
class SpeedTable:
    device: str  # what was measured on, in words (CPU model and threads, or the GPU's name)
    dtype: str  # the float denoiser's dtype
    batch: int  # samples per timed denoiser call
    fp_call: float  # seconds of one float denoiser call
    layer_fp: dict  # layer -> seconds of its float layer per denoiser call
    layer: dict  # layer -> {format name -> seconds per denoiser call}
    seconds: float = 0.0  # how long measuring took
    shapes: int = 0  # distinct layer shapes timed
    in_place: dict = field(default_factory=dict)  # format ("float" too) -> factor from alone to inside the model
    notes: list = field(default_factory=list)

    def time(self, name: str, fmt: LayerFormat) -> float:
        if fmt.is_float:
            return self.layer_fp[name]
        return self.layer[name][fmt.name]

    @property
    def rest(self) -> float:
        """Seconds of the denoiser call outside the quantizable layers."""
        return self.fp_call - sum(self.layer_fp.values())

    def predicted(self, plan: dict) -> float:
        """Predicted seconds of one denoiser call with `plan` (layer -> LayerFormat); layers not in the plan stay
        float."""
        return self.rest + sum(self.time(n, plan[n]) if n in plan else t for n, t in self.layer_fp.items())

    def limit(self, min_speed: float) -> float:
        """The bound on the summed layer times of a plan that is at least `min_speed` x the float denoiser's speed."""
        return self.fp_call / min_speed - self.rest

    def speed_of(self, layer_seconds: float) -> float:
        """Speed relative to the float denoiser of a plan whose layers take `layer_seconds` in all."""
        return self.fp_call / max(self.rest + layer_seconds, 1e-12)

    def to_json(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "batch": self.batch, "fp_call_ms": self.fp_call * 1e3,
                "rest_ms": self.rest * 1e3, "shapes": self.shapes, "seconds": self.seconds,
                "in_place": dict(self.in_place), "notes": list(self.notes)}


def speed_text(sp: dict) -> str:
    """A report's speed (`report["speed"]`) for people: predicted and measured against the float model, the target,
    and what the budget could not meet. Every host shows this text."""
    line = (f"speed vs float on {sp['device']} ({sp['dtype']}, batch {sp['batch']}): predicted "
            f"{sp['predicted_speed']:.2f}x")
    if "measured_speed" in sp:
        line += f", measured {sp['measured_speed']:.2f}x ({sp['measured_ms']:.1f} ms vs {sp['measured_fp_ms']:.1f} ms)"
    line += f"; target {sp['min_speed']:g}x " + ("met" if sp["met"] else "not met")
    return line + (f"\n{sp['note']}" if sp.get("note") else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    if device.type == "cpu":
        from ..kernels.cpu_routes import cpu_model
        n = torch.get_num_threads()
        return f"{cpu_model()}, {n} thread{'s' if n != 1 else ''}"
    return str(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns: dict, device: torch.device, rounds: int = 5, target: float = 2e-3) -> dict:
    """Seconds per call of each function on `device` (kernels/timing.py's race, synced with the device): short
    calls are timed as a stream of about `target` seconds, host overhead included."""
    return timing.race(fns, rounds, lambda: _sync(device), target)


def _zone(r) -> str:
    # where a static zero point sits changes which CPU route wins (kernels/cpu_routes.py's _zone)
    if r is None:
        return ""
    lo, hi = float(r.lo.min()), float(r.hi.max())
    return "low" if -lo < 0.25 * max(hi - lo, 1e-12) else "mid"


def _key(m: nn.Module, x: torch.Tensor, name: str, ranges: dict, bos: dict) -> tuple:
    geo = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else \
        (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation)
    r = ranges.get(name)
    return (type(m).__name__, geo, m.bias is not None, tuple(x.shape), x.dtype, x.device.type,
            r is not None and r.split is not None and r.split, name in bos, _zone(r))


def measure_speed(model: nn.Module, call, layers: list, formats: dict, ranges: dict, bos: dict,
                  progress: Progress | None = None, rounds: int = 5) -> SpeedTable:
    """Time the float denoiser on `call` (a recorded DenoiserCall, already cut to the batch to time) and each layer
    of `layers` (LayerInfo) in each format of `formats[name]` (float formats are the layer itself). `ranges` /
    `bos`: the calibrated static activation ranges and BOS embeddings the quantized layers would get."""
    progress = progress or Progress()
    t0 = time.time()
    mods = dict(model.named_modules())
    names = [li.name for li in layers]
    calls_of: dict[str, list] = {n: [] for n in names}
    samples: dict[tuple, tuple] = {}  # key -> (first layer with it, its input)

    def hook(n, m, x):
        k = _key(m, x, n, ranges, bos)
        calls_of[n].append(k)
        if k not in samples:
            samples[k] = (n, x.detach().clone())

    observe_inputs(model, names, hook, [call])
    wanted: dict[tuple, dict] = {}
    for n in names:
        for k in calls_of[n]:
            for f in formats.get(n, ()):
                if not f.is_float:
                    wanted.setdefault(k, {})[f.name] = f
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    progress.start(len(samples) + 1, "measuring speed")
    per_key: dict[tuple, dict] = {}
    reps = {k: n for k, (n, _) in samples.items()}  # key -> the layer whose weights stand for that shape

    def build(k, fname):
        n = reps[k]
        return quantized_layer(mods[n], wanted[k][fname], mode="packed", search="minmax", act_range=ranges.get(n),
                               bos=bos.get(n))

    with torch.no_grad():
        for k, (n, x) in samples.items():
            fns = {"float": lambda src=mods[n], x=x: src(x)}
            fns.update({fname: (lambda q=build(k, fname), x=x: q(x)) for fname in wanted.get(k, {})})
            per_key[k] = race(fns, device, rounds)
            del fns
            progress.tick()
        samples.clear()
        layer_fp = {n: sum(per_key[k]["float"] for k in calls_of[n]) for n in names}
        layer = {n: {f.name: sum(per_key[k][f.name] for k in calls_of[n]) for f in formats.get(n, ())
                     if not f.is_float} for n in names}
        # in place. A layer runs at another speed inside the model than alone (other layers' data evicts its weights,
        # allocator and cache state differ: 10-30% on small CPU layers), and a 2-core machine's speed drifts by as
        # much between the isolated timings and now. So only differences of whole calls timed side by side are
        # used: the float call against the call with every quantizable layer stubbed out (what the rest of the
        # denoiser costs; the float layers' share gives their factor), then per format the float call against the
        # call with every layer that may take the format quantized from its own weights (one format at a time,
        # freed before the next; a layer of one shape standing in for all of them would keep its weights in cache
        # and flatter the format: +15-20% on the SD1.5 architecture). The isolated times only say how the whole
        # difference splits between layers.
        n_rounds = max(2, rounds // 2)
        stubs = {n: _Stub(mods[n]) for n in names if calls_of[n]}
        whole = _in_place(model, call, mods, {"float": {}, "rest": stubs}, device, n_rounds)
        fp_call, rest = whole["float"], min(whole["rest"], whole["float"])
        alone_fp = sum(layer_fp.values())
        kappa = min(4.0, max(0.25, (fp_call - rest) / alone_fp)) if alone_fp > 0 else 1.0
        kappa = min(kappa, fp_call / alone_fp) if alone_fp > 0 else 1.0  # (the rest is never below zero)
        scale = {}
        for fname in sorted({f for d in wanted.values() for f in d}):
            members = [n for n in names if calls_of[n] and any(f.name == fname for f in formats.get(n, ()))]
            own = {n: quantized_layer(mods[n], wanted[calls_of[n][0]][fname], mode="packed", search="minmax",
                                      act_range=ranges.get(n), bos=bos.get(n)) for n in members}
            pair = _in_place(model, call, mods, {"float": {}, fname: own}, device, n_rounds)
            del own
            alone = sum(layer[n][fname] for n in members)
            # (the difference in units of this pair's float call: the machine may run at another speed than
            # during the first pair, and a uniform slowdown stretches both calls alike)
            in_model = (pair[fname] - pair["float"]) * fp_call / pair["float"] \
                + kappa * sum(layer_fp[n] for n in members)
            scale[fname] = min(4.0, max(0.25, in_model / alone)) if alone > 0 else 1.0
        progress.tick()
    for n in layer_fp:
        layer_fp[n] *= kappa
    for d in layer.values():
        for fname in d:
            d[fname] *= scale[fname]
    scale["float"] = kappa
    batch = next((a.shape[0] for a in call.args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
    dtype = next((str(t.dtype).replace("torch.", "") for t in model.parameters() if t.is_floating_point()), "?")
    return SpeedTable(device_name(device), dtype, int(batch), fp_call, layer_fp, layer, time.time() - t0,
                      len(per_key), in_place=scale)


class _Stub(nn.Module):
    """Stands in for a layer at no cost: zeros of the layer's output shape (what the rest of the call costs)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = [layer]  # (not a submodule: the stub holds no weights of its own)

    def forward(self, x):
        m = self.layer[0]
        if isinstance(m, nn.Linear):
            return x.new_zeros(*x.shape[:-1], m.out_features)
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        return x.new_zeros(x.shape[0], m.out_channels, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                           (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _in_place(model: nn.Module, call, mods: dict, variants: dict, device: torch.device, rounds: int) -> dict:
    """Seconds of one call of `model` with each variant's layers swapped in (name -> module; swaps always undone):
    a warm-up round, then the best of `rounds` interleaved rounds."""
    best = {v: math.inf for v in variants}
    for r in range(rounds + 1):
        for v, swaps in variants.items():
            saved = {n: mods[n] for n in swaps}
            try:
                for n, q in swaps.items():
                    set_submodule(model, n, q)
                _sync(device)
                t = time.perf_counter()
                model(*call.args, **call.kwargs)
                _sync(device)
                if r:
                    best[v] = min(best[v], time.perf_counter() - t)
            finally:
                for n, m in saved.items():
                    set_submodule(model, n, m)
    return best


def timing_call(calls: list, batch: int = 2):
    """The recorded denoiser call that speeds are measured on: the first one, cut to `batch` samples (one image with
    classifier-free guidance; a calibration batches several prompts into one call)."""
    c = calls[0]
    return subsample_call(c, batch) if c.output is not None else c  # (its batch is the output's: a transformer's
    # call may pass every input by keyword)


def compare_calls(models: dict, call, rounds: int = 3) -> dict:
    """Seconds of one denoiser call (`call`) through each model, timed in interleaved rounds in this process."""
    first = next(iter(models.values()))
    device = next((t.device for t in first.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return race({k: (lambda m=m: m(*call.args, **call.kwargs)) for k, m in models.items()}, device, rounds, 0.0)
