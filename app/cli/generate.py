"""`mixquant generate`: one image from a prompt, with the FP model or (with --quantized) a quantized denoiser.

    mixquant generate --model digits --prompt "a handwritten digit three" --out three.png

The digits model draws 16x16 images. Images smaller than 128 px are saved upscaled by an integer factor with
nearest-neighbour (16x16 -> 128x128) so a person can look at them; --native-size saves the pixels as generated.
The PNG is written atomically (temporary file in the same folder, then rename).
"""
from __future__ import annotations

import os

from ...quant.errors import MixQuantError
from ..diffusers_host.images import VIEW_SIZE, parse_size, save_png_atomic, upscale_for_viewing
from . import add_device_arguments, add_scheduler_argument


def add_arguments(p) -> None:
    p.add_argument("--model", default="digits",
                   help="`digits` (embedded, default), a diffusers folder, or a .safetensors checkpoint (a Flux / SD3 "
                        "diffusion model joined to its text-encoder and VAE files with '+')")
    p.add_argument("--prompt", required=True, help="what to draw, e.g. \"a handwritten digit three\"")
    p.add_argument("--negative-prompt", default=None, help="what not to draw (used with guidance > 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image; default 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    add_scheduler_argument(p)
    p.add_argument("--size", default=None, metavar="WxH",
                   help="image size in pixels, multiples of 8 (default: the model's native size)")
    p.add_argument("--quantized", default=None, metavar="FILE.safetensors",
                   help="a quantized denoiser made by `mixquant quantize` from the same model")
    add_device_arguments(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for the tiny digits model, where a second thread gains "
                        "little and a busy machine makes multi-threading many times slower; torch's default otherwise)")
    p.add_argument("--native-size", action="store_true",
                   help=f"save at the generated size (by default images under {VIEW_SIZE} px are upscaled "
                        "with nearest-neighbour for viewing)")
    p.add_argument("--out", required=True, metavar="IMAGE.png", help="where to write the PNG")


def apply_quantized(pipe, path: str):
    """Swap the pipeline's denoiser for the quantized one stored in `path`, rebuilt from the file alone and
    checked against the pipeline's FP denoiser (it must be the model the file was made from)."""
    from ..diffusers_host.files import load_denoiser
    from ..diffusers_host.models import denoiser_of, set_denoiser

    if not os.path.isfile(path):
        raise MixQuantError(f"quantized file {path} not found; make one with `mixquant quantize`")
    from ...quant.offload import unstream

    base = denoiser_of(pipe)
    q = load_denoiser(path, base=base, dtype=base.dtype)  # (built on the CPU)
    set_denoiser(pipe, q.to(base.device))  # where the pipeline runs (a streamed base's non-block part is there)
    unstream(base)
    return pipe


def generate_image(pipe, prompt: str, *, negative_prompt: str | None = None, seed: int = 0, steps: int = 20,
                   guidance: float = 4.0, width: int | None = None, height: int | None = None):
    """One PIL image; deterministic for a seed (the noise is drawn on the CPU)."""
    import torch

    if steps < 1:
        raise MixQuantError("--steps must be at least 1")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.inference_mode():
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                   width=width, height=height, generator=g, output_type="pil")
    return out.images[0]


def run(args) -> int:
    from ..diffusers_host.models import load_pipeline, resolve_scheduler, set_scheduler

    if not args.out.lower().endswith(".png"):
        raise MixQuantError(f"--out {args.out}: give a .png path")
    width, height = parse_size(args.size)
    import torch

    threads = args.threads or (1 if args.model.strip().lower() == "digits" else None)
    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, offload=args.offload)
    args.scheduler = resolve_scheduler(pipe, args.scheduler)
    set_scheduler(pipe, args.scheduler)
    if args.quantized:
        apply_quantized(pipe, args.quantized)
    image = generate_image(pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                           steps=args.steps, guidance=args.guidance, width=width, height=height)
    if not args.native_size:
        image = upscale_for_viewing(image)
    save_png_atomic(image, args.out)
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}, seed {args.seed}, {args.steps} steps, "
          f"{args.scheduler}, guidance {args.guidance})")
    return 0
