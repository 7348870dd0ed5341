"""Quality harness: score a quantized pipeline against its FP original (the numbers of the report's `quality`).

    from mixquant.app.diffusers_host.harness import compare_pipelines, save_grid
    q = compare_pipelines(fp_pipe, q_pipe, prompts, seeds=[0, 1], steps=20, guidance=4.0, scheduler="dpm")
    q["sqnr_db"], q["psnr_db"], q["ssim"], q["content_accuracy"]

What is measured (every prompt with every seed; image i uses torch.Generator().manual_seed(seed_i) on the CPU):
- sqnr_db: SQNR of the denoiser (UNet or transformer) outputs along the *FP* trajectory. The FP run records every
  denoiser call (inputs and output); the quantized denoiser is then fed exactly those inputs, so errors do not
  compound along the trajectory and the number isolates the denoiser. Pooled over all calls (CFG halves included);
  `sqnr_db_per_step` lists it per sampling step.
- psnr_db / ssim: end to end, the quantized pipeline's own images (same seeds) vs the FP images, in [0, 1].
  `ssim` uses the standard 11 px Gaussian window (capped at the image size); `ssim_large_window` a window as large
  as the image (the MixDQ variant for content layers).
- content_accuracy(_fp): for the digits model, the fraction of images the shipped digit classifier reads as the
  digit the prompt names (prompts naming no digit are skipped); None for other models unless a classifier is given.
- content_confidence(_fp): the classifier's mean probability of the named digit: finer than accuracy, which
  saturates at 1.0 while every digit is still recognisable.
- content_hits(_fp): per image, whether the classifier read the named digit (None where the prompt names none), in
  the order prompt x seed: two results on the same prompts and seeds pair up (`digits.paired_content`).
The quantized pipeline is any pipeline of the same kind whose denoiser was modified: the denoiser is a black box.
"""
from __future__ import annotations

import math
import os
import time

import torch

from ...quant import metrics as M
from ...quant.errors import MixQuantError
from ...quant.util import images_to_tensor


