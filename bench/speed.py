"""Does a plan know its speed? Plans made with the speed target (quant/speed.py + the integer program), their
predicted speed against what they measure, and the quantized denoiser against the float one in the same process.

    python bench/speed.py                         # CPU: digits (default CLI plan and others) + SD1.5 architecture
    python bench/speed.py --models digits         # one of them
    python bench/speed.py --device cuda           # on a GPU (fp16): the same, the SD1.5 architecture at 1024 px

digits: the embedded model through the CLI's own call (quantize_pipeline) at the README's budget (4 bits, A8) and at
8 bits, each with the default speed target and with it off; one denoiser call (batch 2) of each plan timed against
the float one, whole sampling runs of the prompts, interleaved, and the CLI's own quality check (the prompts, seed 0).
sd15: the SD1.5-architecture UNet (real widths, random weights, the pipeline of bench/scale.py) at 32x32 latents
(256 px; 128x128 on a GPU), one prompt with classifier-free guidance (batch 2), 4 steps: FP, uniform W8A8 and the
default plan (avg W4, A8, speed target 1x) quantized and timed against FP on the same call, interleaved.

Writes bench/results/speed_<cpu|gpu>.md (the machine is named in it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_name  # noqa: E402

import torch  # noqa: E402

from mixquant.app.diffusers_host.models import load_pipeline  # noqa: E402
from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings  # noqa: E402
from mixquant.quant import engine  # noqa: E402
from mixquant.quant.apply import quantize_model, uniform_plan  # noqa: E402
from mixquant.quant.speed import compare_calls, race, timing_call  # noqa: E402

RESULTS = os.path.join(HERE, "results")
PROMPTS = [p.strip() for p in open(os.path.join(HERE, "..", "examples", "prompts.txt")) if p.strip()]


def _row(label, rep, measured_fp, measured, sampling=None) -> str:
    sp = rep["speed"] or {}
    err = _err(sp["predicted_speed"], measured_fp / measured) if sp else "—"
    return (f"| {label} | {rep['avg_w_bits']:.2f} / {rep['avg_a_bits']:.2f} | "
            f"{rep['bytes_quantized'] / rep['bytes_fp16']:.3f} | "
            + (f"{sp['predicted_speed']:.2f}× | " if sp else "— | ")
            + f"{measured_fp / measured:.2f}× ({measured * 1e3:.1f} / {measured_fp * 1e3:.1f} ms) | {err} | "
            + (f"{sampling:.2f}× | " if sampling is not None else "— | ")
            + (f"{rep['quality']['sqnr_db']:.1f} dB / {rep['quality']['ssim']:.3f} | " if "sqnr_db" in rep["quality"]
               else "— | ")
            + (("met" if sp["met"] else "not met: " + sp.get("note", "").split(": ", 1)[-1]) if sp else "off")
            + " |")


def _err(predicted_speed: float, measured_speed: float) -> str:
    # speeds, not milliseconds: each is relative to a float call timed alongside it, so a machine that runs 10%
    # slower during one of the two measurements does not show up as a prediction error
    return f"{(predicted_speed / measured_speed - 1) * 100:+.0f}%"


HEADER = ["| plan | avg bits W / A | size vs fp16 | predicted speed | measured speed (quantized / FP ms per call) | "
          "prediction error | sampling speed | SQNR / SSIM vs FP | speed target 1× |",
          "|---|---|---|---|---|---|---|---|---|"]


def digits(device: str, dtype: str) -> list[str]:
    from mixquant.app.diffusers_host.api import quantize_pipeline

    pipe = load_pipeline("digits", device=device, dtype=dtype)
    sampler = SamplerSettings()
    lines = [f"### digits ({len(PROMPTS)} prompts × {sampler.steps} steps, {pipe.unet.dtype}, {device})", "",
             *HEADER]
    runner = PipelineRunner(pipe, sampler)
    from mixquant.quant.calibration import calibrate
    call = timing_call(calibrate(runner, PROMPTS[:1], [0]).calls)  # one guided call (batch 2) to time each plan on
    for bits, speed in ((4, "auto"), (4, "off"), (8, "auto"), (8, "off")):
        t0 = time.time()
        cfg = dict(avg_w_bits=bits, a_bits=8, sampler=sampler, evaluate=True, speed=speed)
        qpipe, rep = quantize_pipeline(pipe, PROMPTS, **cfg)
        t = compare_calls({"fp": pipe.unet, "q": qpipe.unet}, call, rounds=5)
        qrunner = PipelineRunner(qpipe, sampler)
        seeds = list(range(len(PROMPTS)))
        with torch.no_grad():
            s = race({"fp": lambda: runner.sample(PROMPTS, seeds), "q": lambda: qrunner.sample(PROMPTS, seeds)},
                     torch.device(device), rounds=3, target=0.0)
        label = f"{bits} bits, A8, speed {speed}" + (" (README command)" if (bits, speed) == (4, "auto") else "")
        lines.append(_row(label, rep, t["fp"], t["q"], s["fp"] / s["q"]))
        print(lines[-1], f"({time.time() - t0:.0f} s)", flush=True)
    return lines + [""]


def sd15(device: str, dtype: torch.dtype, size: int) -> list[str]:
    from scale import random_pipeline

    pipe = random_pipeline("sd1", small=False, device=device, dtype=dtype)
    sampler = SamplerSettings(steps=4, width=size, height=size)
    runner = PipelineRunner(pipe, sampler)
    prompts = ["a photo of a cat sitting on a windowsill"]
    cfg = engine.QuantizeConfig(avg_w_bits=4, a_bits=8, sweep_seconds=0)
    t0 = time.time()
    prepared = engine.prepare(runner, prompts, cfg)
    alloc = engine.plan(runner, prepared, cfg)
    print(f"  prepared and planned in {time.time() - t0:.0f} s", flush=True)
    qplan, _ = engine.quantize(pipe.unet, alloc, prepared.calib)
    rep = engine.report(prepared, alloc, cfg, pipe.unet, qplan)
    layers = prepared.layers
    ranges = prepared.calib.ranges()
    w8, _ = quantize_model(pipe.unet, uniform_plan(layers, "W8A8"), ranges, search="minmax")
    call = timing_call(prepared.calib.calls)
    t = compare_calls({"fp": pipe.unet, "W8A8": w8, "plan": qplan}, call, rounds=3)
    w8_plan = {li.name: (engine.LayerFormat(16, 16) if li.protected else engine.LayerFormat(8, 8)) for li in layers}
    w8_pred = prepared.speed.predicted(w8_plan)
    sp = prepared.speed
    lat = size // 8
    lines = [f"### SD1.5-architecture UNet (real widths, random weights), {lat}×{lat} latents, batch 2, "
             f"{pipe.unet.dtype}, {device}", "",
             f"Speed table: {sp.shapes} distinct layer shapes timed in {sp.seconds:.0f} s on {sp.device}; one float "
             f"call {sp.fp_call * 1e3:.1f} ms, of which {sp.rest * 1e3:.1f} ms outside the quantizable layers. "
             "Inside the model a format ran at " + ", ".join(f"{k} {v:.2f}×" for k, v in sorted(sp.in_place.items()))
             + " its time alone (the factor the prediction applies).", "",
             "| denoiser | measured ms | speed vs FP | predicted speed | prediction error | weights MB (deployed) |",
             "|---|---|---|---|---|---|",
             f"| FP ({str(pipe.unet.dtype).replace('torch.', '')}) | {t['fp'] * 1e3:.1f} | 1.00× | — | — | "
             f"{engine.fp16_bytes(pipe.unet) / 1e6:.0f} (fp16) |",
             f"| W8A8 (uniform) | {t['W8A8'] * 1e3:.1f} | {t['fp'] / t['W8A8']:.2f}× | "
             f"{sp.fp_call / w8_pred:.2f}× | {_err(sp.fp_call / w8_pred, t['fp'] / t['W8A8'])} | "
             f"{engine.deploy_bytes(w8) / 1e6:.0f} |",
             f"| default plan: avg W{rep['avg_w_bits']:.2f} A{rep['avg_a_bits']:.2f}, speed target 1× | "
             f"{t['plan'] * 1e3:.1f} | {t['fp'] / t['plan']:.2f}× | {rep['speed']['predicted_speed']:.2f}× | "
             f"{_err(rep['speed']['predicted_speed'], t['fp'] / t['plan'])} | "
             f"{rep['bytes_quantized'] / 1e6:.0f} |", ""]
    counts = {}
    for li in rep["layers"]:
        counts[li["format"]] = counts.get(li["format"], 0) + 1
    lines.append("Default plan's formats: " + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
                 + ("" if rep["speed"]["met"] else f". {rep['speed']['note']}"))
    print("\n".join(lines), flush=True)
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="digits,sd15")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    cuda = args.device == "cuda"
    machine = (f"{torch.cuda.get_device_name()}" if cuda else
               f"{cpu_name()}, {torch.get_num_threads()} torch threads")
    models = set(args.models.split(","))
    lines = [f"## Speed of plans made with the speed target on {machine}", "",
             f"`python bench/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}` — torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}. Every plan here is made by quant/engine with the "
             "default speed target (the quantized denoiser no slower than the float one, `--speed auto "
             "--min-speed 1`) unless it says `speed off`. *Predicted*: the plan's time from the per-layer timings "
             "(quant/speed.py); *measured*: one denoiser call, best of interleaved rounds against the float model "
             "in the same process; *prediction error*: predicted over measured speed, each against its own float "
             "call; *sampling*: whole sampling runs of the prompts, interleaved.", ""]
    if "digits" in models:
        lines += digits(args.device, "fp16" if cuda else "fp32")
    if "sd15" in models:
        lines += sd15(args.device, torch.float16 if cuda else torch.float32, 1024 if cuda else 256)
    out = args.out or os.path.join(RESULTS, f"speed_{'gpu' if cuda else 'cpu'}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
