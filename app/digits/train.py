"""Train the embedded `digits` text-to-image model from scratch, seeded, on a CPU (1 thread by default).

    python -m mixquant.app.digits.train                      # writes <package>/models/digits (27.6 min measured on
                                                             # a shared 2-core CPU, ~21 min undisturbed)
    python -m mixquant.app.digits.train --out /tmp/digits    # somewhere else
    python -m mixquant.app.digits.train --quick --out /tmp/d # smoke test: a few steps of each stage

Data: scikit-learn's handwritten digits (1,797 images, 8x8, 17 levels), bilinearly upsampled to 16x16, white on
black, gray copied to 3 channels, scaled to [-1, 1]. Stages, each with a fixed number of steps (no time budget,
so the run is reproducible):
  1. AutoencoderKL (3 -> 4 latent channels, 2x down: 16x16 -> 4x8x8), MSE + 1e-6 KL.
  2. Digit classifier (the judge) on the training split of the images and of their VAE reconstructions,
     with small shifts / contrast / noise augmentation. Accuracy on the held-out 20% split is recorded.
  3. UNet2DConditionModel (CrossAttnDownBlock2D / CrossAttnUpBlock2D) and the CLIPTextModel trained *jointly*
     (a frozen text encoder memorises the training phrasings and fails new ones), epsilon prediction on the SD 1.x
     noise schedule, min-SNR-5 weighting, 10% empty prompts (for classifier-free guidance), EMA weights saved.
Prompts come from the grammar in app/digits/__init__.py; the held-out phrasings there never occur in training.

Needs scikit-learn (only to load the data set): pip install scikit-learn.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from .. import digits as D

SEED = 0


# ------------------------------------------------------------------------------------------------- data / tokenizer
def load_images() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits -> images [N,1,16,16] in [0,1] (white on black) and labels [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("training needs scikit-learn for the data set: pip install scikit-learn") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target, dtype=torch.long)


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(D.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=D.UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{D.BOS} $A {D.EOS}", special_tokens=[(D.BOS, vocab[D.BOS]), (D.EOS, vocab[D.EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=D.BOS, eos_token=D.EOS, unk_token=D.UNK,
                                   pad_token=D.EOS, model_max_length=D.MODEL_MAX_LENGTH)


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


class Log:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------------- VAE
def train_vae(x01: torch.Tensor, steps: int, batch: int, log: Log):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=16)
    x = (x01 * 2 - 1).repeat(1, 3, 1, 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(20, steps, 0.05))
    g = torch.Generator().manual_seed(SEED + 2)
    vae.train()
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, xb)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {mse.item():.5f}")
    vae.eval()
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        mean, std = post.mean.clone(), post.std.clone()
        rec = vae.decode(mean).sample
        rec_mse = F.mse_loss(rec, x).item()
        z = mean + std * torch.randn(mean.shape, generator=g)
        scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae done: recon mse {rec_mse:.5f}, latent mean {z.mean().item():.3f}, scaling_factor {scaling:.4f}")
    rec01 = ((rec.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)
    return vae, mean, std, rec01, {"recon_mse": rec_mse, "scaling_factor": scaling}


# ------------------------------------------------------------------------------------------------------ classifier
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = len(x)
    # random shift by up to 1 px (zero padding)
    pad = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    x = pad[:, :, dy:dy + 16, dx:dx + 16]
    gain = 0.7 + 0.5 * torch.rand(b, 1, 1, 1, generator=g)
    x = x * gain + 0.05 * torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def train_classifier(x01, rec01, y, steps: int, log: Log):
    g = torch.Generator().manual_seed(SEED + 3)
    perm = torch.randperm(len(x01), generator=g)
    n_val = len(x01) // 5
    val, tr = perm[:n_val], perm[n_val:]
    xtr = torch.cat([x01[tr], rec01[tr]])
    ytr = torch.cat([y[tr], y[tr]])
    torch.manual_seed(SEED + 4)
    clf = D.DigitClassifier(width=32)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(20, steps, 0.02))
    clf.train()
    for step in range(steps):
        i = torch.randint(0, len(xtr), (128,), generator=g)
        loss = F.cross_entropy(clf(augment(xtr[i], g)), ytr[i], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x01[val]).argmax(1) == y[val]).float().mean().item()
        acc_rec = (clf(rec01[val]).argmax(1) == y[val]).float().mean().item()
    log(f"classifier: val accuracy {acc:.4f} on images, {acc_rec:.4f} on VAE reconstructions ({n_val} held out)")
    return clf, {"val_accuracy": acc, "val_accuracy_vae_recon": acc_rec, "n_val": n_val, "steps": steps}


# ------------------------------------------------------------------------------------------------- UNet + encoder
def train_unet(lat_mean, lat_std, scaling, y, tokenizer, steps: int, batch: int, log: Log):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    torch.manual_seed(SEED + 5)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=D.MODEL_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=vocab[D.BOS], eos_token_id=vocab[D.EOS], pad_token_id=vocab[D.EOS]))
    torch.manual_seed(SEED + 6)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
        norm_num_groups=16)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", clip_sample=False)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction

    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, steps, 0.1))
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    for p in ema_params:
        p.requires_grad_(False)

    g = torch.Generator().manual_seed(SEED + 7)
    rng = random.Random(SEED + 8)
    unet.train()
    te.train()
    loss_ema, t_start = None, time.time()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        labels = y[idx].tolist()
        prompts = ["" if rng.random() < 0.1 else D.sample_training_prompt(d, rng) for d in labels]
        ids = tokenizer(prompts, padding="max_length", max_length=D.MODEL_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = te(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(0.998, (1 + step) / (10 + step))
            for pe, p in zip(ema_params, params):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t_start
            log(f"unet step {step}/{steps} loss {loss_ema:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{el / (step + 1):.3f} s/step")
    return ema_unet, ema_te, {"final_loss_ema": loss_ema}


# -------------------------------------------------------------------------------------------------------- saving
def save_pipeline(out: str, vae, te, tokenizer, unet) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    fix_tokenizer_class(out)


def fix_tokenizer_class(folder: str) -> None:
    """transformers 5 saves the wrapped tokenizer as "TokenizersBackend", a class transformers 4.x lacks;
    "PreTrainedTokenizerFast" loads on both."""
    for path in (os.path.join(folder, "model_index.json"), os.path.join(folder, "tokenizer", "tokenizer_config.json")):
        with open(path) as f:
            cfg = json.load(f)
        if path.endswith("model_index.json"):
            cfg["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        else:
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")


@torch.no_grad()
def quick_eval(folder: str, steps: int = 20, guidance: float = 4.0) -> float:
    """Held-out phrasings, 100 images (10 per digit), seeds 1000.., DPM-Solver++ -> classifier accuracy."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    items = D.heldout_prompts()
    items = [items[(i % len(D.HELDOUT_PHRASINGS)) * 10 + i // 10] for i in range(100)]  # 10 per digit, cycled
    prompts = [p for p, _ in items]
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
    clf = D.load_classifier(os.path.join(folder, "classifier"))
    return D.content_accuracy(imgs, prompts, clf)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixquant.app.digits.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=D.DIGITS_DIR, help="output folder (default: the package's models/digits)")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--unet-steps", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: this tiny model gains little from a second thread, a 1-thread run "
                         "is not slowed down by other jobs on the machine, and results do not depend on the core "
                         "count)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 5 steps per stage")
    args = ap.parse_args(argv)
    if args.quick:
        args.vae_steps, args.classifier_steps, args.unet_steps = 5, 5, 5

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    log = Log()
    out = os.path.abspath(args.out)
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)

    import diffusers
    import transformers

    x01, y = load_images()
    log(f"data: {len(y)} images 16x16; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads")
    tokenizer = build_tokenizer()

    t = time.time()
    vae, lat_mean, lat_std, rec01, vae_info = train_vae(x01, args.vae_steps, args.batch, log)
    vae_info["seconds"] = round(time.time() - t, 1)

    t = time.time()
    clf, clf_info = train_classifier(x01, rec01, y, args.classifier_steps, log)
    clf_info["seconds"] = round(time.time() - t, 1)

    t = time.time()
    unet, te, unet_info = train_unet(lat_mean, lat_std, vae.config.scaling_factor, y, tokenizer, args.unet_steps,
                                     args.batch, log)
    unet_info["seconds"] = round(time.time() - t, 1)

    save_pipeline(tmp, vae, te, tokenizer, unet)
    D.save_classifier(clf, os.path.join(tmp, "classifier"), {"val_accuracy": round(clf_info["val_accuracy"], 4)})
    total = time.time() - log.t0
    acc = quick_eval(tmp)
    log(f"held-out phrasings, DPM-Solver++ 20 steps, guidance 4: accuracy {acc:.2f}")
    info = {"seed": SEED, "threads": args.threads, "batch": args.batch,
            "steps": {"vae": args.vae_steps, "classifier": args.classifier_steps, "unet_text_encoder": args.unet_steps},
            "vae": vae_info, "classifier": clf_info, "unet_text_encoder": unet_info,
            "train_seconds_total": round(total, 1), "heldout_accuracy_dpm20_g4": acc,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "command": "python -m mixquant.app.digits.train" + ("" if args.out == D.DIGITS_DIR else f" --out {args.out}")}
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    # keep a README that lives in the output folder
    if os.path.isfile(os.path.join(out, "README.md")):
        shutil.copy2(os.path.join(out, "README.md"), os.path.join(tmp, "README.md"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"wrote {out}; training took {total / 60:.1f} min ({total:.0f} s) on {args.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
