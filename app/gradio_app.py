"""The standalone Gradio app (`mixquant demo`): see what quantization does to a model before using it.

Flow: model + prompts + sampler settings -> 1. calibrate (FP sampling run + per-layer sensitivity, cached on disk)
-> 2. pick a budget (average weight bits or MB) with the predicted size and quality/size curve -> 3. quantize and
compare FP vs quantized images for the same seeds, per-layer bits, quality numbers, memory and time -> 4. save.

The app is thin: everything numeric comes from quant/ through app/diffusers_host/api.py (quantize_pipeline),
app/diffusers_host/harness.py (compare_pipelines) and the calibration / sensitivity / allocation functions of quant/.
`DemoBackend` holds the logic without any Gradio types (so it can be tested directly); `build_app` wires it to
Gradio components. It imports the diffusers host and the digits model, never the CLI (app/cli/demo.py launches it).
"""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..quant.errors import MixQuantError
from .diffusers_host.models import denoiser_of
from ..quant.sizes import model_bytes
from ..quant.speed import speed_text
from ..quant.util import json_safe, parse_prompts

log = logging.getLogger("mixquant.demo")

GALLERY_MAX = 16  # images compared side by side (the first prompts of the list)
DIGITS_PROMPTS = [f"a handwritten digit {w}" for w in
                  ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
GENERIC_PROMPTS = ["a photo of a cat sitting on a windowsill", "a watercolor painting of a lighthouse at dusk",
                   "a bowl of fruit on a wooden table, studio lighting", "a portrait of an old sailor, oil painting"]
UNIT_BITS, UNIT_MB = "average weight bits", "MB (whole denoiser)"
SENS_MODES = {"fast": "fast (gain-weighted layer noise, minutes at SDXL size)",
              "full": "full (MixDQ's exhaustive metrics, slow: the reference)",
              "local": "local (each layer's own output noise, approximate)"}
SENS_LABEL_TO_MODE = {v: k for k, v in SENS_MODES.items()}


# ------------------------------------------------------------------------------------------------------------------
# settings and state
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything from the form that changes calibration and sensitivity."""
    model: str
    prompts: tuple
    steps: int
    guidance: float
    scheduler: str
    seed: int
    negative_prompt: str
    a_bits: int
    sens_mode: str

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.prompts))]

    def sampler(self):
        from .diffusers_host.runner import SamplerSettings

        return SamplerSettings(steps=self.steps, guidance=self.guidance, scheduler=self.scheduler,
                               negative_prompt=self.negative_prompt)


def read_settings(model, prompts_text, steps, guidance, scheduler, seed, negative_prompt, a_bits,
                  sens_mode) -> Settings:
    prompts = parse_prompts(prompts_text)  # (quant.util's)
    try:
        steps, seed, a_bits = int(steps), int(seed), int(a_bits)
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise MixQuantError("steps, seed and activation bits must be whole numbers and guidance a number.") from None
    if steps < 1:
        raise MixQuantError("steps must be at least 1.")
    mode = SENS_LABEL_TO_MODE.get(sens_mode, sens_mode)
    if mode not in SENS_MODES:
        raise MixQuantError(f"unknown sensitivity mode {sens_mode!r}: use {', '.join(SENS_MODES)}.")
    return Settings((model or "digits").strip() or "digits", tuple(prompts), steps, guidance, scheduler, seed,
                    (negative_prompt or "").strip(), a_bits, mode)


@dataclass
class ModelInfo:
    name: str
    path: str
    sizes: object  # engine.ModelSizes: layers, bytes, the feasible budget range
    image_size: tuple
    is_digits: bool

    @property
    def layers(self) -> list:
        return self.sizes.layers

    @property
    def min_bits(self) -> float:
        return self.sizes.min_bits

    @property
    def min_mb(self) -> float:
        return self.sizes.min_mb

    @property
    def fp16_mb(self) -> float:
        return self.sizes.bytes_fp16 / 1e6


@dataclass
class CalibResult:
    settings: Settings
    prepared: object  # engine.Prepared: quantizing with the same settings skips calibration + sensitivity
    curve: list
    seconds: dict


@dataclass
class QuantResult:
    settings: Settings
    qpipe: object
    report: dict
    numbers: dict


@dataclass
class Session:
    """Per-browser-session state (held in a gr.State)."""
    calib: CalibResult | None = None
    result: QuantResult | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# the backend: no Gradio types in here
# ------------------------------------------------------------------------------------------------------------------
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class DemoBackend:
    """Loads models (cached), calibrates, previews budgets, quantizes, compares and saves."""

    def __init__(self, model: str = "digits", out_dir: str = "mixquant_out", cache_dir: str | None = None,
                 device: str = "auto", max_models: int = 2, dtype: str = "auto", offload: str = "auto"):
        from .diffusers_host.models import resolve_device

        self.device = resolve_device(device)
        self.dtype = dtype  # "auto": fp16 on a GPU, fp32 on a CPU
        self.offload = offload  # "auto": a denoiser larger than the GPU streams through it (models.load_pipeline)
        self.out_dir = os.path.abspath(out_dir)
        self.cache_dir = cache_dir
        self.default_model = model
        self.max_models = max_models
        self._pipes: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.RLock()
        self.stop_event = threading.Event()

    @property
    def default_sens_mode(self) -> str:
        """The fast metric everywhere (its ranks agree with the exhaustive one's: bench/results/scale_*.md)."""
        return "fast"

    # models -------------------------------------------------------------------------------------------------
    def pipeline(self, model: str):
        """(pipe, ModelInfo) for a MODEL string; loaded once, the last `max_models` kept."""
        from .diffusers_host.models import load_pipeline, resolve_model

        name = (model or "digits").strip() or "digits"
        _, path = resolve_model(name)
        with self._lock:
            if path in self._pipes:
                self._pipes.move_to_end(path)
                return self._pipes[path]
            pipe = load_pipeline(name, device=self.device, dtype=self.dtype, offload=self.offload)
            entry = (pipe, self._model_info(pipe, name, path))
            self._pipes[path] = entry
            while len(self._pipes) > self.max_models:
                self._pipes.popitem(last=False)
            return entry

    @staticmethod
    def _model_info(pipe, name: str, path: str) -> ModelInfo:
        from ..quant import engine
        from .digits import DIGITS_DIR

        unet = denoiser_of(pipe)
        try:
            sizes = engine.model_sizes(unet)
        except MixQuantError:
            raise MixQuantError(f"{name}: its denoiser has no Linear/Conv2d layers MixQuant can quantize.") from None
        from .diffusers_host.runner import native_size

        h, w = native_size(pipe)
        try:
            is_digits = os.path.samefile(path, DIGITS_DIR)
        except OSError:
            is_digits = False
        return ModelInfo(name, path, sizes, (w, h), is_digits)

    def default_prompts(self, info: ModelInfo) -> list[str]:
        return DIGITS_PROMPTS if (info.is_digits or info.image_size[0] <= 32) else GENERIC_PROMPTS

    def budget_range(self, info: ModelInfo, unit: str) -> dict:
        """Slider bounds and a default for a unit."""
        if unit == UNIT_MB:
            lo = math.ceil(info.min_mb * 100) / 100
            hi = math.floor(info.fp16_mb * 100) / 100
            step = 0.01 if hi < 100 else 1.0
            default = self.estimate(info, UNIT_BITS, max(4.0, info.min_bits))["mb"]
            return {"minimum": lo, "maximum": max(hi, lo + step), "step": step,
                    "value": round(min(max(default, lo), hi), 2)}
        lo = math.ceil(info.min_bits * 10) / 10
        return {"minimum": lo, "maximum": 8.0, "step": 0.1, "value": max(4.0, lo)}

    @staticmethod
    def estimate(info: ModelInfo, unit: str, value: float) -> dict:
        """Size / bits of a budget before sensitivity is known (no scales counted: a lower bound)."""
        if unit == UNIT_MB:
            return {"mb": value, "avg_w_bits": info.sizes.bits_of_mb(value)}
        return {"mb": info.sizes.mb_of_bits(value), "avg_w_bits": value}

    # calibration --------------------------------------------------------------------------------------------
    def _progress(self, callback):
        from ..quant.runner import Progress

        self.stop_event.clear()
        return Progress(callback=callback, should_stop=self.stop_event.is_set)

    def _config(self, s: Settings, unit: str | None = None, value: float | None = None):
        from ..quant import engine

        budget = {"budget_mb": float(value)} if unit == UNIT_MB else {"avg_w_bits": float(value or 4.0)}
        return engine.QuantizeConfig(a_bits=s.a_bits, sens_mode=s.sens_mode, cache_dir=self.cache_dir, **budget)

    def calibrate(self, s: Settings, progress=None) -> CalibResult:
        """Run the FP sampler on the prompts (activation ranges) and measure every layer's sensitivity with the same
        settings quantize_pipeline uses, so that quantizing later finds them in the on-disk cache; then the
        predicted quality/size curve from those sensitivities (no sampling)."""
        from ..quant import engine
        from .diffusers_host.runner import PipelineRunner

        pipe, info = self.pipeline(s.model)
        cfg = self._config(s)
        cfg.check()
        runner = PipelineRunner(pipe, s.sampler())
        prepared = engine.prepare(runner, list(s.prompts), cfg, s.seeds, self._progress(progress))
        return CalibResult(s, prepared, prepared.curve(cfg),
                           {**prepared.timings, "sensitivity_cached": prepared.sens.cached})

    def predict(self, info: ModelInfo, cal: CalibResult | None, unit: str, value: float) -> dict:
        """Predicted size (and quality, once sensitivity is known) of a budget."""
        out = {"unit": unit, "value": value, "exact": False, **self.estimate(info, unit, value)}
        lowest = info.min_mb if unit == UNIT_MB else info.min_bits
        if value < lowest - 1e-9:
            out["infeasible"] = (f"below the smallest feasible budget for this model "
                                 f"({math.ceil(lowest * 100) / 100:.2f} {'MB' if unit == UNIT_MB else 'bits'}).")
            return out
        if cal is None:
            return out
        try:
            pred = cal.prepared.what_if(self._config(cal.settings, unit, value))
        except MixQuantError as e:
            out["infeasible"] = str(e)
            return out
        out.update(exact=True, **{k: v for k, v in pred.items() if k != "plan"})
        return out

    # quantize and compare -----------------------------------------------------------------------------------
    def quantize(self, s: Settings, unit: str, value: float, progress=None, cal: CalibResult | None = None) -> QuantResult:
        from .diffusers_host.api import quantize_pipeline
        from .diffusers_host.harness import compare_pipelines
        from .diffusers_host.runner import PipelineRunner

        pipe, info = self.pipeline(s.model)
        budget = {"budget_mb": float(value)} if unit == UNIT_MB else {"avg_w_bits": float(value)}
        sampler = s.sampler()
        prog = self._progress(progress)
        t0 = time.time()
        qpipe, report = quantize_pipeline(pipe, list(s.prompts), a_bits=s.a_bits, sampler=sampler, seeds=s.seeds,
                                          evaluate=False, model_name=info.name, progress=prog.callback,
                                          should_stop=prog.should_stop, sens_mode=s.sens_mode,
                                          cache_dir=self.cache_dir,
                                          prepared=cal.prepared if cal is not None and cal.settings == s else None,
                                          **budget)
        t_quant = time.time() - t0
        shown = list(s.prompts[:GALLERY_MAX])
        if progress:
            progress(0, 3, "comparing FP and quantized images")
        prog.check()
        q = compare_pipelines(pipe, qpipe, shown, [s.seed], steps=s.steps, guidance=s.guidance,
                              scheduler=s.scheduler, negative_prompt=s.negative_prompt or None, return_images=True)
        report["quality"].update({k: v for k, v in q.items() if isinstance(v, (int, float)) or v is None})
        fp_images, q_images = q.pop("fp_images"), q.pop("q_images")
        # real time: the same prompts and seeds through each pipeline (both warm after the comparison)
        timing = {}
        for i, (label, p) in enumerate((("fp", pipe), ("quantized", qpipe))):
            if progress:
                progress(i + 1, 3, f"timing the {label} pipeline")
            prog.check()
            timing[label] = self._timed_sample(p, PipelineRunner, sampler, shown, [s.seed] * len(shown))
        numbers = {
            "model": info.name, "device": self.device, "n_images": len(shown), "steps": s.steps,
            "sens_mode": s.sens_mode,
            "avg_w_bits": report["avg_w_bits"], "avg_a_bits": report["avg_a_bits"],
            "bytes_fp16": report["bytes_fp16"], "bytes_quantized": report["bytes_quantized"],
            "size_ratio": report["bytes_quantized"] / report["bytes_fp16"],
            "memory_fp_bytes": model_bytes(denoiser_of(pipe)),
            "memory_quantized_bytes": model_bytes(denoiser_of(qpipe)),
            "quality": {k: report["quality"].get(k) for k in
                        ("sqnr_db", "psnr_db", "ssim", "content_accuracy_fp", "content_accuracy",
                         "predicted_sqnr_db", "predicted_ssim")},
            "time_s": {"fp_sampling": timing["fp"]["total"], "quantized_sampling": timing["quantized"]["total"],
                       "fp_denoiser": timing["fp"]["denoiser"], "quantized_denoiser": timing["quantized"]["denoiser"],
                       "quantize": t_quant, **{f"peak_{k}_bytes": v["peak"] for k, v in timing.items()
                                               if v.get("peak")}},
            "timings_s": report["timings_s"], "sensitivity_cached": report.get("sensitivity_cached"),
            "speed": report.get("speed"),
        }
        report["demo"] = numbers
        return QuantResult(s, qpipe, report, {**numbers, "_images": (fp_images, q_images, shown)})

    def _timed_sample(self, pipe, runner_cls, sampler, prompts, seeds) -> dict:
        runner = runner_cls(pipe, sampler)
        unet, dev = denoiser_of(pipe), self.device
        acc = {"denoiser": 0.0, "t": 0.0}

        def pre(mod, args):
            _sync(dev)
            acc["t"] = time.perf_counter()

        def post(mod, args, out):
            _sync(dev)
            acc["denoiser"] += time.perf_counter() - acc["t"]

        h1, h2 = unet.register_forward_pre_hook(pre), unet.register_forward_hook(post)
        peak = None
        try:
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            _sync(dev)
            t0 = time.perf_counter()
            runner.sample(prompts, seeds)
            _sync(dev)
            total = time.perf_counter() - t0
            if dev.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated()
        finally:
            h1.remove()
            h2.remove()
        return {"total": total, "denoiser": acc["denoiser"], "peak": peak}

    # save ---------------------------------------------------------------------------------------------------
    def default_file_name(self, result: QuantResult) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(result.settings.model.split("+")[0].rstrip("/\\")))
        base = re.sub(r"\.safetensors$", "", base) or "model"
        return f"{base}-w{result.report['avg_w_bits']:.2f}a{result.settings.a_bits}.safetensors"

    def save(self, result: QuantResult, name: str) -> tuple[str, str, int]:
        """Write the quantized denoiser (atomically) and its report under the output folder; returns
        (file, report file, bytes on disk)."""
        from .diffusers_host.files import save_outputs

        name = (name or "").strip() or self.default_file_name(result)
        if os.path.basename(name) != name or name.startswith(".") or not re.fullmatch(r"[A-Za-z0-9_.\- ]+", name):
            raise MixQuantError(f"{name!r} is not a plain file name: use letters, digits, '-', '_' and '.' only (the "
                                f"file is written into {self.out_dir}; start the demo with --out-dir to change it).")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise MixQuantError(f"cannot create the output folder {self.out_dir}: {e.strerror}; start the demo with "
                                "--out-dir pointing to a writable folder.") from None
        path = os.path.join(self.out_dir, name)
        pipe, _ = self.pipeline(result.settings.model)
        report_path = path[: -len(".safetensors")] + ".report.json"
        report = dict(result.report)
        try:
            size = save_outputs(denoiser_of(pipe), denoiser_of(result.qpipe), report, path, report_path,
                                result.settings.model)
        except OSError as e:
            raise MixQuantError(f"cannot write {path}: {e.strerror}; free some disk space or choose another "
                                "--out-dir.") from None
        return path, report_path, size


# ------------------------------------------------------------------------------------------------------------------
# figures and tables (matplotlib, Agg, no pyplot state)
# ------------------------------------------------------------------------------------------------------------------
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure_to_image(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.3)  # room for the image's buttons
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def curve_image(curve: list, info: ModelInfo, marker: dict | None = None, title: str = "", proxy: bool = False):
    """Predicted quality vs size: predicted SSIM (content layers) and SQNR (quality layers) from the sensitivities.
    proxy: the sensitivities are estimates (fast or local mode), so the two numbers only rank budgets.
    None without matplotlib."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure

    pts = [c for c in curve if c.get("bytes")]
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot(111)
    ax2 = ax.twinx()
    ax.set_title(title or ("predicted quality / size" + (" (estimated sensitivity: a proxy)" if proxy else "")),
                 fontsize=9)
    if pts:
        x = [c["bytes"] / 1e6 for c in pts]
        ax.plot(x, [c["predicted_ssim"] for c in pts], "o-", color="tab:blue",
                label="content score (proxy)" if proxy else "predicted SSIM (content layers)")
        sq = [c["predicted_sqnr_db"] if math.isfinite(c["predicted_sqnr_db"]) else float("nan") for c in pts]
        ax2.plot(x, sq, "s--", color="tab:orange",
                 label="quality-layer SNR dB (proxy)" if proxy else "predicted SQNR dB (quality layers)")
        for c, xi in zip(pts, x):
            ax.annotate(f"{c['budget_w_bits']:g}b", (xi, c["predicted_ssim"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7, color="tab:blue")
    if marker and marker.get("exact"):
        ax.axvline(marker["mb"], color="tab:green", lw=1.5)
        ax.plot([marker["mb"]], [marker["predicted_ssim"]], "*", color="tab:green", ms=14,
                label=marker.get("label", "your budget"))
    ax.axvline(info.fp16_mb, color="gray", ls=":", lw=1)
    ax.text(info.fp16_mb, 0.5, "FP16 size ", color="gray", fontsize=8, va="center", ha="right", rotation=90,
            transform=ax.get_xaxis_transform())
    ax.set_xlabel("denoiser size (MB)")
    ax.set_ylabel("content score (proxy)" if proxy else "predicted SSIM vs FP", color="tab:blue")
    ax2.set_ylabel("quality-layer SNR dB (proxy)" if proxy else "predicted SQNR (dB)", color="tab:orange")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _figure_to_image(fig)


def bit_chart_image(layers: list[dict]):
    """Per-layer weight bits (bars, coloured by role) and activation bits (dots), in model order (None without
    matplotlib)."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(layers)
    fig = Figure(figsize=(min(18, max(6.4, 0.09 * n + 2)), 3.2))
    ax = fig.add_subplot(111)
    colors = ["#bbbbbb" if ly.get("protected") else ("#d62728" if ly["role"] == "content" else "#1f77b4")
              for ly in layers]
    ax.bar(range(n), [ly["w_bits"] for ly in layers], color=colors, width=0.85)
    ax.plot(range(n), [ly["a_bits"] for ly in layers], "k.", ms=3, label="activation bits")
    ax.set_yticks([2, 4, 8, 16])
    ax.set_ylim(0, 17)
    ax.set_xlim(-1, n)
    ax.set_xlabel(f"layer (model order, {n} layers)")
    ax.set_ylabel("bits")
    ticks = list(range(0, n, max(1, n // 12)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short(layers[i]["name"]) for i in ticks], rotation=30, ha="right", fontsize=6)
    handles = [Patch(color="#d62728", label="content layer (weight bits)"),
               Patch(color="#1f77b4", label="quality layer (weight bits)"),
               Patch(color="#bbbbbb", label="kept 16-bit")] + ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    fig.suptitle("bits per layer", fontsize=9, y=1.04)
    return _figure_to_image(fig)


def _short(name: str) -> str:
    return (name.replace("down_blocks", "down").replace("up_blocks", "up").replace("mid_block", "mid")
            .replace("transformer_blocks", "tb").replace("attentions", "att"))


def _mb(b) -> str:
    return f"{b / 1e6:.3f} MB" if b < 1e8 else f"{b / 1e9:.2f} GB"


def _num(v, fmt="{:.3f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "∞" if v > 0 else "–"
    return fmt.format(v)


def numbers_markdown(n: dict) -> str:
    q, t = n["quality"], n["time_s"]
    rows = [
        "| | FP | quantized | ratio |", "|---|---:|---:|---:|",
        f"| denoiser size (deployed, floats in fp16) | {_mb(n['bytes_fp16'])} | {_mb(n['bytes_quantized'])} | "
        f"{n['size_ratio']:.3f}× |",
        f"| denoiser tensors in memory now ({n['device']}) | {_mb(n['memory_fp_bytes'])} | "
        f"{_mb(n['memory_quantized_bytes'])} | {n['memory_quantized_bytes'] / n['memory_fp_bytes']:.3f}× |",
        f"| denoiser time, {n['n_images']} images × {n['steps']} steps | {t['fp_denoiser']:.2f} s | "
        f"{t['quantized_denoiser']:.2f} s | {t['quantized_denoiser'] / max(t['fp_denoiser'], 1e-9):.2f}× |",
        f"| whole sampling time (text encoder + denoiser + VAE) | {t['fp_sampling']:.2f} s | "
        f"{t['quantized_sampling']:.2f} s | {t['quantized_sampling'] / max(t['fp_sampling'], 1e-9):.2f}× |",
    ]
    if t.get("peak_fp_bytes"):
        rows.append(f"| peak GPU memory while sampling | {_mb(t['peak_fp_bytes'])} | "
                    f"{_mb(t['peak_quantized_bytes'])} | {t['peak_quantized_bytes'] / t['peak_fp_bytes']:.3f}× |")
    full = n.get("sens_mode") == "full"
    out = [f"**Average bits:** weights {n['avg_w_bits']:.2f}, activations {n['avg_a_bits']:.2f}",
           "",
           "**Quality vs FP** (same prompts and seeds): "
           f"SQNR {_num(q['sqnr_db'], '{:.2f}')} dB"
           + (f" (predicted {_num(q['predicted_sqnr_db'], '{:.2f}')})" if full else "")
           + f", PSNR {_num(q['psnr_db'], '{:.2f}')} dB, SSIM {_num(q['ssim'])}"
           + (f" (predicted {_num(q['predicted_ssim'])})" if full else "")
           + (f", digit read correctly: FP {q['content_accuracy_fp']:.0%}, quantized {q['content_accuracy']:.0%}"
              if q.get("content_accuracy") is not None else ""),
           "", *rows, ""]
    if n.get("speed"):
        out.append("**Speed (one denoiser call):** " + speed_text(n["speed"]).replace("\n", "  \n") + "")
        out.append("")
    tq = n["timings_s"]
    out.append(f"_Quantizing took {t['quantize']:.1f} s (calibrate {tq.get('calibrate', 0):.1f} s, sensitivity "
               + ("from cache" if n.get("sensitivity_cached") else f"{tq.get('sensitivity', 0):.1f} s")
               + f", allocate {tq.get('allocate', 0):.1f} s)._")
    return "\n".join(out)


def prediction_markdown(p: dict, info: ModelInfo, cal: CalibResult | None, stale: bool) -> str:
    if p.get("infeasible"):
        return f"**Not feasible:** {p['infeasible']}"
    ratio = p["mb"] / info.fp16_mb
    size = (f"**Predicted size:** {p['mb']:.3f} MB of {info.fp16_mb:.3f} MB FP16 ({ratio:.1%}), "
            f"average {p['avg_w_bits']:.2f} weight bits")
    if p.get("exact"):
        size += f", {p['avg_a_bits']:.2f} activation bits  \n"
        if p.get("speed"):
            size += "**Speed:** " + speed_text(p["speed"]).replace("\n", "  \n") + "  \n"
        if cal is not None and cal.settings.sens_mode != "full":
            return size + (f"**Predicted ({cal.settings.sens_mode} sensitivity, a proxy for ranking budgets):** "
                           f"content score {p['predicted_ssim']:.3f}, quality-layer SNR {_num(p['predicted_sqnr_db'], '{:.1f}')} "
                           "dB. The real SSIM / SQNR come after quantizing.")
        return size + (f"**Predicted quality:** SSIM {p['predicted_ssim']:.4f}, SQNR "
                       f"{_num(p['predicted_sqnr_db'], '{:.1f}')} dB (from the measured sensitivities; the real "
                       "numbers come after quantizing)")
    note = ("settings changed since calibration: calibrate again to see the predicted quality."
            if stale and cal is not None else "calibrate to see the predicted quality and the quality/size curve.")
    return size.replace("**Predicted size:**", "**Estimated size:** ≈") + " (before scales)  \n_" + note + "_"


def calib_markdown(cal: CalibResult, info: ModelInfo) -> str:
    s, t = cal.settings, cal.seconds
    sens = "from cache" if t["sensitivity_cached"] else f"{t['sensitivity']:.1f} s"
    return (f"**Calibrated** {info.name} on {len(s.prompts)} prompts × {s.steps} steps ({s.scheduler}, guidance "
            f"{s.guidance:g}) in {t['calibrate']:.1f} s; sensitivity of {len(info.layers)} layers ({s.sens_mode}): "
            f"{sens}. Pick a budget, then quantize.")


def model_markdown(info: ModelInfo) -> str:
    roles = {r: sum(1 for li in info.layers if li.role == r) for r in ("content", "quality")}
    return (f"**{info.name}** ({info.path}): denoiser {info.fp16_mb:.3f} MB in FP16, {len(info.layers)} quantizable "
            f"layers ({roles['content']} content, {roles['quality']} quality), images "
            f"{info.image_size[0]}×{info.image_size[1]}. Smallest feasible budget: {info.min_bits:.2f} bits "
            f"/ {info.min_mb:.3f} MB.")


def to_gallery(images, prompts) -> list:
    """(image upscaled with nearest-neighbour for viewing, prompt) pairs; PNG via the gallery's format."""
    from PIL import Image

    from .diffusers_host.images import upscale_for_viewing

    out = []
    for img, p in zip(images, prompts):
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        out.append((upscale_for_viewing(Image.fromarray(arr)), p))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Gradio wiring
# ------------------------------------------------------------------------------------------------------------------
def _user_errors(fn):
    """MixQuantError -> gr.Error with its message (it says what to do); anything else -> gr.Error with a pointer to
    the terminal's traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MixQuantError as e:
            raise gr.Error(str(e), title="MixQuant") from None
        except torch.cuda.OutOfMemoryError:
            raise gr.Error("out of GPU memory: use fewer prompts or steps, a smaller model, or start the demo with "
                           "--device cpu.", title="MixQuant") from None
        except Exception as e:  # noqa: BLE001
            log.exception("demo: unexpected error")
            raise gr.Error(f"unexpected error ({type(e).__name__}: {e}). The traceback is in the terminal running "
                           "`mixquant demo`; please report it.", title="MixQuant") from None

    return wrapper


def _gr_progress(progress):
    def cb(done, total, phase):
        progress((done, max(total, 1)), desc=phase)

    return cb


CSS = """
/* the two galleries side by side: small square thumbnails, all of them visible without scrolling */
#mq-gallery-fp .grid-container, #mq-gallery-q .grid-container {
  grid-template-columns: repeat(var(--grid-cols), minmax(40px, 1fr)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important; }
#mq-gallery-fp .fixed-height, #mq-gallery-q .fixed-height { min-height: 120px !important; max-height: none !important; }
#mq-gallery-fp .grid-wrap, #mq-gallery-q .grid-wrap { overflow-y: visible !important; padding-top: 2.4em !important; }
#mq-gallery-fp img, #mq-gallery-q img { image-rendering: pixelated; }
#mq-gallery-fp .caption-label, #mq-gallery-q .caption-label { display: none; }  /* the prompt shows in the preview */
.mq-step { margin-top: 0.6em; }
"""


def theme():
    """The default theme with system fonts only: the page loads nothing from the internet."""
    import gradio as gr

    return gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                             font_mono=("ui-monospace", "Consolas", "monospace"))


def build_app(backend: DemoBackend | None = None, *, prompts: list[str] | None = None, steps: int = 8,
              sens_mode: str | None = None):
    """The Blocks app. The default model is loaded here (so the first click is fast and a missing model fails the
    launch with its message)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    be = backend or DemoBackend()
    _, info0 = be.pipeline(be.default_model)
    prompts0 = prompts or be.default_prompts(info0)
    sens0 = SENS_MODES[sens_mode or be.default_sens_mode]
    rng0, rngm = be.budget_range(info0, UNIT_BITS), be.budget_range(info0, UNIT_MB)
    pred0 = prediction_markdown(be.predict(info0, None, UNIT_BITS, rng0["value"]), info0, None, False)

    def session(state):
        return state if isinstance(state, Session) else Session()

    def budget(unit, bits, mb) -> float:
        return float(mb if unit == UNIT_MB else bits)

    @_user_errors
    def load_model(state, model, prompts_text, unit, progress=gr.Progress()):
        """Load a model (or switch back to one already loaded); resets calibration and results."""
        st = Session()
        progress(0, desc=f"loading {model}")
        _, info = be.pipeline(model)
        old = [ln.strip() for ln in (prompts_text or "").splitlines() if ln.strip()]
        text = prompts_text
        if old in (DIGITS_PROMPTS, GENERIC_PROMPTS) or not old:  # still the defaults: take the new model's
            text = "\n".join(be.default_prompts(info))
        rb, rm = be.budget_range(info, UNIT_BITS), be.budget_range(info, UNIT_MB)
        pred = prediction_markdown(be.predict(info, None, unit, (rm if unit == UNIT_MB else rb)["value"]), info,
                                   None, False)
        return (st, model_markdown(info), text, gr.update(**rb), gr.update(**rm), pred, None,
                "Not calibrated yet for this model.")

    @_user_errors
    def calibrate(state, model, prompts_text, steps, guidance, scheduler, seed, neg, a_bits, sens, unit, bits, mb,
                  progress=gr.Progress()):
        """Step 2: the FP sampling run on the prompts + per-layer sensitivity (cached), then the predicted curve."""
        st = session(state)
        s = read_settings(model, prompts_text, steps, guidance, scheduler, seed, neg, a_bits, sens)
        progress(0, desc="loading the model")
        _, info = be.pipeline(s.model)
        cal = be.calibrate(s, _gr_progress(progress))
        st.calib = cal
        p = be.predict(info, cal, unit, budget(unit, bits, mb))
        return (st, calib_markdown(cal, info), prediction_markdown(p, info, cal, False),
                curve_image(cal.curve, info, p, proxy=s.sens_mode != "full"))

    @_user_errors
    def preview(state, model, prompts_text, steps, guidance, scheduler, seed, neg, a_bits, sens, unit, bits, mb):
        """Step 3: predicted size (and quality, once calibrated with these settings) of the budget."""
        st = session(state)
        s = read_settings(model, prompts_text, steps, guidance, scheduler, seed, neg, a_bits, sens)
        _, info = be.pipeline(s.model)
        cal = st.calib if (st.calib is not None and st.calib.settings.model == s.model) else None
        fresh = cal is not None and cal.settings == s
        p = be.predict(info, cal if fresh else None, unit, budget(unit, bits, mb))
        img = (curve_image(cal.curve, info, p if fresh else None, proxy=cal.settings.sens_mode != "full")
               if cal is not None else None)
        return prediction_markdown(p, info, cal, not fresh), img

    @_user_errors
    def change_unit(state, model, unit, bits, mb):
        """Show the slider of the unit, set to the budget of the other one expressed in this unit."""
        _, info = be.pipeline(model)
        old = UNIT_MB if unit == UNIT_BITS else UNIT_BITS
        est = be.estimate(info, old, budget(old, bits, mb))
        rng = be.budget_range(info, unit)
        v = est["mb"] if unit == UNIT_MB else est["avg_w_bits"]
        v = round(min(max(v, rng["minimum"]), rng["maximum"]), 2 if unit == UNIT_MB else 1)
        return (gr.update(visible=unit == UNIT_BITS, **({"value": v} if unit == UNIT_BITS else {})),
                gr.update(visible=unit == UNIT_MB, **({"value": v} if unit == UNIT_MB else {})))

    @_user_errors
    def quantize(state, model, prompts_text, steps, guidance, scheduler, seed, neg, a_bits, sens, unit, bits, mb,
                 progress=gr.Progress()):
        """Step 4: quantize under the budget, then FP vs quantized on the same prompts and seeds."""
        value = budget(unit, bits, mb)
        st = session(state)
        s = read_settings(model, prompts_text, steps, guidance, scheduler, seed, neg, a_bits, sens)
        progress(0, desc="loading the model")
        _, info = be.pipeline(s.model)
        lowest = info.min_mb if unit == UNIT_MB else info.min_bits
        if float(value) < lowest - 1e-9:
            raise MixQuantError(f"the budget {value:g} is below the smallest feasible one for this model "
                                f"({math.ceil(lowest * 100) / 100:.2f}): move the slider up.")
        res = be.quantize(s, unit, value, _gr_progress(progress), cal=st.calib)
        st.result = res
        fp_images, q_images, shown = res.numbers["_images"]
        numbers = {k: v for k, v in res.numbers.items() if k != "_images"}
        label = f"W{numbers['avg_w_bits']:.2f} A{numbers['avg_a_bits']:.1f}"
        curve = res.report.get("curve") or []
        head = f"### FP vs quantized ({label}): same prompts, same seed ({s.seed})"
        return (st, head, to_gallery(fp_images, shown), to_gallery(q_images, shown),
                numbers_markdown(numbers), bit_chart_image(res.report["layers"]), json_safe(numbers),
                curve_image(curve, info, _as_quantized(res.report), proxy=s.sens_mode != "full"),
                be.default_file_name(res))

    @_user_errors
    def save(state, name, progress=gr.Progress()):
        """Step 5: write the quantized file (atomically) and its report into the output folder."""
        st = session(state)
        if st.result is None:
            raise MixQuantError("nothing to save yet: quantize first (step 4).")
        progress(0, desc="writing the file")
        path, report_path, size = be.save(st.result, name)
        return [path, report_path], f"**Wrote** `{path}` ({size / 1e6:.3f} MB) and its report `{report_path}`."

    def stop():
        be.stop_event.set()
        return "Stopping at the next safe point…"

    with gr.Blocks(title="MixQuant demo", analytics_enabled=False) as demo:
        state = gr.State(None)
        gr.Markdown("# MixQuant: mixed-precision quantization of a diffusion model\n"
                    "Calibrate on your own prompts, measure how sensitive each layer is, pick a memory budget, and "
                    "compare the FP and quantized images for the same seeds before you use the quantized model.")
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                gr.Markdown("### 1 · Model, prompts and sampler")
                with gr.Row():
                    model_box = gr.Textbox(value=be.default_model, label="Model", scale=4,
                                           info="`digits` (embedded), a diffusers folder, or a single-file "
                                                ".safetensors checkpoint (SD1.x, SD2.x, SDXL, Flux.1, SD3; a "
                                                "diffusion model and its text-encoder / VAE files joined with "
                                                "'+'), loaded offline",
                                           elem_id="mq-model")
                    load_btn = gr.Button("Load", scale=1, elem_id="mq-load")
                model_md = gr.Markdown(model_markdown(info0), elem_id="mq-model-info")
                prompts_box = gr.Textbox(value="\n".join(prompts0), lines=6, max_lines=20,
                                         label="Prompts (one per line)", elem_id="mq-prompts")
                with gr.Row():
                    steps_in = gr.Slider(1, 50, value=steps, step=1, label="Steps", elem_id="mq-steps")
                    guidance_in = gr.Number(value=4.0, label="Guidance", minimum=0, elem_id="mq-guidance")
                with gr.Row():
                    scheduler_in = gr.Dropdown(["auto", "dpm", "ddim", "euler"], value="auto", label="Sampler",
                                               info="auto: dpm, or Flux/SD3's own flow-matching Euler")
                    seed_in = gr.Number(value=0, precision=0, label="Seed (prompt i uses seed + i)",
                                        elem_id="mq-seed")
                with gr.Accordion("More settings", open=False):
                    neg_in = gr.Textbox(value="", label="Negative prompt")
                    a_bits_in = gr.Radio([8, 16, 4], value=8, label="Activation bits (16 = weight-only)")
                    sens_in = gr.Radio(list(SENS_MODES.values()), value=sens0, label="Sensitivity measurement")
                gr.Markdown("### 2 · Calibrate", elem_classes="mq-step")
                with gr.Row():
                    calib_btn = gr.Button("Calibrate", variant="primary", elem_id="mq-calibrate", scale=3)
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="mq-stop", scale=1)
                calib_md = gr.Markdown("Not calibrated yet.", elem_id="mq-calib-status")
                gr.Markdown("### 3 · Budget", elem_classes="mq-step")
                unit_in = gr.Radio([UNIT_BITS, UNIT_MB], value=UNIT_BITS, label="Budget in", elem_id="mq-unit")
                bits_in = gr.Slider(rng0["minimum"], rng0["maximum"], value=rng0["value"], step=rng0["step"],
                                    label="Budget: average weight bits", elem_id="mq-budget-bits")
                mb_in = gr.Slider(rngm["minimum"], rngm["maximum"], value=rngm["value"], step=rngm["step"],
                                  label="Budget: MB of the whole denoiser", visible=False, elem_id="mq-budget-mb")
                pred_md = gr.Markdown(pred0, elem_id="mq-prediction")
                curve_img = gr.Image(None, label="Predicted quality / size curve", type="pil", format="png",
                                     interactive=False, show_label=False, elem_id="mq-curve")
                gr.Markdown("### 4 · Quantize", elem_classes="mq-step")
                quant_btn = gr.Button("Quantize and compare", variant="primary", elem_id="mq-quantize")
            with gr.Column(scale=4, min_width=480):
                head_md = gr.Markdown("### FP vs quantized, same prompts and seeds", elem_id="mq-compare-head")
                with gr.Row():
                    gal_fp = gr.Gallery(label="FP (full precision)", format="png", columns=5, height="auto",
                                        object_fit="contain", elem_id="mq-gallery-fp", interactive=False)
                    gal_q = gr.Gallery(label="Quantized", format="png", columns=5, height="auto",
                                       object_fit="contain", elem_id="mq-gallery-q", interactive=False)
                numbers_md = gr.Markdown("Quantize to see quality, memory and time vs FP.", elem_id="mq-numbers")
                bits_img = gr.Image(None, label="Bits per layer", type="pil", format="png", interactive=False,
                                    show_label=False, elem_id="mq-bits")
                with gr.Accordion("All numbers (JSON)", open=False):
                    numbers_json = gr.JSON(label="numbers", elem_id="mq-json")
                gr.Markdown("### 5 · Save", elem_classes="mq-step")
                with gr.Row():
                    name_in = gr.Textbox(value="", label=f"File name (written into {be.out_dir})", scale=3,
                                         placeholder="digits-w4.00a8.safetensors", elem_id="mq-name")
                    save_btn = gr.Button("Save", scale=1, elem_id="mq-save")
                save_md = gr.Markdown("", elem_id="mq-save-status")
                file_out = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="mq-file")

        settings_in = [model_box, prompts_box, steps_in, guidance_in, scheduler_in, seed_in, neg_in, a_bits_in,
                       sens_in]
        job = dict(concurrency_id="mixquant-job", concurrency_limit=1)
        budget_in = [unit_in, bits_in, mb_in]
        load_btn.click(load_model, [state, model_box, prompts_box, unit_in],
                       [state, model_md, prompts_box, bits_in, mb_in, pred_md, curve_img, calib_md],
                       api_name="load_model", **job)
        calib_btn.click(calibrate, [state, *settings_in, *budget_in], [state, calib_md, pred_md, curve_img],
                        api_name="calibrate", **job)
        gr.on([bits_in.change, mb_in.change], preview, [state, *settings_in, *budget_in], [pred_md, curve_img],
              api_name="preview_budget", trigger_mode="always_last", show_progress="hidden")
        unit_in.change(change_unit, [state, model_box, *budget_in], [bits_in, mb_in], api_name="change_unit",
                       show_progress="hidden").then(
            preview, [state, *settings_in, *budget_in], [pred_md, curve_img], api_visibility="private",
            show_progress="hidden")
        quant_btn.click(quantize, [state, *settings_in, *budget_in],
                        [state, head_md, gal_fp, gal_q, numbers_md, bits_img, numbers_json, curve_img, name_in],
                        api_name="quantize", **job)
        save_btn.click(save, [state, name_in], [file_out, save_md], api_name="save", **job)
        stop_btn.click(stop, None, [calib_md], api_name="stop", concurrency_id="mixquant-stop",
                       concurrency_limit=None, show_progress="hidden")
    demo.mixquant_backend = be
    return demo


def _as_quantized(report: dict) -> dict:
    """The quantized plan as a point of the curve (same size accounting: packed weights + the rest in fp16)."""
    ly = report["layers"]
    size = sum(x["bytes"] for x in ly) + report["bytes_fp16"] - 2 * sum(x["params"] for x in ly)
    return {"exact": True, "mb": size / 1e6, "predicted_ssim": report["quality"].get("predicted_ssim", 0.0),
            "label": "quantized"}


__all__ = ["DemoBackend", "Settings", "build_app", "read_settings", "parse_prompts", "UNIT_BITS", "UNIT_MB",
           "theme", "CSS"]
