"""Export a quantized denoiser in ComfyUI's own per-layer quantized format, which stock ComfyUI (>= v0.27 with
comfy-kitchen) loads with no MixQuant installed (facts: shared/comfy-native-quant.md).

Each exported Linear gets a `<layer>.comfy_quant` marker (uint8 bytes of a JSON object) beside its tensors:
- W8 per-row symmetric + dynamic per-token A8 (our W8A8d) -> `int8_tensorwise`: `weight` int8 [N, K], `weight_scale`
  fp32 [N, 1] (per row; never [N]: comfy-kitchen's dequantize needs the trailing 1).
- W4 asymmetric, group 64 along K, 16-bit activations (our W4g64A16) -> `awq_w4a16`: `weight` int8 [N, K/2] (our
  packed codes as they are: low nibble = even column in both layouts), `weight_scale` and `weight_zeros` fp16
  [K/64, N] (transposed). comfy-kitchen decodes (u - 8) * s + zeros, ours is (u - z) * s, so zeros = (8 - z) * s.
  The key is `weight_zeros`: that is what comfy-kitchen 0.2.40 (`TensorCoreAWQW4A16Layout.state_dict_tensors`) and
  ComfyUI's loader read; `weight_zero` (singular) appears only in comfy-quants' docs.
- fp8 (float8 e4m3) weights -> `float8_e4m3fn`: `weight` float8_e4m3fn [N, K] with ONE fp32 `weight_scale` (the
  format has no per-channel scales: the weight is requantized from our per-channel codes at absmax / 448, a second
  rounding), plus the static activations' `input_scale` (fp32 scalar; the largest over timestep groups) for W8A8-fp8,
  which ComfyUI then runs through `torch._scaled_mm` on fp8 GPUs. Per-token fp8 activations (W8A8d-fp8) and weight-
  only W8A16-fp8 are marked `full_precision_matrix_mult` (fp8 weights, float activations: ComfyUI has no dynamic fp8
  activations).
Everything the format cannot express stays float (fp16): every Conv2d, static activation ranges, 2-bit weights,
weight-only 8-bit, other group sizes, BOS-aware layers, and every tensor that is not a quantized layer's weight.
A weight kept float is the dequantized weight of our layer (the FP weight is not in a quantized model).

torch only: nothing here imports ComfyUI or comfy-kitchen.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from ..kernels import fp8
from .errors import MixQuantError
from .layers import QuantLayer, QuantLinear
from .util import write_atomic

AWQ_GROUP = 64
MARKER = "comfy_quant"


def marker_tensor(conf: dict) -> torch.Tensor:
    """The `.comfy_quant` entry exactly as ComfyUI writes it: the UTF-8 bytes of the JSON as a 1-D uint8 tensor."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def read_marker(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def native_format(layer: QuantLayer) -> tuple[str | None, str]:
    """(native format name or None, reason). None: the layer is exported as a float weight."""
    f = layer.fmt
    if not isinstance(layer, QuantLinear):
        return None, "conv2d (ComfyUI's quantized ops have no Conv2d)"
    if f.w_bits >= 16:
        return None, "float in the plan"
    if layer.bos_out is not None:
        return None, "BOS token computed in full precision (not expressible)"
    if layer.smooth is not None:
        return None, "balanced input channels (not expressible)"
    if f.w_fp8:
        if f.a_fp8 and f.a_mode == "static":
            if layer.a_split is not None:
                return None, "split activation ranges (not expressible)"
            return "float8_e4m3fn", "fp8 weights (per-tensor scale) + static per-tensor fp8 activations"
        return "float8_e4m3fn", "fp8 weights (per-tensor scale), float activations (full_precision_matrix_mult)"
    if f.w_bits == 8 and f.symmetric and f.group_size is None and f.a_bits == 8 and f.a_mode == "dynamic":
        return "int8_tensorwise", "W8 per-row + dynamic per-token A8"
    if f.w_bits == 4 and not f.symmetric and f.group_size == AWQ_GROUP and f.a_bits >= 16:
        if layer.k % AWQ_GROUP:
            return None, f"K={layer.k} is not a multiple of {AWQ_GROUP}"
        return "awq_w4a16", "W4 asymmetric group-64, 16-bit activations"
    if f.a_bits < 16 and f.a_mode == "static":
        return None, f"{f.name}: static activation ranges (native activations are dynamic only)"
    return None, f"{f.name} has no native equivalent"


