"""Single-file checkpoints (the `.safetensors` files artists download: SD1.x, SD2.x, SDXL base and their Turbo
variants), loaded offline.

The family is told from the file's keys and every width and depth from its tensor shapes (read from the header
alone), as ComfyUI does, so a merged, pruned or reduced checkpoint loads as well as the original. From those a small
diffusers config folder is written to a temporary directory (model_index.json, one config per component, the CLIP
tokenizer files shipped in configs/clip_tokenizer) and diffusers' own single-file loader converts the tensors
(`from_single_file(..., config=folder, local_files_only=True)`). Nothing is downloaded; a file that is not one of
these families (a refiner, an inpainting model, a UNet-only or LoRA file, a truncated file) gets one MixQuantError
saying what it is. Flux.1 and SD3 files are dit_file.py's (load_pipeline sends them there).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from ...quant.errors import MixQuantError, reason

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "clip_tokenizer")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = {  # family -> [(component, prefix, layout)]
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "open_clip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")],
}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# The original training schedule of all three families (scaled-linear betas, 1000 steps), with DDIM's and Euler's
# config keys (from_config reads each class's own)
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}


@dataclass
class SingleFile:
    """What a checkpoint is, from its header: family, prediction type and each component's diffusers config."""
    path: str
    family: str  # sd1 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction
    configs: dict = field(default_factory=dict)  # component -> config dict (unet, vae, text_encoder[_2])

    @property
    def name(self) -> str:
        return FAMILY_NAMES[self.family] + (" (v-prediction)" if self.prediction_type == "v_prediction" else "")


def read_shapes(path: str) -> tuple[dict, dict]:
    """(key -> shape, metadata) without reading any tensor data; a damaged or truncated file is a MixQuantError."""
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata() or {}
        with open(path, "rb") as fh:  # safetensors checks the data's extent lazily: a truncated file fails late
            head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            end = fh.tell() + max((v["data_offsets"][1] for k, v in head.items() if k != "__metadata__"), default=0)
    except Exception as e:  # noqa: BLE001  (safetensors raises several types for a damaged header)
        raise MixQuantError(f"{name} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); the "
                            "download may be incomplete: download it again") from None
    if os.path.getsize(path) < end:
        raise MixQuantError(f"{name} is truncated ({os.path.getsize(path)} of {end} bytes); the download is "
                            "incomplete: download it again")
    return shapes, meta