def _detach(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def _first(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample  # a diffusers output dataclass


class _Recorder:
    """Forward hook recording each denoiser call's inputs and output sample."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def __call__(self, module, args, kwargs, output):
        self.calls.append((_detach(args), _detach(kwargs), _first(output).detach().clone()))


def _is_digits(pipe) -> bool:
    from ..digits import DIGITS_DIR

    p = getattr(pipe.config, "_name_or_path", None) or ""
    try:
        return bool(p) and os.path.samefile(p, DIGITS_DIR)
    except OSError:
        return False


@torch.no_grad()
def compare_pipelines(fp_pipe, q_pipe, prompts: list[str], seeds: list[int], steps: int = 20,
                      guidance: float = 4.0, scheduler: str | None = "dpm", *, negative_prompt: str | None = None,
                      height: int | None = None, width: int | None = None, batch_size: int = 32,
                      classifier="auto", ssim_window: int | None = None, return_images: bool = False) -> dict:
    """Score `q_pipe` against `fp_pipe` on every (prompt, seed) pair; see the module docstring for the metrics.
    scheduler: "ddim" | "dpm" | "euler" sets both pipelines' sampler (None keeps theirs; they should match).
    classifier: "auto" (the digits classifier when fp_pipe is the digits model), a DigitClassifier-like object
    with .predict(images), or None. return_images adds "fp_images"/"q_images" ([N,3,H,W] float in [0,1], CPU)."""
    from .models import denoiser_of, set_scheduler

    if not prompts or not seeds:
        raise MixQuantError("compare_pipelines needs at least one prompt and one seed")
    t0 = time.time()
    if scheduler is not None:
        set_scheduler(fp_pipe, scheduler)
        set_scheduler(q_pipe, scheduler)
    items = [(p, s) for p in prompts for s in seeds]
    fp_den, q_den = denoiser_of(fp_pipe), denoiser_of(q_pipe)
    device = fp_den.device if hasattr(fp_den, "device") else torch.device("cpu")

    fp_imgs, q_imgs = [], []
    sig_total = noise_total = 0.0
    per_step_sig: dict[int, float] = {}
    per_step_noise: dict[int, float] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        ps = [p for p, _ in chunk]
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                  negative_prompt=None if negative_prompt is None else [negative_prompt] * len(ps), output_type="pt")

        rec = _Recorder()
        handle = fp_den.register_forward_hook(rec, with_kwargs=True)
        try:
            gens = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
            fp_out = fp_pipe(ps, generator=gens, **kw).images
        finally:
            handle.remove()
        # teacher forcing: the quantized denoiser on exactly the FP trajectory's inputs
        for i, (args, kwargs, y_fp) in enumerate(rec.calls):
            y_q = _first(q_den(*args, **kwargs)).to(y_fp.dtype)
            s = float((y_fp.double() ** 2).sum())
            n = float(((y_q.double() - y_fp.double()) ** 2).sum())
            sig_total += s
            noise_total += n
            per_step_sig[i] = per_step_sig.get(i, 0.0) + s
            per_step_noise[i] = per_step_noise.get(i, 0.0) + n

        gens = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
        q_out = q_pipe(ps, generator=gens, **kw).images
        fp_imgs.append(fp_out.float().cpu())
        q_imgs.append(q_out.float().cpu())

    fp_images, q_images = torch.cat(fp_imgs), torch.cat(q_imgs)

    def ratio_db(s: float, n: float) -> float:
        if n == 0.0:
            return float("inf")
        return float("-inf") if s == 0.0 else 10.0 * math.log10(s / n)

    h, w = fp_images.shape[-2:]
    result = {
        "sqnr_db": ratio_db(sig_total, noise_total),
        "sqnr_db_per_step": [ratio_db(per_step_sig[i], per_step_noise[i]) for i in sorted(per_step_sig)],
        "psnr_db": M.psnr_db(fp_images, q_images, data_range=1.0),
        "ssim": M.ssim(fp_images, q_images, window_size=ssim_window),
        "ssim_large_window": M.ssim(fp_images, q_images, window_size=min(h, w)),
        "content_accuracy_fp": None,
        "content_accuracy": None,
        "content_confidence_fp": None,
        "content_confidence": None,
        "n_images": len(items),
        "prompts": list(prompts),
        "seeds": [int(s) for s in seeds],
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "image_size": [int(w), int(h)],
        "device": str(device),
    }
    if classifier == "auto":
        classifier = None
        if _is_digits(fp_pipe):
            from ..digits import digits_classifier

            classifier = digits_classifier()
    if classifier is not None:
        from ..digits import content_confidence, content_hits, hit_rate

        all_prompts = [p for p, _ in items]
        for key, images in (("_fp", fp_images), ("", q_images)):
            hits = content_hits(images, all_prompts, classifier)
            result["content_accuracy" + key] = hit_rate(hits)
            result["content_hits" + key] = hits
        result["content_confidence_fp"] = content_confidence(fp_images, all_prompts, classifier)
        result["content_confidence"] = content_confidence(q_images, all_prompts, classifier)
    result["seconds"] = round(time.time() - t0, 3)
    if return_images:
        result["fp_images"], result["q_images"] = fp_images, q_images
    return result


def save_grid(fp_images, q_images, path: str, columns: int = 10, tile: int = 96, gap: int = 2) -> str:
    """PNG grid: a row of FP images above the row of the matching quantized images (pairs of rows repeat when
    there are more than `columns` images). Images: [N,C,H,W] / [N,H,W,C] in [0,1] or lists of PIL images; each is
    upscaled with nearest-neighbour by an integer factor to about `tile` px. Written atomically; returns path."""
    from PIL import Image

    from .images import save_png_atomic

    a, b = images_to_tensor(fp_images), images_to_tensor(q_images)
    if a.shape != b.shape:
        raise MixQuantError(f"save_grid: FP images {tuple(a.shape)} and quantized {tuple(b.shape)} differ in shape")
    n, _, h, w = a.shape
    k = max(1, round(tile / max(h, w)))
    th, tw = h * k, w * k
    cols = min(columns, n)
    pairs = math.ceil(n / cols)
    canvas = torch.ones(3, pairs * (2 * th + gap) + (pairs - 1) * 3 * gap, cols * tw + (cols - 1) * gap)
    for i in range(n):
        r, c = divmod(i, cols)
        y0 = r * (2 * th + 4 * gap)
        x0 = c * (tw + gap)
        for j, src in enumerate((a, b)):
            up = src[i].repeat_interleave(k, 1).repeat_interleave(k, 2)
            canvas[:, y0 + j * (th + gap): y0 + j * (th + gap) + th, x0:x0 + tw] = up
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    save_png_atomic(Image.fromarray(arr), path)
    return path
