"""`mixquant quantize`: calibrate on your prompts, allocate bits under your budget, write the quantized file and a
report (architecture.md)."""
from __future__ import annotations

import os
import sys

from . import add_device_arguments, add_scheduler_argument


def add_arguments(p):
    p.add_argument("--model", default="digits",
                   help="digits (embedded), a diffusers folder, or a .safetensors checkpoint (SD1.x, SD2.x, SDXL, "
                        "Flux.1, SD3); a Flux / SD3 diffusion-model file joined to its text-encoder and VAE files "
                        "with '+' (flux1-dev.safetensors+clip_l.safetensors+t5xxl_fp16.safetensors+ae.safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a calibration prompt (repeat for more)")
    src.add_argument("--prompts-file", help="a text file with one prompt per line")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-w-bits", type=float, help="average weight bits over the quantizable layers")
    budget.add_argument("--budget-mb", type=float, help="size of the whole denoiser in MB (1e6 bytes)")
    p.add_argument("--a-bits", type=int, default=8, choices=(4, 8, 16), help="activation bits (16: weight-only)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.0)
    add_scheduler_argument(p)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--size", help="WxH of the images (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (the next prompts use seed+1, ...)")
    p.add_argument("--target", default="mixquant", choices=("mixquant", "comfyui-native"),
                   help="comfyui-native: only formats stock ComfyUI runs (for `mixquant export --to comfyui`)")
    p.add_argument("--act-groups", type=int, default=1, help="timestep groups with their own activation ranges")
    p.add_argument("--no-bos", action="store_true", help="do not compute the BOS token of to_k/to_v in FP")
    p.add_argument("--weight-search", default="best", choices=("best", "mse", "minmax"),
                   help="ranges of weights below 8 bits: MSE-clipped, full min-max, or best = the one whose images "
                        "come closer to FP on the calibration prompts (default)")
    p.add_argument("--sweep-seconds", type=float, default=None, metavar="S",
                   help="time the coupling sweep may spend sampling candidate plans (default: the larger of 60 s and "
                        "one calibration run; inf: the whole sweep; 0: the middle coupling, no sampling)")
    p.add_argument("--cache-dir", help="where sensitivity results are cached (default ~/.cache/mixquant)")
    p.add_argument("--no-eval", action="store_true", help="skip the FP-vs-quantized quality evaluation")
    add_device_arguments(p)
    p.add_argument("--sens-mode", default="fast", choices=("fast", "full", "local"),
                   help="sensitivity: fast = each layer's output noise weighted by its measured gain to the denoiser "
                        "output (content layers by large-scale structure, quality layers by all of it; default), "
                        "full = MixDQ's exhaustive metrics (content layers judged on final images, quality layers on "
                        "the denoiser output; one run per layer and format: the reference, hours at SDXL size), "
                        "local = each layer's own output noise")
    p.add_argument("--speed", default="auto", choices=("auto", "require", "off"),
                   help="speed on this device, measured per layer and format: auto = at least --min-speed x the "
                        "float model's speed where the budget allows it, else as fast as the budget allows (and it "
                        "says what size would reach that speed; default); require = that speed or an error naming "
                        "what is feasible; off = no timing")
    p.add_argument("--min-speed", type=float, default=1.0, metavar="X",
                   help="the speed to hold, as a factor of the float model's (default 1: never slower than float)")
    p.add_argument("--balance", default="auto", choices=("auto", "on", "off"),
                   help="channel balancing (SmoothQuant / ViDiT-Q) of Linear layers whose input has outlier channels, "
                        "with quantized activations: auto = where the input has outlier channels (default), on = "
                        "every Linear, off = none")
    p.add_argument("--fp8", default="auto", choices=("auto", "on", "off"),
                   help="float8 e4m3 formats (W8A8-fp8, W8A16-fp8) in the menu of Linear layers: auto = where this "
                        "machine's GPU has fp8 tensor cores (compute capability >= 8.9; default), on = everywhere "
                        "(elsewhere they run dequantized), off = int formats only")
    p.add_argument("--out", required=True, help="the quantized .safetensors file to write")
    p.add_argument("--report", help="where to write the report JSON")


def read_prompts(args) -> list[str]:
    from ...quant.errors import MixQuantError
    from ...quant.util import parse_prompts

    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                return parse_prompts(f.read(), hint="--prompt or --prompts-file")
        except OSError as e:
            raise MixQuantError(f"cannot read the prompts file {args.prompts_file}: {e.strerror}") from None
    return parse_prompts(args.prompt or [], hint="--prompt or --prompts-file")


def run(args) -> int:
    from ...quant import distributed
    from ...quant.errors import MixQuantError
    from ...quant.offload import streamed_device
    from ...quant.speed import speed_text
    from ..diffusers_host.api import quantize_pipeline
    from ..diffusers_host.files import save_outputs
    from ..diffusers_host.images import parse_size
    from ..diffusers_host.models import denoiser_of, load_pipeline
    from ..diffusers_host.runner import SamplerSettings

    prompts = read_prompts(args)
    for path in (args.out, args.report):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise MixQuantError(f"the folder of {path} does not exist")
    width, height = parse_size(args.size)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, offload=args.offload)
    dev = streamed_device(denoiser_of(pipe))
    if dev is not None:
        print(f"the denoiser stays on the CPU and its blocks stream through {dev} one at a time (it does not fit the "
              f"device, or --offload stream): no speed target; the quantized model is built in {dev}", file=sys.stderr)
    sampler = SamplerSettings(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, width=width,
                              height=height, negative_prompt=args.negative_prompt)
    bar = _progress_bar()
    try:
        qpipe, report = quantize_pipeline(
            pipe, prompts, avg_w_bits=args.avg_w_bits, budget_mb=args.budget_mb, a_bits=args.a_bits,
            target=args.target, sampler=sampler, seeds=[args.seed + i for i in range(len(prompts))],
            evaluate=not args.no_eval, model_name=args.model, progress=bar, act_groups=args.act_groups,
            bos=not args.no_bos, cache_dir=args.cache_dir, weight_search=args.weight_search,
            sens_mode=args.sens_mode, sweep_seconds=args.sweep_seconds, speed=args.speed,
            min_speed=args.min_speed, balance=args.balance, fp8=args.fp8)
    finally:
        bar.close()
    if not distributed.is_main():  # under torchrun every process measured its share; the first one writes
        return 0
    size = save_outputs(denoiser_of(pipe), denoiser_of(qpipe), report, args.out, args.report, args.model)
    q = report["quality"]
    print(f"wrote {args.out} ({size / 1e6:.2f} MB): avg {report['avg_w_bits']:.2f} weight bits "
          f"({report.get('weight_search', 'mse')} ranges), {report['avg_a_bits']:.2f} activation bits, "
          f"{report['bytes_quantized'] / 1e6:.3f} MB vs "
          f"{report['bytes_fp16'] / 1e6:.3f} MB fp16 ({report['bytes_quantized'] / report['bytes_fp16']:.3f}x)")
    parts = [f"{k} {q[k]:.3f}" for k in ("sqnr_db", "psnr_db", "ssim") if isinstance(q.get(k), (int, float))]
    if q.get("content_accuracy") is not None:
        parts.append(f"content accuracy {q['content_accuracy']:.2f} (FP {q['content_accuracy_fp']:.2f})")
    if parts:
        print("quality vs FP: " + ", ".join(parts))
    if report.get("balanced_layers"):
        print(f"channel balancing on {len(report['balanced_layers'])} layers (outlier channels in their inputs)")
    if report.get("speed"):
        print(speed_text(report["speed"]))
    t = report["timings_s"]
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
          + (" (sensitivity from cache)" if report.get("sensitivity_cached") else ""))
    return 0


class _progress_bar:
    """tqdm on stderr, one bar per phase (one line per phase when stderr is not a terminal)."""

    def __init__(self):
        self.bar, self.phase = None, None

    def __call__(self, done, total, phase):
        from tqdm import tqdm

        from ...quant import distributed

        if phase != self.phase:
            self.close()
            tty = sys.stderr.isatty()
            if not tty and distributed.is_main():  # no bar: each phase (and its time estimate) as a line
                print(f"{phase} ...", file=sys.stderr, flush=True)
            self.bar, self.phase = tqdm(total=total, desc=phase, file=sys.stderr, leave=False, disable=not tty), phase
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
