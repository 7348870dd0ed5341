"""Quality bench: the harness (app/diffusers_host/harness.py) on the digits model, FP vs damaged / quantized
variants.

    python -m mixquant.bench.quality                 # writes bench/results/quality_digits.{md,json} + grids
    python -m mixquant.bench.quality --steps 4 --seeds 0 1 2

Rows today are reference damages of the UNet weights, so the scale of the numbers is known:
  fp16-weights   weights rounded to float16 and back (about lossless)
  w8-per-tensor  naive symmetric 8-bit per-tensor rounding of every conv/linear weight (no calibration)
  w4-per-tensor  the same at 4 bits (clearly damaged)
  noise-5pct     Gaussian noise of 5% of each weight tensor's std
The engine adds real quantized rows through `evaluate_variants` (any pipeline whose unet was swapped).
Reusable pieces: damaged_unet, evaluate_variants, markdown_table, default_prompts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_prompts(per_digit: int = 2) -> list[str]:
    """Held-out phrasings (never seen in training): `per_digit` per digit, phrasings rotated across digits."""
    from ..app.digits import HELDOUT_PHRASINGS, phrase

    n = len(HELDOUT_PHRASINGS)
    return [phrase(HELDOUT_PHRASINGS[(d + k * 5) % n], d) for k in range(per_digit) for d in range(10)]


@torch.no_grad()
def damaged_unet(unet: torch.nn.Module, kind: str, amount: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """A damaged deep copy of `unet`. kind: "noise" (Gaussian, `amount` x each weight tensor's std),
    "fp16" (weights rounded to float16), "int" (symmetric per-tensor rounding of conv/linear weights to `amount`
    bits, e.g. 8 or 4)."""
    u = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    for name, mod in u.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.ndim < 2:
            continue
        if kind == "noise":
            w.add_(amount * w.float().std() * torch.randn(w.shape, generator=g).to(w))
        elif kind == "fp16":
            w.copy_(w.half().to(w.dtype))
        elif kind == "int":
            qmax = 2 ** (int(amount) - 1) - 1
            s = w.abs().max().clamp_min(1e-12) / qmax
            w.copy_((w / s).round().clamp(-qmax, qmax) * s)
        else:
            raise ValueError(f"unknown damage kind {kind!r}; use noise, fp16 or int")
    return u


def evaluate_variants(fp_pipe, variants: dict, prompts: list[str], seeds: list[int], steps: int = 20,
                      guidance: float = 4.0, scheduler: str = "dpm", grid_dir: str | None = None,
                      grid_columns: int = 10) -> list[dict]:
    """Run the harness for each {name: pipeline}; one row per variant (metrics as in compare_pipelines, images
    dropped). With grid_dir, writes <grid_dir>/grid_<name>.png (row FP above row variant, first seed only)."""
    from ..app.diffusers_host.harness import compare_pipelines, save_grid

    rows = []
    for name, pipe in variants.items():
        r = compare_pipelines(fp_pipe, pipe, prompts, seeds, steps=steps, guidance=guidance, scheduler=scheduler,
                              return_images=grid_dir is not None)
        if grid_dir is not None:
            first_seed = torch.arange(len(prompts)) * len(seeds)  # compare_pipelines orders prompt-major
            path = os.path.join(grid_dir, f"grid_{name}.png")
            save_grid(r.pop("fp_images")[first_seed], r.pop("q_images")[first_seed], path, columns=grid_columns)
            r["grid"] = os.path.relpath(path, os.path.dirname(grid_dir))
        r["variant"] = name
        rows.append(r)
    return rows


@torch.no_grad()
def accuracy_table(pipe, schedulers=("ddim", "dpm", "euler"), steps_list=(4, 20), guidance: float = 4.0,
                   per_digit: int = 10, first_seed: int = 1000) -> dict:
    """FP content accuracy on held-out phrasings: {scheduler: {steps: accuracy}}; per_digit images per digit
    (phrasings cycled), seeds first_seed.. (the model card's table)."""
    from ..app.digits import HELDOUT_PHRASINGS, content_accuracy, digits_classifier, phrase
    from ..app.diffusers_host.models import set_scheduler

    n = len(HELDOUT_PHRASINGS)
    prompts = [phrase(HELDOUT_PHRASINGS[(d + k) % n], d) for d in range(10) for k in range(per_digit)]
    table: dict = {}
    for sched in schedulers:
        set_scheduler(pipe, sched)
        for steps in steps_list:
            gens = [torch.Generator().manual_seed(first_seed + i) for i in range(len(prompts))]
            imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="np").images
            table.setdefault(sched, {})[steps] = content_accuracy(imgs, prompts, digits_classifier())
    return table


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = ("variant", "sqnr_db", "psnr_db", "ssim", "ssim_large_window", "content_accuracy_fp", "content_accuracy")
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m mixquant.bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--scheduler", default="dpm", choices=("ddim", "dpm", "euler"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for digits on a busy machine)")
    ap.add_argument("--accuracy", action="store_true",
                    help="only print the FP content-accuracy table (ddim/dpm/euler x 4/20 steps, held-out phrasings)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ..app.diffusers_host.api import pipeline_with_denoiser
    from ..app.diffusers_host.models import load_pipeline

    t0 = time.time()
    fp = load_pipeline(args.model)
    if args.accuracy:
        table = accuracy_table(fp, guidance=args.guidance)
        steps = sorted(next(iter(table.values())))
        print("| scheduler | " + " | ".join(f"{s} steps" for s in steps) + " |\n|---|" + "---|" * len(steps))
        for sched, row in table.items():
            print(f"| {sched} | " + " | ".join(f"{row[s]:.2f}" for s in steps) + " |")
        print(f"({time.time() - t0:.1f} s)")
        return 0
    variants = {
        "fp-identical": fp,
        "fp16-weights": pipeline_with_denoiser(fp, damaged_unet(fp.unet, "fp16")),
        "w8-per-tensor": pipeline_with_denoiser(fp, damaged_unet(fp.unet, "int", 8)),
        "w4-per-tensor": pipeline_with_denoiser(fp, damaged_unet(fp.unet, "int", 4)),
        "noise-5pct": pipeline_with_denoiser(fp, damaged_unet(fp.unet, "noise", 0.05)),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    prompts = default_prompts()
    rows = evaluate_variants(fp, variants, prompts, args.seeds, steps=args.steps, guidance=args.guidance,
                             scheduler=args.scheduler, grid_dir=args.out_dir)
    title = (f"Quality harness on `{args.model}`: {len(prompts)} held-out prompts x {len(args.seeds)} seeds, "
             f"{args.scheduler} {args.steps} steps, guidance {args.guidance}. SQNR on the denoiser output along the "
             f"FP trajectory; PSNR/SSIM of final images vs FP; content accuracy by the digit classifier.\n\n")
    table = markdown_table(rows)
    print(title + table)
    stem = os.path.join(args.out_dir, f"quality_{os.path.basename(os.path.normpath(args.model))}")
    with open(stem + ".md", "w") as f:
        f.write("# " + title + table)
        f.write("\nGrids (row 1 FP, row 2 variant, first seed): " + ", ".join(r["grid"] for r in rows) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "prompts"} | {"prompts": prompts} for r in rows], f,
                  indent=1, default=str)
    print(f"wrote {stem}.md/.json and grids in {args.out_dir} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
