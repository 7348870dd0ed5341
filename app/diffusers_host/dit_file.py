"""Single-file Flux.1 and SD3 / SD3.5 checkpoints, loaded offline into a FluxPipeline / StableDiffusion3Pipeline.

Two forms are what artists have:
- one file with everything, as ComfyUI's Save Checkpoint writes it (and the "fp8 checkpoint" / "incl_clips" files):
  `model.diffusion_model.*` (the transformer in its original layout), `first_stage_model.*` or `vae.*` (the VAE),
  `text_encoders.clip_l.transformer.*`, `text_encoders.clip_g.transformer.*` (SD3), `text_encoders.t5xxl.transformer.*`;
- the diffusion model alone (`flux1-dev.safetensors`, `sd3.5_large.safetensors`) beside its text encoders and VAE as
  separate files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`, `ae.safetensors`): given as one MODEL argument
  joined by "+" (`flux1-dev.safetensors+clip_l.safetensors+t5xxl_fp16.safetensors+ae.safetensors`).
Each file's part is told from its keys, every width and depth from its shapes (headers only, as ComfyUI does, so
reduced test files load too); the transformer maps through quant/dit_names.py (the same table the native export
writes), the VAE through diffusers' own single-file converter, the text encoders load as the transformers models whose
layout they already have; the tokenizers are the shipped ones (configs/). SD3 runs without T5 where the files have none
(as diffusers allows); Flux needs its T5. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from ...quant.errors import MixQuantError, reason
from .single_file import indices, read_shapes, write_tokenizer

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")
MODEL = "model.diffusion_model."
TEXT = "text_encoders."
NAMES = {"flux": "Flux.1", "sd3": "SD3"}
# the VAE's latent statistics, which no tensor holds (diffusers' configs of the released models)
VAE_SCALE = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
NEEDS = {"flux": ("transformer", "vae", "clip_l", "t5xxl"), "sd3": ("transformer", "vae", "clip_l", "clip_g")}
PART_NAMES = {"transformer": "the diffusion model", "vae": "the VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G",
              "t5xxl": "T5-XXL"}


def dit_family(shapes: dict) -> str | None:
    """'flux' / 'sd3' when the keys hold a Flux.1 / SD3 transformer (with or without ComfyUI's prefix), else None."""
    for k in shapes:
        k = k[len(MODEL):] if k.startswith(MODEL) else k
        if k.startswith("double_blocks."):
            return "flux"
        if k.startswith("joint_blocks."):
            return "sd3"
    return None


def _parts_of(path: str, shapes: dict) -> dict:
    """The parts one file holds: part -> key prefix."""
    keys = list(shapes)
    out = {}
    if dit_family(shapes):
        out["transformer"] = MODEL if any(k.startswith(MODEL) for k in keys) else ""
    for prefix in ("first_stage_model.", "vae."):
        if f"{prefix}decoder.conv_in.weight" in shapes:
            out["vae"] = prefix
    if "decoder.conv_in.weight" in shapes and "encoder.conv_in.weight" in shapes:
        out["vae"] = ""
    for name in ("clip_l", "clip_g", "t5xxl"):
        if any(k.startswith(f"{TEXT}{name}.transformer.") for k in keys):
            out[name] = f"{TEXT}{name}.transformer."
    if "text_model.embeddings.token_embedding.weight" in shapes:  # a CLIP file: L or G by width (Source decides)
        out["clip"] = ""
    if "shared.weight" in shapes and "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        out["t5xxl"] = ""
    return out


class Source:
    """Where each part lives: part -> (path, prefix, the file's shapes)."""

    def __init__(self, paths: list[str]):
        self.parts, self.family, self.shapes = {}, None, {}
        clips = []  # CLIP files on their own: (width, order, path)
        for path in paths:
            shapes, _ = read_shapes(path)
            found = _parts_of(path, shapes)
            if not found:
                raise MixQuantError(f"{os.path.basename(path)} holds none of the parts of a Flux or SD3 model "
                                    "(diffusion model, VAE, CLIP-L, CLIP-G, T5-XXL)")
            if "clip" in found:
                clips.append((shapes["text_model.embeddings.token_embedding.weight"][1], len(clips), path))
                del found["clip"]
            for part, prefix in found.items():
                if part in self.parts:
                    raise MixQuantError(f"{PART_NAMES[part]} is in both {os.path.basename(self.parts[part][0])} and "
                                        f"{os.path.basename(path)}; give each part once")
                self.parts[part] = (path, prefix)
            self.shapes[path] = shapes
            if "transformer" in found:
                self.family = dit_family(shapes)
        # CLIP-L is 768 wide, CLIP-G 1280: of two files the narrower is L; one file alone is G only at G's width
        if len(clips) > 2:
            raise MixQuantError(f"{len(clips)} CLIP text-encoder files given; a Flux or SD3 model has at most two")
        names = ["clip_l", "clip_g"] if len(clips) == 2 else ["clip_g" if clips and clips[0][0] >= 1280 else "clip_l"]
        for name, (_, _, path) in zip(names, sorted(clips)):
            if name in self.parts:
                raise MixQuantError(f"{PART_NAMES[name]} is in both {os.path.basename(self.parts[name][0])} and "
                                    f"{os.path.basename(path)}; give each part once")
            self.parts[name] = (path, "")
        if self.family is None:
            raise MixQuantError("none of the files holds a Flux or SD3 diffusion model; give the diffusion model first")
        missing = [p for p in NEEDS[self.family] if p not in self.parts]
        if missing:
            have = ", ".join(f"{PART_NAMES[p]} ({os.path.basename(v[0])})" for p, v in self.parts.items())
            raise MixQuantError(
                f"a {NAMES[self.family]} model needs {', '.join(PART_NAMES[p] for p in missing)} as well (found: "
                f"{have}); give the missing files joined to the model with '+', e.g. "
                f"{os.path.basename(self.parts['transformer'][0])}+clip_l.safetensors+"
                f"{'t5xxl_fp16' if self.family == 'flux' else 'clip_g'}.safetensors+"
                f"{'ae' if self.family == 'flux' else 'vae'}.safetensors")

    def part_shapes(self, part: str) -> dict:
        path, prefix = self.parts[part]
        return {k[len(prefix):]: v for k, v in self.shapes[path].items() if k.startswith(prefix)}

    def read(self, part: str, dtype, keys=None) -> dict:
        """The part's tensors (prefix removed) in `dtype` (floating tensors only)."""
        from safetensors import safe_open

        path, prefix = self.parts[part]
        out = {}
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                if k.startswith(prefix) and (keys is None or k[len(prefix):] in keys):
                    t = f.get_tensor(k)
                    out[k[len(prefix):]] = t.to(dtype) if t.is_floating_point() else t
        return out


def transformer_config(family: str, s: dict) -> dict:
    """The diffusers transformer config from the original layout's shapes (keys without prefix)."""
    if family == "flux":
        inner, in_ch = s["img_in.weight"]
        head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        first = max(2, (head // 8) // 2 * 2)  # Flux.1: 16 of 128 for the image index, 56 + 56 for the position
        rest = (head - first) // 2
        cfg = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_ch,
               "num_layers": len(indices(s, "double_blocks.")),
               "num_single_layers": len(indices(s, "single_blocks.")),
               "attention_head_dim": head, "num_attention_heads": inner // head,
               "joint_attention_dim": s["txt_in.weight"][1], "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
               "guidance_embeds": "guidance_in.in_layer.weight" in s,
               "axes_dims_rope": [first, rest, head - first - rest]}
        out = s["final_layer.linear.weight"][0]
        if out != in_ch:
            cfg["out_channels"] = out
        return cfg
    inner, in_ch, p, _ = s["x_embedder.proj.weight"]
    n = len(indices(s, "joint_blocks."))
    head = s["joint_blocks.0.x_block.attn.ln_q.weight"][0] if "joint_blocks.0.x_block.attn.ln_q.weight" in s else 64
    dual = [i for i in range(n) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in s]
    patches = s["pos_embed"][1]
    side = int(round(patches ** 0.5))
    cfg = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": p, "in_channels": in_ch,
           "num_layers": n, "attention_head_dim": head, "num_attention_heads": inner // head,
           "joint_attention_dim": s["context_embedder.weight"][1],
           "caption_projection_dim": s["context_embedder.weight"][0],
           "pooled_projection_dim": s["y_embedder.mlp.0.weight"][1],
           "out_channels": s["final_layer.linear.weight"][0] // (p * p), "pos_embed_max_size": side}
    if "joint_blocks.0.x_block.attn.ln_q.weight" in s:  # (SD3.5; SD3 Medium has no q/k norm, its heads are 64 wide)
        cfg["qk_norm"] = "rms_norm"
    if dual:
        cfg["dual_attention_layers"] = dual
    if side * side != patches:
        raise MixQuantError(f"the SD3 position table has {patches} entries, not a square; unknown layout")
    return cfg


def _vae_config(family: str, s: dict) -> dict:
    p = "encoder.down."
    levels = indices(s, p)
    widths = [s[f"{p}{i}.block.{indices(s, f'{p}{i}.block.')[-1]}.conv2.weight"][0] for i in levels]
    scale, shift = VAE_SCALE[family]
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": widths,
            "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "in_channels": s["encoder.conv_in.weight"][1],
            "out_channels": s["decoder.conv_out.weight"][0], "latent_channels": s["decoder.conv_in.weight"][1],
            "layers_per_block": len(indices(s, f"{p}0.block.")),
            "norm_num_groups": min(32, s["encoder.conv_in.weight"][0]), "sample_size": 1024,
            "scaling_factor": scale, "shift_factor": shift, "use_quant_conv": "quant_conv.weight" in s,
            "use_post_quant_conv": "post_quant_conv.weight" in s}


def _clip(src: Source, part: str, dtype, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    s = src.part_shapes(part)
    t = "text_model."
    vocab, hidden = s[t + "embeddings.token_embedding.weight"]
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=s[t + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(indices(s, t + "encoder.layers.")), num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=s[t + "embeddings.position_embedding.weight"][0],
        hidden_act="gelu" if part == "clip_g" else "quick_gelu",
        projection_dim=s["text_projection.weight"][0] if "text_projection.weight" in s else hidden,
        bos_token_id=0, eos_token_id=2, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    want = None if projection else {k for k in s if k.startswith(t)}
    return _materialize(cls, cfg, src.read(part, dtype, want), part)


def _t5(src: Source, dtype):
    from transformers import T5Config, T5EncoderModel

    s = src.part_shapes("t5xxl")
    vocab, d = s["shared.weight"]
    rel = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    ff = s["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    cfg = T5Config(vocab_size=vocab, d_model=d, d_ff=ff, num_layers=len(indices(s, "encoder.block.")),
                   num_heads=rel[1], d_kv=s["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // rel[1],
                   relative_attention_num_buckets=rel[0], feed_forward_proj="gated-gelu" if gated else "relu",
                   is_encoder_decoder=False, use_cache=False)
    tensors = src.read("t5xxl", dtype, {k for k in s if k.startswith(("shared.", "encoder."))})
    tensors.setdefault("encoder.embed_tokens.weight", tensors["shared.weight"])
    return _materialize(T5EncoderModel, cfg, tensors, "t5xxl")


def _materialize(cls, cfg, tensors: dict, part: str):
    """A transformers model built without allocating its weights, then given the file's tensors."""
    with torch.device("meta"):
        model = cls(cfg)
    names = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in names):  # (transformers 5's CLIPTextModel drops the prefix)
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (CLIP's position ids) are rebuilt
        if buf.is_meta and name.endswith("position_ids"):
            mod = model.get_submodule(name.rpartition(".")[0])
            mod.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        what = (missing or unexpected or left)[0]
        raise MixQuantError(f"{PART_NAMES[part]}: the file's tensors do not fit the model its shapes describe "
                            f"({len(missing) + len(left)} missing, {len(unexpected)} unexpected, e.g. {what}); the "
                            "file may be damaged or of an unknown layout")
    return model.eval()


def load_dit_files(paths: list[str], dtype):
    """A FluxPipeline / StableDiffusion3Pipeline from single files (see the module doc), offline, in `dtype`."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTokenizer, T5TokenizerFast

    from ...quant.dit_names import from_original, layout_for

    src = Source(paths)
    fam = src.family
    name = os.path.basename(src.parts["transformer"][0])
    try:
        cfg = transformer_config(fam, src.part_shapes("transformer"))
        vae_cfg = _vae_config(fam, src.part_shapes("vae"))
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise MixQuantError(f"{name} looks like {NAMES[fam]} but a tensor it needs is missing or shaped unexpectedly "
                            f"({e}); the file may be damaged or of an unknown layout") from None
    cls = FluxTransformer2DModel if fam == "flux" else SD3Transformer2DModel
    with tempfile.TemporaryDirectory(prefix="mixquant-config-") as folder:
        for sub, c in (("transformer", cfg), ("vae", vae_cfg)):
            os.makedirs(os.path.join(folder, sub))
            with open(os.path.join(folder, sub, "config.json"), "w") as f:
                json.dump(c, f)
        try:
            state = from_original(src.read("transformer", dtype), layout_for(cls.__name__, cfg))
            tr = cls.from_single_file(state, config=folder, subfolder="transformer", local_files_only=True,
                                      torch_dtype=dtype)
            del state
            vae = AutoencoderKL.from_single_file(src.read("vae", dtype), config=folder, subfolder="vae",
                                                 local_files_only=True, torch_dtype=dtype)
        except MixQuantError:
            raise
        except Exception as e:  # noqa: BLE001  (the loaders raise several types on an odd file)
            raise MixQuantError(f"could not load {name} as {NAMES[fam]}: {reason(e, 300)}; the file may be damaged or of "
                                "a layout MixQuant does not know") from None
        with tempfile.TemporaryDirectory(prefix="mixquant-tok-") as tok:
            write_tokenizer(os.path.join(tok, "clip"), "<|endoftext|>")
            clip_tok = CLIPTokenizer.from_pretrained(os.path.join(tok, "clip"), local_files_only=True)
        t5_tok = T5TokenizerFast.from_pretrained(os.path.join(CONFIGS, "t5_tokenizer"), local_files_only=True)
    t5 = _t5(src, dtype) if "t5xxl" in src.parts else None
    if fam == "flux":
        dev = cfg["guidance_embeds"]  # dev: the resolution-shifted schedule; schnell: the plain one
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0 if dev else 1.0, use_dynamic_shifting=dev,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=_clip(src, "clip_l", dtype, False),
                            tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=tr)
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=_clip(src, "clip_l", dtype, True), tokenizer=clip_tok,
            text_encoder_2=_clip(src, "clip_g", dtype, True), tokenizer_2=clip_tok,
            text_encoder_3=t5, tokenizer_3=t5_tok if t5 is not None else None)
    pipe.mixquant_source = {"single_file": "+".join(os.path.basename(p) for p in paths), "family": fam}
    return pipe