def indices(shapes: dict, prefix: str) -> list[int]:
    """The distinct integers right after `prefix` in the keys (e.g. the block numbers under input_blocks.)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _family(shapes: dict, path: str) -> str:
    keys = shapes.keys()

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET):
        if has("double_blocks.") or has("model.diffusion_model.double_blocks.") or has("joint_blocks.") \
                or has("transformer_blocks.0.attn.add_q_proj") or has("single_transformer_blocks."):
            what = "a diffusion-transformer (Flux / SD3 family) file"
        elif any("lora_" in k or ".alpha" in k for k in keys):
            what = "a LoRA, not a model"
        elif has("input_blocks.") or has("down_blocks."):
            what = "a UNet without its text encoder and VAE (a UNet-only file)"
        else:
            what = "not a Stable Diffusion checkpoint MixQuant knows"
        raise MixQuantError(f"{os.path.basename(path)} is {what}; MixQuant loads full single-file checkpoints of "
                            "SD1.x, SD2.x and SDXL (UNet, VAE and text encoders in one .safetensors), or a diffusers "
                            "folder")
    if has(UNET + "double_blocks.") or has(UNET + "joint_blocks."):
        raise MixQuantError(f"{os.path.basename(path)} is a diffusion-transformer (Flux / SD3 family) checkpoint; "
                            "load it with load_pipeline, which reads those (dit_file.py)")
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise MixQuantError(f"{os.path.basename(path)} is an SDXL refiner; MixQuant quantizes the SDXL base model "
                            "(the refiner is not supported yet)")
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        family = "sdxl"
    elif has("cond_stage_model.transformer.text_model."):
        family = "sd1"
    elif has("cond_stage_model.model.transformer."):
        family = "sd2"
    else:
        raise MixQuantError(f"{os.path.basename(path)} holds a UNet but no text encoder MixQuant knows (a UNet-only "
                            "file or an unknown layout); use the full checkpoint (UNet, VAE and text encoders) of "
                            "SD1.x, SD2.x or SDXL, or a diffusers folder")
    if not has(VAE + "decoder."):
        raise MixQuantError(f"{os.path.basename(path)} has no VAE (first_stage_model.*); use a full checkpoint that "
                            "includes its VAE, or a diffusers folder")
    in_ch = shapes.get(UNET + "input_blocks.0.0.weight", (0, 0))[1]
    if in_ch != 4:
        kind = "an inpainting model" if in_ch == 9 else f"a model with {in_ch} input channels"
        raise MixQuantError(f"{os.path.basename(path)} is {kind}; MixQuant quantizes text-to-image models with 4 "
                            "latent channels (inpainting and instruct-pix2pix models are not supported yet)")
    return family


def _unet_config(s: dict, family: str) -> dict:
    """A diffusers UNet2DConditionModel config from the LDM UNet's shapes (levels, widths, depths per level)."""
    p = UNET
    ch = s[p + "input_blocks.0.0.weight"][0]
    levels = [[]]  # per level: (out channels, transformer depth) of each res block
    for i in indices(s, p + "input_blocks.")[1:]:
        b = f"{p}input_blocks.{i}."
        if b + "0.op.weight" in s:  # a downsample closes the level
            levels.append([])
            continue
        out = s[b + "0.out_layers.3.weight"][0]
        depth = len(indices(s, b + "1.transformer_blocks."))
        levels[-1].append((out, depth))
    if not levels[-1]:
        levels.pop()
    per_level = {len(lv) for lv in levels}
    if len(per_level) != 1:
        raise MixQuantError("this checkpoint's UNet has a different number of blocks per level; it is not an SD1.x, "
                            "SD2.x or SDXL layout MixQuant can build")
    widths = [lv[0][0] for lv in levels]
    depths = [lv[0][1] for lv in levels]
    mid_depth = len(indices(s, p + "middle_block.1.transformer_blocks."))
    attn_key = next(k for k in s if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in s if k.startswith(p) and k.endswith(".proj_in.weight"))
    tl = [d if d else (mid_depth or 1) for d in depths]
    if depths[-1] and mid_depth and depths[-1] != mid_depth:
        raise MixQuantError("this checkpoint's UNet has a middle block deeper than its last level; not an SD1.x, "
                            "SD2.x or SDXL layout MixQuant can build")
    heads = 8 if family == "sd1" else [max(1, w // 64) for w in widths]
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": widths,
        "center_input_sample": False, "cross_attention_dim": s[attn_key][1], "downsample_padding": 1,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": s[p + "input_blocks.0.0.weight"][1],
        "out_channels": s[p + "out.2.weight"][0], "layers_per_block": per_level.pop(),
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "transformer_layers_per_block": tl, "use_linear_projection": len(s[proj_in]) == 2,
        "upcast_attention": family == "sd2",
        "sample_size": {"sd1": 64, "sd2": 64, "sdxl": 128}[family],
    }
    if widths[0] != ch:
        raise MixQuantError("this checkpoint's UNet widths do not follow the SD layout; MixQuant cannot build it")
    if p + "label_emb.0.0.weight" in s:  # SDXL: pooled text embedding + 6 size/crop numbers of 256 each
        adm = s[p + "label_emb.0.0.weight"][1]
        pooled = s["conditioner.embedders.1.model.text_projection"][-1]
        if (adm - pooled) % 6:
            raise MixQuantError("this checkpoint's SDXL size conditioning does not have the SDXL layout")
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm,
                   addition_time_embed_dim=(adm - pooled) // 6)
    return cfg


def _vae_config(s: dict, family: str) -> dict:
    p = VAE + "encoder.down."
    levels = indices(s, p)
    widths = [s[f"{p}{i}.block.{indices(s, f'{p}{i}.block.')[-1]}.conv2.weight"][0] for i in levels]
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths), "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "in_channels": s[VAE + "encoder.conv_in.weight"][1], "out_channels": s[VAE + "decoder.conv_out.weight"][0],
        "latent_channels": s[VAE + "post_quant_conv.weight"][1] if VAE + "post_quant_conv.weight" in s
        else s[VAE + "decoder.conv_in.weight"][1],
        "layers_per_block": len(indices(s, f"{p}0.block.")), "norm_num_groups": 32,
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}[family],
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215, "force_upcast": family == "sdxl",
    }


def _text_config(s: dict, prefix: str, layout: str, component: str, family: str) -> dict:
    if layout == "hf":
        t = prefix + "text_model."
        vocab, hidden = s[t + "embeddings.token_embedding.weight"]
        positions = s[t + "embeddings.position_embedding.weight"][0]
        layers = len(indices(s, t + "encoder.layers."))
        inter = s[t + "encoder.layers.0.mlp.fc1.weight"][0]
        act, proj = "quick_gelu", hidden
    else:
        vocab, hidden = s[prefix + "token_embedding.weight"]
        positions = s[prefix + "positional_embedding"][0]
        layers = len(indices(s, prefix + "transformer.resblocks."))
        inter = s[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        act = "gelu"
        proj = s[prefix + "text_projection"][-1] if prefix + "text_projection" in s else hidden
        if family == "sd2" and layers == 24:
            # SD2 conditions on the penultimate layer: diffusers' SD2 text encoder stops there (its converter drops
            # the file's resblocks.23 by name; a reduced encoder keeps all its layers)
            layers -= 1
    with_projection = component == "text_encoder_2"
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": positions,
        "hidden_act": act, "projection_dim": proj, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1, "initializer_factor": 1.0, "initializer_range": 0.02, "attention_dropout": 0.0,
        "dropout": 0.0,
    }


