"""The method at scale: time and peak memory of each phase against plain FP sampling in the same process, and how
well the fast sensitivity agrees with the exhaustive one.

    python bench/scale.py                      # CPU: digits, SD1.5 (real size, 32x32 latents), SDXL (small widths)
    python bench/scale.py --agreement          # digits + SD1.5-architecture at small widths: fast/local vs full
    python bench/scale.py --models sdxl --real --size 1024 --prompts 8 --steps 20     # on a GPU (fp16)

Phases (`mixquant quantize`'s, through quant/engine): calibrate (one FP sampling run of the prompts, recorded),
sensitivity, allocate (the MILP plus the coupling sweep's image comparisons), quantize (packing). "x FP sampling" is
each phase's seconds over one plain FP sampling run of the same prompts; peak memory is the phase's peak over FP
sampling's (CPU: the process's resident high-water mark, reset before each phase through /proc/self/clear_refs; GPU:
torch.cuda.max_memory_allocated), both measured here, one after the other. Models with random weights are built
from the diffusers configs of tests/ldm_checkpoints.py (the real SD1.5 / SDXL widths, or reduced ones).

Agreement: each layer's loss per format from the fast (and local) sensitivity against the exhaustive MixDQ
measurement ("full"): Spearman rank correlation per role; and on digits the plans each one gives at average W4 A8,
quantized and scored against FP on held-out prompts (denoiser SQNR, image SSIM).

Writes bench/results/scale_<cpu|gpu>.md with its rows in scale_<cpu|gpu>.json (a model not run keeps its row from an
earlier run; each row's ratios are measured within one process), and scale_agreement.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_name  # noqa: E402

import torch  # noqa: E402

from mixquant.app.diffusers_host.models import load_pipeline  # noqa: E402
from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings  # noqa: E402
from mixquant.quant import engine  # noqa: E402

RESULTS = os.path.join(HERE, "results")
PROMPTS = [p.strip() for p in open(os.path.join(HERE, "..", "examples", "prompts.txt")) if p.strip()]
GENERIC = ["a photo of a cat sitting on a windowsill", "a watercolor painting of a lighthouse at dusk",
           "a bowl of fruit on a wooden table, studio lighting", "a portrait of an old sailor, oil painting",
           "a red vintage car in the rain", "a mountain lake at sunrise, mist", "an astronaut riding a horse",
           "a cozy library with tall bookshelves"]


def _ldm():
    spec = importlib.util.spec_from_file_location(
        "ldm_checkpoints", os.path.join(HERE, "..", "tests", "ldm_checkpoints.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def random_pipeline(family: str, small: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """A StableDiffusion(XL)Pipeline with random weights in the layout of `family` ("sd1" / "sdxl"), real widths or
    tests/ldm_checkpoints.py's reduced ones, the shipped CLIP tokenizer."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from mixquant.app.diffusers_host import single_file as sf

    cfg = _ldm().diffusers_configs(family, small)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"]).to(dtype).eval()
        vae = AutoencoderKL(**cfg["vae"]).to(dtype).eval()
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).to(dtype).eval()
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])).to(dtype).eval()
               if "text_encoder_2" in cfg else None)
    with tempfile.TemporaryDirectory() as d:
        sf.write_tokenizer(os.path.join(d, "t"), "<|endoftext|>")
        tok = CLIPTokenizer.from_pretrained(os.path.join(d, "t"))
        tok2 = None
        if te2 is not None:
            sf.write_tokenizer(os.path.join(d, "t2"), "!")
            tok2 = CLIPTokenizer.from_pretrained(os.path.join(d, "t2"))
    if te2 is not None:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet,
                                         scheduler=EulerDiscreteScheduler.from_config(sf.SCHEDULE))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler.from_config(sf.SCHEDULE), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Peak:
    """The peak memory of a stretch of code: CUDA's allocator peak on a GPU, else the process's resident high-water
    mark (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        m = re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())
        return int(m.group(1)) * 1024 if m else 0


def _gb(b: int) -> str:
    return f"{b / 2**30:.2f} GB"


def phases(name: str, pipe, prompts, settings: SamplerSettings, device: str, cfg: engine.QuantizeConfig) -> dict:
    peak = Peak(device)
    runner = PipelineRunner(pipe, settings)
    seeds = list(range(len(prompts)))
    row = {"model": name, "prompts": len(prompts), "steps": settings.steps, "size": settings.width,
           "layers": len(engine.discover_layers(pipe.unet))}
    with torch.no_grad():
        runner.sample(prompts[:1], seeds[:1])  # warm-up (kernels, allocator)
        peak.reset()
        t = time.time()
        runner.sample(prompts, seeds)
        row["fp_s"], row["fp_peak"] = time.time() - t, peak.read()
    done(row, "fp")
    peak.reset()
    t = time.time()
    prepared = engine.prepare(runner, prompts, cfg, seeds)
    row["prepare_s"], row["prepare_peak"] = time.time() - t, peak.read()
    row["calibrate_s"], row["sensitivity_s"] = prepared.timings["calibrate"], prepared.timings["sensitivity"]
    done(row, "prepare")
    peak.reset()
    t = time.time()
    alloc = engine.plan(runner, prepared, cfg)
    row["allocate_s"], row["allocate_peak"] = time.time() - t, peak.read()
    done(row, "allocate")
    peak.reset()
    t = time.time()
    qunet, stats = engine.quantize(pipe.unet, alloc, prepared.calib)
    row["quantize_s"], row["quantize_peak"] = time.time() - t, peak.read()
    row["total_s"] = row["prepare_s"] + row["allocate_s"] + row["quantize_s"]
    row["bytes_ratio"] = stats.model_bytes / max(1, engine.fp16_bytes(pipe.unet))
    print(row, flush=True)
    return row


def done(row: dict, phase: str) -> None:
    """Each phase's figures as soon as it ends (a run stopped at a time limit, as bench/gpu.py's steps are, still
    leaves the phases it finished in its log)."""
    secs, peak = row[phase + "_s"], row[phase + "_peak"]
    vs = "" if phase == "fp" else \
        f" ({peak / max(1, row['fp_peak']):.2f}x FP sampling's peak, {secs / max(1e-9, row['fp_s']):.1f}x its time)"
    print(f"  {row['model']}: {phase} {secs:.1f} s, peak {_gb(peak)}{vs}", flush=True)


def phase_table(rows: list, header: str) -> str:
    out = [header, "",
           "| model | layers | prompts x steps, px | FP sampling | calibrate | sensitivity | allocate | quantize | "
           "total (x FP sampling) | peak: FP sampling | calibrate+sensitivity | allocate | quantize |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp = r["fp_s"]
        out.append(
            f"| {r['model']} | {r['layers']} | {r['prompts']} x {r['steps']}, {r['size']} | {fp:.1f} s | "
            f"{r['calibrate_s']:.1f} s | {r['sensitivity_s']:.1f} s | {r['allocate_s']:.1f} s | "
            f"{r['quantize_s']:.1f} s | {r['total_s']:.0f} s ({r['total_s'] / fp:.1f}x) | {_gb(r['fp_peak'])} | "
            + " | ".join(f"{_gb(r[k])} ({r[k] / max(1, r['fp_peak']):.2f}x)"
                         for k in ("prepare_peak", "allocate_peak", "quantize_peak")) + " |")
    return "\n".join(out) + "\n"


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def agreement(name: str, pipe, prompts, settings, modes=("fast", "local"), evaluate=None) -> list:
    runner = PipelineRunner(pipe, settings)
    rows, prepared = [], {}
    cache = tempfile.mkdtemp(prefix="mq-scale-")
    for mode in ("full",) + tuple(modes):
        cfg = engine.QuantizeConfig(avg_w_bits=4, a_bits=8, sens_mode=mode, cache_dir=cache)
        t = time.time()
        prepared[mode] = engine.prepare(runner, prompts, cfg)
        sec = prepared[mode].timings["sensitivity"]
        row = {"model": name, "mode": mode, "sensitivity_s": sec, "prepare_s": time.time() - t}
        ref, s = prepared["full"].sens, prepared[mode].sens
        for role in ("content", "quality"):
            xs, ys = [], []
            for layer, table in ref.loss.items():
                if ref.role[layer] == role:
                    for f, v in table.items():
                        if f in s.loss.get(layer, {}):
                            xs.append(v)
                            ys.append(s.loss[layer][f])
            row[f"rho_{role}"] = _spearman(xs, ys) if mode != "full" else 1.0
            row[f"n_{role}"] = len(xs)
        if evaluate is not None:
            alloc = engine.plan(runner, prepared[mode], cfg)
            qunet, _ = engine.quantize(pipe.unet, alloc, prepared[mode].calib)
            row.update(evaluate(qunet))
            row["avg_w_bits"] = engine.report(prepared[mode], alloc, cfg, pipe.unet, qunet)["avg_w_bits"]
        print(row, flush=True)
        rows.append(row)
    return rows


def agreement_table(rows: list) -> str:
    out = ["| model | sensitivity | seconds | Spearman content (n) | Spearman quality (n) | plan at W4A8: SQNR dB | "
           "SSIM | avg w bits |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = (f"{r['sqnr_db']:.2f} | {r['ssim']:.4f} | {r['avg_w_bits']:.2f}" if "sqnr_db" in r else "— | — | —")
        out.append(f"| {r['model']} | {r['mode']} | {r['sensitivity_s']:.1f} | {r['rho_content']:.3f} "
                   f"({r['n_content']}) | {r['rho_quality']:.3f} ({r['n_quality']}) | {q} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,sd15,sdxl")
    ap.add_argument("--real", action="store_true", help="SDXL at its real widths (default: reduced on a CPU)")
    ap.add_argument("--size", type=int, default=None, help="image size in px (default: 256 on a CPU, 1024 on a GPU)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 4 on a CPU, 8 on a GPU)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 8 on a CPU, 20 on a GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--agreement", action="store_true")
    ap.add_argument("--eval-prompts", type=int, default=5, help="held-out prompts per digit (agreement on digits)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if gpu else "cpu"
    dtype = torch.float16 if gpu else torch.float32
    machine = torch.cuda.get_device_name() if gpu else cpu_name()
    os.makedirs(RESULTS, exist_ok=True)
    if args.agreement:
        return run_agreement(args, device, machine)
    size = args.size or (1024 if gpu else 256)
    n_prompts = args.prompts or (8 if gpu else 4)
    steps = args.steps or (20 if gpu else 8)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "digits":
            pipe = load_pipeline("digits", device=device, dtype=dtype)
            st = SamplerSettings(steps=steps, guidance=4.0, scheduler="dpm")
            prompts = (PROMPTS * 4)[:n_prompts]
        else:
            small = name == "sdxl" and not (args.real or gpu)
            pipe = random_pipeline({"sd15": "sd1", "sdxl": "sdxl"}[name], small, device, dtype)
            st = SamplerSettings(steps=steps, guidance=4.0, scheduler="dpm", width=size, height=size)
            prompts = (GENERIC * 2)[:n_prompts]
            name = f"{name} ({'reduced widths' if small else 'real widths'})"
        cfg = engine.QuantizeConfig(avg_w_bits=4, a_bits=8, cache_dir=tempfile.mkdtemp(prefix="mq-scale-"))
        rows.append(phases(name, pipe, prompts, st, device, cfg))  # (an empty cache: the sensitivity is measured)
        del pipe
        if gpu:
            torch.cuda.empty_cache()
    header = (f"# Scale: phases vs plain FP sampling\n\n{machine}; torch {torch.__version__}, {dtype}, "
              f"{torch.get_num_threads()} threads. Default settings (fast sensitivity, W4 A8 average, guidance 4, "
              "DPM-Solver++), random weights. Peak memory: " + ("CUDA allocator peak." if gpu else
                                                               "process resident high-water mark."))
    out = args.out or os.path.join(RESULTS, f"scale_{'gpu' if gpu else 'cpu'}.md")
    # the rows of models not run this time are kept from the last run (each row's ratios are within its own process)
    store = os.path.splitext(out)[0] + ".json"
    kept = [r for r in (json.load(open(store)) if os.path.isfile(store) else [])
            if r["model"] not in {x["model"] for x in rows}]
    rows = kept + rows
    with open(store, "w") as f:
        json.dump(rows, f, indent=1)
    text = phase_table(rows, header)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return 0


def run_agreement(args, device, machine) -> int:
    from mixquant.app.diffusers_host.harness import compare_pipelines
    from mixquant.app.diffusers_host.api import pipeline_with_denoiser
    from mixquant.app.digits import heldout_prompts

    torch.set_num_threads(1) if device == "cpu" else None
    pipe = load_pipeline("digits", device=device)
    st = SamplerSettings(steps=8, guidance=4.0, scheduler="dpm")
    by_digit = {}
    for p, dgt in heldout_prompts():
        by_digit.setdefault(dgt, []).append(p)
    ev = [by_digit[d][i % len(by_digit[d])] for d in range(10) for i in range(args.eval_prompts)]

    def evaluate(qunet):
        q = compare_pipelines(pipe, pipeline_with_denoiser(pipe, qunet), ev, [1000], steps=st.steps,
                              guidance=st.guidance, scheduler=st.scheduler)
        return {"sqnr_db": q["sqnr_db"], "ssim": q["ssim"]}

    rows = agreement("digits", pipe, PROMPTS, st, evaluate=evaluate)
    small = random_pipeline("sd1", True, device, torch.float32)
    rows += agreement("SD1.5 architecture, reduced widths (random weights)", small, GENERIC[:2],
                      SamplerSettings(steps=4, guidance=4.0, scheduler="dpm", width=64, height=64))
    text = (f"# Scale: the fast sensitivity against the exhaustive one\n\n{machine}; torch {torch.__version__}. "
            "digits: the 10 calibration prompts of examples/prompts.txt, DPM-Solver++ 8 steps, guidance 4; plans at "
            f"average W4 A8 scored on {len(ev)} held-out prompts (seed 1000) against FP. SD1.5 architecture at reduced "
            "widths (tests/ldm_checkpoints.py's sd1): 2 prompts, 4 steps, 64 px, ranks only (random weights draw "
            "noise).\n\n" + agreement_table(rows))
    out = args.out or os.path.join(RESULTS, "scale_agreement.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
