"""Find the quantizable layers of a denoiser and label their role (method.md §4).

content: cross-attention and feed-forward layers (they decide *what* is drawn; scored by image structure).
quality: everything else (convs, resnets, self-attention, projections, embeddings; scored by SQNR).
Works on diffusers names (down_blocks…attn2.to_k, ff.net.0.proj), LDM names as in ComfyUI/A1111 checkpoints
(input_blocks.1.1.transformer_blocks.0.attn2…, ff.net) and DiT blocks (attn2 / joint-attention context
projections, ff / ff_context, txt_* / *_mlp streams). Nothing here assumes a UNet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from .layers import QuantConv2d, QuantLinear

_CONTENT = re.compile(
    r"(^|\.)(attn2|cross_attn|ff|ff_context|txt_attn|txt_mlp|img_mlp|mlp|context_block)(\.|$)"  # cross-attn, MLPs
    r"|(^|\.)(add_q_proj|add_k_proj|add_v_proj|to_add_out)$"  # the text stream of joint attention (SD3/Flux)
    r"|(^|\.)single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$"  # Flux single blocks: MLP in / fused out
    r"|(^|\.)single_blocks\.\d+\.(linear1|linear2)$"  # (the same, ComfyUI's names: qkv+MLP in, attn+MLP out)
)
# adaLN modulation (DiTs): per-image scale/shift/gate from the timestep (and pooled text) embedding; measured as
# quality layers (a fifth of Flux's weights: too large to keep 16-bit), weight-only in effect (one token per image)
_MODULATION = re.compile(r"(^|\.)(norm1|norm1_context|norm|img_mod|txt_mod|modulation)\.(linear|lin)$"
                         r"|(^|\.)adaLN_modulation\.1$")
# First and last layers stay 16-bit by default (MixDQ keeps conv_in/conv_out; DiTs their patch embed / final proj
# and the timestep / guidance / pooled-text / context embedders, diffusers' and ComfyUI's names).
_PROTECTED = re.compile(
    r"^(conv_in|conv_out|input_blocks\.0\.0|out\.2|x_embedder(\.proj)?|pos_embed\.proj|proj_out|"
    r"final_layer\.linear|img_in|final_layer\.adaLN_modulation\.1|norm_out\.linear|context_embedder|txt_in)$"
    r"|^(time_text_embed|time_in|vector_in|guidance_in|t_embedder|y_embedder)\."
)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # "linear" | "conv2d"
    role: str  # "content" | "quality"
    in_features: int  # K of the [N, K] weight matrix (conv: cin*kh*kw)
    out_features: int  # N
    params: int  # weight elements
    protected: bool


def quantizable(module: nn.Module) -> str | None:
    """'linear' / 'conv2d' for a layer we can quantize, else None."""
    if isinstance(module, (QuantLinear, QuantConv2d)):
        return "linear" if isinstance(module, QuantLinear) else "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str) \
            and module.padding_mode == "zeros":
        return "conv2d"
    return None


def is_transformer(layers: list[LayerInfo]) -> bool:
    """A diffusion transformer (no Conv2d to quantize: its patch embedding, if a conv, is protected), as opposed to a
    UNet: per-token activations, and the fast sensitivity's coherent estimate."""
    return not any(li.kind == "conv2d" and not li.protected for li in layers)


def layer_role(name: str) -> str:
    if _MODULATION.search(name):
        return "quality"
    return "content" if _CONTENT.search(name) else "quality"


def discover_layers(model: nn.Module, protect: tuple[str, ...] | None = None) -> list[LayerInfo]:
    """Every quantizable Linear/Conv2d in registration order. `protect` (regexes) overrides the default keep-16-bit
    list; with no default match at all (an unknown architecture) the first and last layers are protected."""
    found = []
    for name, m in model.named_modules():
        kind = quantizable(m)
        if kind is None:
            continue
        if kind == "linear":
            k, n = m.in_features, m.out_features
        else:
            k, n = m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels
        found.append((name, kind, k, n))
    pats = [re.compile(p) for p in protect] if protect is not None else [_PROTECTED]
    prot = {name for name, *_ in found if any(p.search(name) for p in pats)}
    if protect is None and not prot and found:
        prot = {found[0][0], found[-1][0]}
    return [LayerInfo(name, kind, layer_role(name), k, n, k * n, name in prot) for name, kind, k, n in found]