def _is_v_prediction(s: dict, path: str, meta: dict, family: str) -> bool:
    """SD2.x 768-v from 512-base: a key some trainers write, or (ComfyUI's test) the spread of one LayerNorm bias
    near the output, which v-prediction training leaves much wider."""
    if "v_pred" in s or str(meta.get("modelspec.prediction_type", "")).startswith("v"):
        return True
    if family != "sd2":
        return False
    outs = [i for i in indices(s, UNET + "output_blocks.")
            if f"{UNET}output_blocks.{i}.1.transformer_blocks.0.norm1.bias" in s]
    if not outs:
        return False
    from safetensors import safe_open

    key = f"{UNET}output_blocks.{11 if 11 in outs else outs[-1]}.1.transformer_blocks.0.norm1.bias"
    with safe_open(path, framework="pt") as f:
        bias = f.get_tensor(key).float()
    return float(bias.std(unbiased=False)) > 0.09


def inspect_checkpoint(path: str) -> SingleFile:
    """The family, prediction type and diffusers configs of a single-file checkpoint, from its header."""
    shapes, meta = read_shapes(path)
    family = _family(shapes, path)
    try:
        configs = {"unet": _unet_config(shapes, family), "vae": _vae_config(shapes, family)}
        for component, prefix, layout in TEXT[family]:
            configs[component] = _text_config(shapes, prefix, layout, component, family)
    except (KeyError, StopIteration, IndexError, ValueError) as e:
        raise MixQuantError(f"{os.path.basename(path)} looks like {FAMILY_NAMES[family]} but a tensor it needs is "
                            f"missing or shaped unexpectedly ({e}); the file may be damaged or of an unknown layout"
                            ) from None
    pred = "v_prediction" if _is_v_prediction(shapes, path, meta, family) else "epsilon"
    if pred == "v_prediction":
        configs["unet"]["sample_size"] = 96
    return SingleFile(path, family, pred, configs)


def write_tokenizer(folder: str, pad: str) -> None:
    """A CLIP tokenizer folder: the shipped vocabulary, 77 tokens, `pad` as the padding token."""
    os.makedirs(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(folder, name))
    tok = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
           "add_prefix_space": False, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "pad_token": pad}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: tok[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)


def write_config_folder(sf: SingleFile, folder: str) -> str:
    """The diffusers config folder of `sf` (no weights): what from_single_file's `config=` reads."""
    xl = sf.family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "scheduler": ["diffusers", "EulerDiscreteScheduler" if xl else "DDIMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    files = {"model_index.json": index,
             "scheduler/scheduler_config.json": {
                 "_class_name": index["scheduler"][1], **SCHEDULE, "prediction_type": sf.prediction_type}}
    for component, cfg in sf.configs.items():
        files[f"{component}/config.json"] = cfg
    for rel, obj in files.items():
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(folder, rel), "w") as f:
            json.dump(obj, f, indent=1)
    # SD1's CLIP-L pads with the end token; OpenCLIP's tokenizers (SD2, SDXL's second) with "!"
    write_tokenizer(os.path.join(folder, "tokenizer"), "!" if sf.family == "sd2" else "<|endoftext|>")
    if xl:
        write_tokenizer(os.path.join(folder, "tokenizer_2"), "!")
    return folder


def load_single_file(path: str, dtype):
    """A diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) from a single-file checkpoint,
    offline, in `dtype`, on the CPU."""
    sf = inspect_checkpoint(path)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sf.family == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="mixquant-config-") as folder:
        write_config_folder(sf, folder)
        try:
            pipe = cls.from_single_file(path, config=folder, local_files_only=True, torch_dtype=dtype)
        except MixQuantError:
            raise
        except Exception as e:  # noqa: BLE001  (the converters raise KeyError/RuntimeError/ValueError on odd files)
            raise MixQuantError(f"could not load {os.path.basename(path)} as {sf.name}: {reason(e, 300)}; the file may "
                                "be damaged or of a layout MixQuant does not know") from None
    pipe.mixquant_source = {"single_file": os.path.basename(path), "family": sf.family,
                            "prediction_type": sf.prediction_type}
    return pipe
