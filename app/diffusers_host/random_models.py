"""Random-weight pipelines of the diffusion-transformer families, built offline from the configs shipped in
configs/dit/ and the tokenizer files in configs/ (CLIP, T5): to try MixQuant on an architecture without downloading
it, and for the tests and benchmarks (bench/dit.py).

    pipe = random_pipeline("flux", "small")        # FluxPipeline: 2 double + 2 single blocks, small widths
    pipe.save_pretrained(folder)                    # a diffusers folder `mixquant quantize --model` loads
    tr = random_denoiser("flux", "dev")            # the Flux.1-dev transformer at its real size (12B; benchmarks)

Sizes: "small" (every component a few MB; tests), and for the denoiser alone "dev" (Flux.1-dev / SD3.5-Large widths
and depths). The text encoders and VAE are always small: they are not what MixQuant quantizes.
"""
from __future__ import annotations

import json
import os

import torch

from ...quant.errors import MixQuantError

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")
FAMILIES = ("flux", "sd3")


def _config(family: str, size: str) -> dict:
    path = os.path.join(CONFIGS, "dit", f"{family}_{size}.json")
    if family not in FAMILIES or not os.path.isfile(path):
        have = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIGS, "dit")) if f.endswith(".json"))
        raise MixQuantError(f"no shipped config {family}_{size}; have: {', '.join(have)}")
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def random_denoiser(family: str, size: str = "small", dtype=torch.float32, device="cpu", seed: int = 0,
                    outliers: float = 0.0):
    """The family's transformer with random weights (seeded), from configs/dit/<family>_<size>.json. `outliers` > 0:
    give it the outlier channels trained DiTs have (with_outlier_channels)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from .models import _quiet_loading

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    cfg = _config(family, size)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    try:  # built in `dtype` directly: Flux.1-dev's 12B weights are 24 GB in bf16, 48 in fp32
        torch.set_default_dtype(dtype if dtype.is_floating_point else default)
        with torch.device(device):
            model = cls.from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    if outliers:
        with_outlier_channels(model, outliers, seed=seed)
    with _quiet_loading():  # (diffusers' note on casting with .to())
        return model.to(dtype).eval()


def with_outlier_channels(model: torch.nn.Module, gain: float, n: int = 4, seed: int = 0) -> torch.nn.Module:
    """The activation outliers of trained diffusion transformers (a few channels of the residual stream tens of times
    larger than the rest, the same channels in every block: ViDiT-Q, SVDQuant), which random weights lack: every
    adaLN modulation's scale for `n` fixed channels is raised by `gain` (its bias), so the modulated inputs of the
    attention and MLP layers carry those channels `gain` x larger. In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    chunks = {"AdaLayerNormZero": (6, (1, 4)), "AdaLayerNormZeroSingle": (3, (1,))}  # (chunks, scale chunks)
    chans = None
    with torch.no_grad():
        for m in model.modules():
            spec = chunks.get(type(m).__name__)
            if spec is None or getattr(m, "linear", None) is None or m.linear.bias is None:
                continue
            d = m.linear.out_features // spec[0]
            if chans is None:
                chans = torch.randperm(d, generator=g)[:n]
            for c in spec[1]:
                m.linear.bias[c * d + chans.to(m.linear.bias.device)] += gain
    return model


def _clip(hidden: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=hidden, vocab_size=49408, max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(d_model=d_model, d_ff=2 * d_model, num_layers=2, num_heads=2,
                                   d_kv=d_model // 2, vocab_size=32128)).eval()


def _tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok = os.path.join(CONFIGS, "clip_tokenizer")
    clip = CLIPTokenizer(os.path.join(tok, "vocab.json"), os.path.join(tok, "merges.txt"), model_max_length=77)
    return clip, T5TokenizerFast.from_pretrained(os.path.join(CONFIGS, "t5_tokenizer"), local_files_only=True)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                         latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.1159, scaling_factor=0.3611).eval()


def random_pipeline(family: str, size: str = "small", seed: int = 0, outliers: float = 0.0, dtype=torch.float32,
                    build_device="cpu"):
    """A complete FluxPipeline / StableDiffusion3Pipeline with random weights: the transformer of the shipped config
    and small CLIP / T5 text encoders and VAE (each component seeded). The VAE downsamples by 2 (two blocks:
    `pipe.vae_scale_factor`, 8 in the real models), so a 64x64 image is a 32x32x16 latent (Flux: 16x16 tokens of 2x2
    patches). `dtype`: the transformer's (the small parts stay fp32). `build_device`: where the transformer's random
    weights are drawn (a GPU draws Flux.1-dev's 12B in about a second, the CPU's generator in about a minute); the
    pipeline is returned on the CPU either way."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    tr = random_denoiser(family, size, dtype=dtype, seed=seed, outliers=outliers, device=build_device)
    built = torch.device(build_device).type
    if built != "cpu":
        tr.to("cpu")
        if built == "cuda":
            torch.cuda.empty_cache()  # (the device's memory back for what is measured next)
    clip_tok, t5_tok = _tokenizers()
    vae = _vae(seed + 1)
    if family == "flux":
        c = tr.config
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=_clip(c.pooled_projection_dim, False, seed + 2),
                            tokenizer=clip_tok, text_encoder_2=_t5(c.joint_attention_dim, seed + 3),
                            tokenizer_2=t5_tok, transformer=tr)
    else:
        c = tr.config  # pooled = CLIP-L + CLIP-G projections; their hidden states, side by side, padded to T5's width
        half = c.pooled_projection_dim // 2
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=tr, scheduler=sched, vae=vae, text_encoder=_clip(half, True, seed + 2), tokenizer=clip_tok,
            text_encoder_2=_clip(half, True, seed + 3), tokenizer_2=clip_tok,
            text_encoder_3=_t5(c.joint_attention_dim, seed + 4), tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe
