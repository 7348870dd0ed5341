"""The names of the Flux.1 and SD3 (MMDiT) transformers in their original layout (Black Forest Labs' and Stability's
checkpoints, which ComfyUI loads as they are) against diffusers' layout, both ways.

The original layout fuses what diffusers keeps apart: Flux's `double_blocks.N.img_attn.qkv` is diffusers' to_q, to_k
and to_v stacked along the output rows, a single block's `linear1` is to_q, to_k, to_v and proj_mlp; SD3's
`x_block.attn.qkv` likewise; and the final adaLN modulation holds (shift, scale) where diffusers holds (scale, shift).
So each original module is a list of row ranges of diffusers modules, in order: one table, read one way to export a
diffusers model under ComfyUI's names (quant/native.py) and the other way to load an original single-file checkpoint
into diffusers (the file loader). The table is written from diffusers' own converters
(`convert_flux_transformer_checkpoint_to_diffusers`, `convert_sd3_transformer_checkpoint_to_diffusers`) and tested
equal to them; unlike the Flux converter (which fixes Flux.1's width) it takes every width and depth from the config,
so reduced test checkpoints map too.

torch only: nothing here imports diffusers or ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import MixQuantError

LINEAR = (("weight", "weight"), ("bias", "bias"))  # (original attribute, diffusers attribute)


@dataclass(frozen=True)
class Piece:
    module: str  # the diffusers module
    rows: tuple[int, int] | None = None  # its output rows [start, stop) taken; None: all


@dataclass(frozen=True)
class Entry:
    module: str  # the original module ("" for a tensor at the top level, e.g. SD3's pos_embed)
    pieces: tuple[Piece, ...]
    attrs: tuple[tuple[str, str], ...] = LINEAR

    @property
    def fused(self) -> bool:
        return len(self.pieces) > 1 or self.pieces[0].rows is not None


@dataclass
class Layout:
    family: str  # flux | sd3
    entries: list[Entry] = field(default_factory=list)

    def add(self, module: str, *pieces, attrs=LINEAR) -> None:
        self.entries.append(Entry(module, tuple(p if isinstance(p, Piece) else Piece(p) for p in pieces),
                                  tuple(attrs)))

    def rename(self, *pairs) -> None:
        for original, diffusers in pairs:
            self.add(original, diffusers)

    def by_source(self) -> dict:
        """diffusers module -> the entries it goes into."""
        out = {}
        for e in self.entries:
            for p in e.pieces:
                out.setdefault(p.module, []).append(e)
        return out


def _key(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _swap(module: str, rows: int) -> tuple[Piece, Piece]:
    """Original (shift, scale) from diffusers' (scale, shift) halves of an adaLN projection with `rows` outputs."""
    h = rows // 2
    return Piece(module, (h, rows)), Piece(module, (0, h))


def _thirds(base: str, names: tuple[str, str, str], width: int) -> list[Piece]:
    return [Piece(f"{base}.{n}", (0, width)) for n in names]