def native_layer_tensors(layer: QuantLayer) -> tuple[dict, dict | None, str]:
    """Tensors of one quantized layer under key suffixes ('weight', 'weight_scale', ...), its marker JSON (None:
    float) and the reason. Float weights are fp16 in the float layer's shape."""
    fmt, why = native_format(layer)
    out = {}
    blob = layer.weight if (layer.packed or layer.fmt.w_bits >= 16) else layer._pack(layer.weight)
    if fmt == "int8_tensorwise":
        codes, scale, _ = layer.packed_parts(blob)
        out["weight"] = codes.contiguous().clone()  # int8 [N, K]
        out["weight_scale"] = scale.float().reshape(-1, 1).contiguous()  # fp32 [N, 1]: the same values exactly
        conf = {"format": fmt}
    elif fmt == "awq_w4a16":
        codes, scale, zero = layer.packed_parts(blob)
        out["weight"] = codes.contiguous().view(torch.int8).clone()  # [N, K/2], low nibble = even column
        s = scale.float()
        out["weight_scale"] = scale.t().contiguous()  # fp16 [K/G, N]
        out["weight_zeros"] = ((8.0 - zero.float()) * s).to(torch.float16).t().contiguous()
        conf = {"format": fmt, "group_size": AWQ_GROUP}
    elif fmt == "float8_e4m3fn":
        w = layer.dequantized_weight().float()  # (not balanced: native_format refuses balanced layers)
        w_scale = (w.abs().amax() / fp8.E4M3_MAX).clamp(min=1e-12)
        out["weight"] = fp8.to_e4m3(w / w_scale).contiguous()
        out["weight_scale"] = w_scale.reshape(()).float()
        conf = {"format": fmt}
        if layer.fmt.a_fp8 and layer.fmt.a_mode == "static":
            out["input_scale"] = layer.input_scale.detach().float().amax().reshape(()).cpu()
        else:
            conf["full_precision_matrix_mult"] = True
    else:
        w = layer.unbalanced_weight()
        out["weight"] = layer._from_2d(w.float()).to(torch.float16).contiguous()
        conf = None
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(torch.float16).contiguous()
    return out, conf, why