def flux_layout(config: dict) -> Layout:
    """Flux.1 (dev / schnell layout: double- then single-stream blocks) from a diffusers FluxTransformer2DModel
    config."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(inner * 4.0)  # diffusers' FluxSingleTransformerBlock: mlp_ratio 4
    lay = Layout("flux")
    lay.rename(("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
               ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
               ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
               ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"))
    if config.get("guidance_embeds"):
        lay.rename(("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                   ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"))
    lay.rename(("txt_in", "context_embedder"), ("img_in", "x_embedder"))
    norm = (("scale", "weight"),)
    for i in range(int(config["num_layers"])):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lay.rename((f"{o}.img_mod.lin", f"{d}.norm1.linear"), (f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"))
        lay.add(f"{o}.img_attn.qkv", *_thirds(f"{d}.attn", ("to_q", "to_k", "to_v"), inner))
        lay.add(f"{o}.txt_attn.qkv", *_thirds(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), inner))
        for orig, diff in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                           ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                           ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            lay.add(f"{o}.{orig}", f"{d}.{diff}", attrs=norm)
        lay.rename((f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"), (f"{o}.img_mlp.2", f"{d}.ff.net.2"),
                   (f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"), (f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"),
                   (f"{o}.img_attn.proj", f"{d}.attn.to_out.0"), (f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"))
    for i in range(int(config["num_single_layers"])):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lay.rename((f"{o}.modulation.lin", f"{d}.norm.linear"), (f"{o}.linear2", f"{d}.proj_out"))
        lay.add(f"{o}.linear1", *_thirds(f"{d}.attn", ("to_q", "to_k", "to_v"), inner),
                Piece(f"{d}.proj_mlp", (0, mlp)))
        lay.add(f"{o}.norm.query_norm", f"{d}.attn.norm_q", attrs=norm)
        lay.add(f"{o}.norm.key_norm", f"{d}.attn.norm_k", attrs=norm)
    lay.rename(("final_layer.linear", "proj_out"))
    lay.add("final_layer.adaLN_modulation.1", *_swap("norm_out.linear", 2 * inner))
    return lay


def sd3_layout(config: dict) -> Layout:
    """SD3 / SD3.5 (MMDiT: joint blocks, the last one's context stream ending before its output projection and MLP;
    SD3.5 Medium's second attention in the first blocks) from a diffusers SD3Transformer2DModel config."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    caption = int(config.get("caption_projection_dim") or inner)
    n = int(config["num_layers"])
    qk = bool(config.get("qk_norm"))
    lay = Layout("sd3")
    lay.add("", "pos_embed", attrs=(("pos_embed", "pos_embed"),))
    lay.rename(("x_embedder.proj", "pos_embed.proj"),
               ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
               ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
               ("context_embedder", "context_embedder"),
               ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
               ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"))
    dual = set(int(i) for i in (config.get("dual_attention_layers") or ()))
    for i in range(n):
        o, d, last = f"joint_blocks.{i}", f"transformer_blocks.{i}", i == n - 1
        x, c = f"{o}.x_block", f"{o}.context_block"
        lay.add(f"{x}.attn.qkv", *_thirds(f"{d}.attn", ("to_q", "to_k", "to_v"), inner))
        lay.add(f"{c}.attn.qkv", *_thirds(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), inner))
        if qk:
            for orig, diff in ((f"{x}.attn.ln_q", "attn.norm_q"), (f"{x}.attn.ln_k", "attn.norm_k"),
                               (f"{c}.attn.ln_q", "attn.norm_added_q"), (f"{c}.attn.ln_k", "attn.norm_added_k")):
                lay.add(orig, f"{d}.{diff}", attrs=(("weight", "weight"),))
        lay.rename((f"{x}.attn.proj", f"{d}.attn.to_out.0"), (f"{x}.adaLN_modulation.1", f"{d}.norm1.linear"),
                   (f"{x}.mlp.fc1", f"{d}.ff.net.0.proj"), (f"{x}.mlp.fc2", f"{d}.ff.net.2"))
        if i in dual:
            lay.add(f"{x}.attn2.qkv", *_thirds(f"{d}.attn2", ("to_q", "to_k", "to_v"), inner))
            if qk:
                lay.add(f"{x}.attn2.ln_q", f"{d}.attn2.norm_q", attrs=(("weight", "weight"),))
                lay.add(f"{x}.attn2.ln_k", f"{d}.attn2.norm_k", attrs=(("weight", "weight"),))
            lay.rename((f"{x}.attn2.proj", f"{d}.attn2.to_out.0"))
        if last:  # context_pre_only: (shift, scale) only, swapped like the final layer's
            lay.add(f"{c}.adaLN_modulation.1", *_swap(f"{d}.norm1_context.linear", 2 * caption))
        else:
            lay.rename((f"{c}.attn.proj", f"{d}.attn.to_add_out"),
                       (f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear"),
                       (f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj"), (f"{c}.mlp.fc2", f"{d}.ff_context.net.2"))
    lay.rename(("final_layer.linear", "proj_out"))
    lay.add("final_layer.adaLN_modulation.1", *_swap("norm_out.linear", 2 * caption))
    return lay


def layout_for(class_name: str, config: dict) -> Layout | None:
    """The table for a diffusers transformer class and config; None for any other model."""
    try:
        if class_name == "FluxTransformer2DModel":
            return flux_layout(config)
        if class_name == "SD3Transformer2DModel":
            return sd3_layout(config)
    except (KeyError, TypeError, ValueError) as e:
        raise MixQuantError(f"the {class_name} config lacks what its original layout needs ({e})") from None
    return None


def to_original(state: dict, layout: Layout) -> dict:
    """A diffusers state dict (tensor name -> tensor) under the original names; fused modules are concatenated along
    their output rows. Every tensor must have a place: anything the table does not cover is a MixQuantError."""
    out, used = {}, set()
    for e in layout.entries:
        for orig_attr, diff_attr in e.attrs:
            keys = [_key(p.module, diff_attr) for p in e.pieces]
            if not all(k in state for k in keys):
                if any(k in state for k in keys):
                    raise MixQuantError(f"{_key(e.module, orig_attr)}: only some of {keys} are present")
                continue
            parts = [state[k] if p.rows is None else state[k][p.rows[0]:p.rows[1]] for k, p in zip(keys, e.pieces)]
            out[_key(e.module, orig_attr)] = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            used.update(keys)
    left = sorted(set(state) - used)
    if left:
        raise MixQuantError(f"{len(left)} tensors have no place in the original {layout.family} layout (e.g. "
                            f"{left[0]}); the model is not of the layout its config says")
    return out


def from_original(state: dict, layout: Layout, prefix: str = "") -> dict:
    """An original-layout state dict (keys after `prefix`) under diffusers' names; fused modules are split at the
    table's row ranges. Missing or unexpected tensors, or a fused tensor of the wrong height, are a MixQuantError."""
    parts, used = {}, set()
    for e in layout.entries:
        for orig_attr, diff_attr in e.attrs:
            key = prefix + _key(e.module, orig_attr)
            if key not in state:
                continue
            t = state[key]
            used.add(key)
            if not e.fused:
                parts.setdefault(_key(e.pieces[0].module, diff_attr), []).append((0, t))
                continue
            height = sum(p.rows[1] - p.rows[0] for p in e.pieces)
            if t.shape[0] != height:
                raise MixQuantError(f"{key} has {t.shape[0]} rows where this layout has {height}; the file is not "
                                    f"a {layout.family} checkpoint of the widths its other tensors say")
            at = 0
            for p in e.pieces:
                n = p.rows[1] - p.rows[0]
                parts.setdefault(_key(p.module, diff_attr), []).append((p.rows[0], t[at:at + n]))
                at += n
    out = {}
    for k, chunks in parts.items():
        chunks.sort(key=lambda c: c[0])
        out[k] = chunks[0][1] if len(chunks) == 1 else torch.cat([c[1] for c in chunks], 0)
    left = sorted(k for k in state if k.startswith(prefix) and k not in used)
    if left:
        raise MixQuantError(f"{len(left)} tensors of the file have no place in the {layout.family} layout (e.g. "
                            f"{left[0]}); it is a variant MixQuant does not know")
    return out