@dataclass
class NativeExport:
    tensors: dict
    native_layers: dict = field(default_factory=dict)  # exported name -> native format
    float_layers: dict = field(default_factory=dict)  # exported name -> why it stays float
    requantized: dict = field(default_factory=dict)  # exported native name -> which of its parts were requantized
    native_bytes: int = 0  # bytes of the natively quantized layers' tensors (weights, scales, zeros, markers)
    total_bytes: int = 0
    naming: str = ""

    def add_layer(self, name: str, tensors: dict, conf: dict | None, why: str) -> None:
        layer_bytes = 0
        for suffix, t in tensors.items():
            self.tensors[f"{name}.{suffix}"] = t.detach().cpu()
            layer_bytes += t.numel() * t.element_size()
        if conf is None:
            self.float_layers[name] = why
        else:
            m = marker_tensor(conf)
            self.tensors[f"{name}.{MARKER}"] = m
            self.native_layers[name] = conf["format"]
            self.native_bytes += layer_bytes + m.numel()
            if "requantized" in why:
                self.requantized[name] = why

    def add_tensor(self, key: str, v: torch.Tensor) -> None:
        self.tensors[key] = (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().contiguous()

    def summary(self) -> dict:
        counts = {}
        for f in self.native_layers.values():
            counts[f] = counts.get(f, 0) + 1
        return {"native_layers": len(self.native_layers), "native_formats": counts,
                "float_quantized_layers": len(self.float_layers), "requantized_layers": len(self.requantized),
                "native_bytes": self.native_bytes,
                "total_bytes": self.total_bytes, "naming": self.naming}


def export_native(layers: dict, rest: dict, rename=None, naming: str = "", layout=None) -> NativeExport:
    """Build the native state dict from quantized layers (name -> QuantLayer) and the other tensors of the denoiser
    (name -> tensor). `rename(name) -> name` maps module / tensor names (e.g. diffusers -> LDM); None keeps them.
    `layout` (a quant.dit_names.Layout) instead maps a diffusers transformer to its original layout, where one
    exported layer may join several of ours (_merge)."""
    if layout is not None:
        return _export_layout(layers, rest, layout, naming)
    rename = rename or (lambda n: n)
    exp = NativeExport({}, naming=naming)
    for name, layer in layers.items():
        tensors, conf, why = native_layer_tensors(layer)
        exp.add_layer(rename(name), tensors, conf, why)
    for k, v in rest.items():
        if isinstance(v, torch.Tensor):
            exp.add_tensor(rename_tensor(k, rename), v)
    exp.total_bytes = sum(t.numel() * t.element_size() for t in exp.tensors.values())
    return exp


# --- one exported layer from several of ours (a diffusers transformer in its original layout) -----------------------
# The original Flux / SD3 layout stacks layers diffusers keeps apart (qkv = to_q, to_k, to_v along the output rows).
# Row-wise formats stack exactly (int8_tensorwise: per-row scales; awq_w4a16: scales per output column of [K/G, N]);
# parts planned in different formats are brought to the most precise one among them (float > int8 > fp8 > W4), each
# part requantized from its own dequantized weight, so a part already in that format keeps its codes; fp8 has one
# scale per tensor, so a stacked fp8 layer is requantized as a whole.
_PRECISION = {None: 3, "int8_tensorwise": 2, "float8_e4m3fn": 1, "awq_w4a16": 0}


@dataclass
class _Part:
    fmt: str | None
    tensors: dict
    conf: dict | None
    why: str
    dense: object  # () -> the part's float weight, fp32 [n, K]
    static_fp8: torch.Tensor | None = None  # the input scale of a static fp8 part


def _part(name: str, layer: QuantLayer | None, rest: dict, rows) -> _Part:
    if layer is not None:
        tensors, conf, why = native_layer_tensors(layer)
        fmt = conf["format"] if conf else None
        part = _Part(fmt, tensors, conf, why, lambda: layer.unbalanced_weight().float(),
                     tensors.get("input_scale"))
    else:
        tensors = {a: rest[f"{name}.{a}"].detach().to(torch.float16) for a in ("weight", "bias")
                   if f"{name}.{a}" in rest}
        part = _Part(None, tensors, None, "float in the model", lambda: tensors["weight"].float())
    if rows is None:
        return part
    a, b = rows
    t, dense = dict(part.tensors), part.dense
    if "bias" in t:
        t["bias"] = t["bias"][a:b]
    if part.fmt != "float8_e4m3fn":  # (fp8 parts are requantized from `dense` when stacked)
        t["weight"] = t["weight"][a:b]
    if part.fmt == "int8_tensorwise":
        t["weight_scale"] = t["weight_scale"][a:b]
    elif part.fmt == "awq_w4a16":
        t["weight_scale"], t["weight_zeros"] = t["weight_scale"][:, a:b], t["weight_zeros"][:, a:b]
    return _Part(part.fmt, t, part.conf, part.why, lambda: dense()[a:b], part.static_fp8)


def _int8_rows(w: torch.Tensor) -> dict:
    scale = (w.abs().amax(1, keepdim=True) / 127.0).clamp(min=1e-12)
    return {"weight": torch.round(w / scale).clamp(-127, 127).to(torch.int8), "weight_scale": scale.float()}


def _merge(parts: list[_Part]) -> tuple[dict, dict | None, str]:
    """One exported layer's tensors, marker and reason from its parts (in row order)."""
    if len(parts) == 1:
        p = parts[0]
        return p.tensors, p.conf, p.why
    fmts = [p.fmt for p in parts]
    target = max(fmts, key=_PRECISION.get)
    out = {}
    if target == "awq_w4a16" or (target == "int8_tensorwise" and len(set(fmts)) == 1):
        for key in ("weight", "weight_scale", "weight_zeros"):
            if key in parts[0].tensors:
                out[key] = torch.cat([p.tensors[key] for p in parts], 1 if key != "weight" and target == "awq_w4a16"
                                     else 0).contiguous()
        conf = dict(parts[0].conf)
    elif target == "int8_tensorwise":
        rows = [p.tensors if p.fmt == target else _int8_rows(p.dense()) for p in parts]
        out = {k: torch.cat([r[k] for r in rows], 0).contiguous() for k in ("weight", "weight_scale")}
        conf = {"format": target}
    elif target == "float8_e4m3fn":
        w = torch.cat([p.dense() for p in parts], 0)
        w_scale = (w.abs().amax() / fp8.E4M3_MAX).clamp(min=1e-12)
        out = {"weight": fp8.to_e4m3(w / w_scale).contiguous(), "weight_scale": w_scale.reshape(()).float()}
        conf = {"format": target}
        if all(p.static_fp8 is not None for p in parts):  # every part reads this input through one static range
            out["input_scale"] = torch.stack([p.static_fp8.reshape(()) for p in parts]).amax()
        else:
            conf["full_precision_matrix_mult"] = True
    else:
        out = {"weight": torch.cat([p.dense() for p in parts], 0).to(torch.float16).contiguous()}
        conf = None
    biases = [p.tensors.get("bias") for p in parts]
    if any(b is not None for b in biases):
        n = [p.tensors["weight"].shape[0] if p.fmt != "float8_e4m3fn" else p.dense().shape[0] for p in parts]
        out["bias"] = torch.cat([b if b is not None else torch.zeros(k, dtype=torch.float16)
                                 for b, k in zip(biases, n)]).to(torch.float16).contiguous()
    if len(set(fmts)) == 1:
        why = parts[0].why
    else:
        why = (f"joins parts planned as {', '.join(f or 'float' for f in fmts)}: the others requantized to "
               f"{target or 'float (fp16)'}")
    return out, conf, why


def _export_layout(layers: dict, rest: dict, layout, naming: str) -> NativeExport:
    from .dit_names import Layout, to_original

    exp = NativeExport({}, naming=naming)
    plain, taken = [], set()
    for e in layout.entries:
        if not any(p.module in layers for p in e.pieces):
            plain.append(e)
            continue
        parts = [_part(p.module, layers.get(p.module), rest, p.rows) for p in e.pieces]
        taken.update(p.module for p in e.pieces)
        tensors, conf, why = _merge(parts)
        exp.add_layer(e.module, tensors, conf, why)
    missing = sorted(set(layers) - taken)
    if missing:
        raise MixQuantError(f"{len(missing)} quantized layers have no place in the original {layout.family} layout "
                            f"(e.g. {missing[0]}); the file's architecture entry does not match its layers")
    prefixes = tuple(m + "." for m in taken)
    tensors = {k: v for k, v in rest.items() if isinstance(v, torch.Tensor) and not k.startswith(prefixes)}
    for k, v in to_original(tensors, Layout(layout.family, plain)).items():
        exp.add_tensor(k, v)
    exp.total_bytes = sum(t.numel() * t.element_size() for t in exp.tensors.values())
    return exp


def rename_tensor(key: str, rename) -> str:
    mod, _, attr = key.rpartition(".")
    return f"{rename(mod)}.{attr}" if mod else key


def split_model(model: torch.nn.Module) -> tuple[dict, dict]:
    """(quantized layers by name, every other tensor of the model by name)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    prefixes = tuple(n + "." for n in layers)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    return layers, rest


def save_native(exp: NativeExport, path: str, metadata: dict | None = None) -> int:
    """Write atomically; returns the file size. The header carries a `mixquant_export` summary only (ComfyUI reads
    the per-layer markers, not the header)."""
    from safetensors.torch import save_file

    meta = {"mixquant_export": json.dumps({**exp.summary(), **(metadata or {})})}
    return write_atomic(path, lambda tmp: save_file(exp.tensors, tmp, metadata=meta))


# --- diffusers UNet2DConditionModel names -> LDM (ComfyUI / A1111 checkpoint) names ---------------------------------
# Written from the two layouts: a diffusers down block i has L resnets (+ attentions) and a downsampler; LDM numbers
# every module of the encoder in one list `input_blocks` (0 = conv_in), the decoder in `output_blocks` (L + 1 per
# level), and names the resnet parts in_layers / emb_layers / out_layers.

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
        "class_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def sd_family(config: dict) -> str | None:
    """'SD1.x' / 'SD2.x' / 'SDXL' when a diffusers UNet config has the layout ComfyUI detects as such (320 base
    channels, 4 latent channels, that context width), else None."""
    try:
        if int(config.get("in_channels", 0)) != 4 or int(list(config["block_out_channels"])[0]) != 320:
            return None
        ctx = config.get("cross_attention_dim")
        ctx = int(ctx[0] if isinstance(ctx, (list, tuple)) else ctx)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if ctx == 2048 and config.get("addition_embed_type") == "text_time":
        return "SDXL"
    return {768: "SD1.x", 1024: "SD2.x"}.get(ctx)


def diffusers_to_ldm(config: dict):
    """A function mapping a diffusers UNet2DConditionModel module name to its LDM name (identity for names it does
    not know, e.g. inside transformer blocks, which both layouts name alike)."""
    n_levels = len(config["block_out_channels"])
    lpb = config.get("layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n_levels
    up_types = list(config.get("up_block_types", []))
    up_attn = ["CrossAttn" in t for t in up_types]
    down_start, pos = [], 1
    for i in range(n_levels):  # index of the first input block of each level
        down_start.append(pos)
        pos += lpb[i] + (1 if i < n_levels - 1 else 0)
    rev = list(reversed(lpb))
    up_start, pos = [], 0
    for i in range(n_levels):
        up_start.append(pos)
        pos += rev[i] + 1

    def resnet_part(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET.get(head, head) + (f".{tail}" if tail else "")

    def rename(name: str) -> str:
        for k, v in _TOP.items():
            if name == k or name.startswith(k + "."):
                return v + name[len(k):]
        m = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", name)
        if m:
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
            if kind == "downsamplers":
                base = f"input_blocks.{down_start[i] + lpb[i]}.0"
                return base + "." + rest.replace("conv", "op", 1) if rest else base
            base = f"input_blocks.{down_start[i] + j}.{0 if kind == 'resnets' else 1}"
            return base + ("." + (resnet_part(rest) if kind == "resnets" else rest) if rest else "")
        m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
        if m:
            kind, j, rest = m[1], int(m[2]), m[3] or ""
            idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, j))
            if idx is None:
                return name
            base = f"middle_block.{idx}"
            return base + ("." + (resnet_part(rest) if kind == "resnets" else rest) if rest else "")
        m = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", name)
        if m:
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
            if kind == "upsamplers":
                base = f"output_blocks.{up_start[i] + rev[i]}.{2 if (i < len(up_attn) and up_attn[i]) else 1}"
                return base + ("." + rest if rest else "")
            base = f"output_blocks.{up_start[i] + j}.{0 if kind == 'resnets' else 1}"
            return base + ("." + (resnet_part(rest) if kind == "resnets" else rest) if rest else "")
        return name

    return rename


def naming_for(architecture: dict):
    """(rename function or None, dit_names.Layout or None, description) for a MixQuant file's architecture entry."""
    from .dit_names import layout_for

    lib, cls = architecture.get("library"), architecture.get("class")
    if lib == "comfyui":
        return None, None, "LDM names (as ComfyUI's loaders expect them)"
    if lib == "diffusers" and cls == "UNet2DConditionModel":
        fam = sd_family(architecture.get("config") or {})
        if fam:
            return diffusers_to_ldm(architecture["config"]), None, f"LDM names ({fam} layout, mapped from diffusers)"
    if lib == "diffusers":
        layout = layout_for(cls, architecture.get("config") or {})
        if layout is not None:
            name = {"flux": "Flux.1", "sd3": "SD3"}[layout.family]
            return None, layout, f"original {name} names (as ComfyUI's loaders expect them, mapped from diffusers)"
    return None, None, (f"diffusers names kept: {cls} is not an SD1.x/SD2.x/SDXL UNet, Flux.1 or SD3 layout, so "
                        "stock ComfyUI's loaders will not recognise the architecture")


def export_file(src: str, out: str) -> dict:
    """Export a MixQuant file in ComfyUI's native format; returns the summary (layers, bytes, naming)."""
    from . import fileformat

    meta = fileformat.read_header(src)
    tensors = fileformat.read_tensors(src)
    layers = {name: fileformat.build_layer(src, name, e, tensors) for name, e in meta["layers"].items()}
    prefixes = tuple(n + "." for n in layers)
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    rename, layout, naming = naming_for(meta["architecture"])
    exp = export_native(layers, rest, rename, naming, layout)
    size = save_native(exp, out, {"source": os.path.basename(src),
                                  "base_model": meta["base_model"].get("id", "")})
    return {**exp.summary(), "file_bytes": size, "float_layers": exp.float_layers, "requantized": exp.requantized}
