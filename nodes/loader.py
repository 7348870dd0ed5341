"""Load a MixQuant file in ComfyUI without the full-precision checkpoint (the way ComfyUI-GGUF loads its files).

The file holds the quantized layers plus every other tensor of the diffusion model, so it alone is enough:
1. read and check the header (quant/fileformat: every layer entry against the tensor entries, the digests);
2. rebuild the float state dict's *skeleton*: the file's own non-quantized tensors, and for each quantized layer a
   meta-device placeholder of the float weight's shape (plus its bias). ComfyUI detects the architecture from key
   names and shapes only, so `comfy.sd.load_diffusion_model_state_dict` builds the right BaseModel and ModelPatcher
   from it; the file's `unet_config` must agree with what ComfyUI detects;
3. the network is built with `custom_operations` whose Linear/Conv2d start on the meta device: the float weights of
   the quantized layers are never allocated (a low-VRAM user does not pay for them), the file's float layers get
   the file's tensors (assigned, no copy);
4. the quantized layers are swapped in exactly as MixQuant Load Quantized does (`load_quantized` into a meta
   skeleton, then `patched_clone`: one object patch per layer), so KSampler, LoRA loaders, low-VRAM loading and Save
   Quantized see the same MODEL as after Quantize Model / Load Quantized.
The meta placeholders stay in the base model under the object patches; only the returned clone is exposed.

ComfyUI is imported inside functions only: this module imports without it.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..quant.errors import MixQuantError
from ..quant.fileformat import Layout, load_quantized, read_layout, read_tensors
from ..quant.util import json_safe
from .nodes import FOLDER, QuantizedFileNode, _full_path, _meta_skeleton, patched_clone_checked

_RECREATE = " The file is corrupt or was edited; save it again with MixQuant Save Quantized."


def _bad(path: str, what: str) -> MixQuantError:
    return MixQuantError(f"{os.path.basename(path)}: {what}" + _RECREATE)


def check_architecture(layout: Layout) -> dict:
    """The ComfyUI architecture entry (written by Save Quantized): library, class, base_model, unet_config."""
    arch, path = layout.meta["architecture"], layout.path
    if arch.get("library") != "comfyui":
        raise MixQuantError(
            f"{os.path.basename(path)} was quantized from a {arch.get('library')!r} {arch.get('class')!r} (other "
            "layer names than ComfyUI's). Quantize the model in ComfyUI (Calibrate -> Plan -> Quantize Model -> Save "
            "Quantized), or export it with `mixquant export --to comfyui` and load that with Load Diffusion Model.")
    if not isinstance(arch.get("class"), str) or not arch["class"].isidentifier():
        raise _bad(path, f"its architecture entry names no model class ({arch.get('class')!r}).")
    if not isinstance(arch.get("base_model", ""), str):
        raise _bad(path, "its architecture entry's base_model is not a string.")
    cfg = arch.get("unet_config")
    if cfg is not None and not isinstance(cfg, dict):
        raise _bad(path, "its architecture entry's unet_config is not an object.")
    return arch


def skeleton_state_dict(layout: Layout, tensors: dict) -> dict:
    """The float state dict the file stands for: its own tensors outside the quantized layers, each quantized layer's
    bias, and a meta placeholder (no memory) of each quantized layer's float weight."""
    layers = layout.layers
    sd = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    for name, e in layers.items():
        shape = (e["out"], e["in"]) if e["kind"] == "linear" else (e["out"], e["in"], *e["kernel_size"])
        sd[f"{name}.weight"] = torch.empty(shape, dtype=layout.float_dtype, device="meta")
        if e["bias"]:
            sd[f"{name}.bias"] = tensors[f"{name}.bias"]
    return sd


class _MetaSlot:
    """Mixin for a ComfyUI Linear/Conv2d: parameters start on the meta device (nothing allocated); a real tensor in
    the state dict is assigned (cast to the layer's dtype), a meta placeholder stays meta; moves skip meta
    parameters (ComfyUI moves the base model, whose quantized positions are meta under the object patches)."""

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, device="meta", **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, p in list(self._parameters.items()):
            if p is None:
                continue
            t = state_dict.get(prefix + name)
            if t is None:
                missing_keys.append(prefix + name)
            elif tuple(t.shape) != tuple(p.shape):
                error_msgs.append(f"size mismatch for {prefix + name}: {tuple(t.shape)} vs {tuple(p.shape)}")
            elif not t.is_meta:
                self._parameters[name] = nn.Parameter(t.to(p.dtype), requires_grad=False)

    def _apply(self, fn, recurse=True):
        metas = {k: p for k, p in self._parameters.items() if p is not None and p.is_meta}
        for k in metas:
            self._parameters[k] = None
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters.update(metas)


def meta_operations(base):
    """`base` (the operations ComfyUI would pick) with Linear and Conv2d that start on the meta device."""
    linear = type("Linear", (_MetaSlot, base.Linear), {})
    conv = type("Conv2d", (_MetaSlot, base.Conv2d), {})
    return type("MixQuantMetaOps", (base,), {"Linear": linear, "Conv2d": conv})


def build_patcher(layout: Layout, tensors: dict):
    """The ModelPatcher ComfyUI builds for the file's float skeleton (quantized positions left on meta)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd

    path, arch = layout.path, layout.meta["architecture"]
    sd = skeleton_state_dict(layout, tensors)
    try:
        model_config = comfy.model_detection.model_config_from_unet(dict(sd), "")
    except Exception as e:  # a detector that reads values of a quantized (meta) weight, or a misshapen entry
        raise _bad(path, f"ComfyUI cannot detect the model from its tensors ({type(e).__name__}: {e}).") from None
    if model_config is None:
        raise _bad(path, "ComfyUI does not recognise the model its tensors describe.")
    saved = arch.get("unet_config")
    if saved is not None:
        got, saved = json_safe(model_config.unet_config), json_safe(saved)
        keys = (set(saved) | set(got)) - {"dtype"}
        diff = sorted(k for k in keys if saved.get(k) != got.get(k))
        if diff:
            k = diff[0]
            raise _bad(path, f"its unet_config does not match its tensors ({len(diff)} values differ, e.g. {k}: "
                             f"{saved.get(k)!r} in the file, {got.get(k)!r} from the tensors).")
    dtype = layout.float_dtype
    load_device = mm.get_torch_device()
    manual = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    try:
        base = comfy.ops.pick_operations(dtype, manual, load_device=load_device)
    except TypeError:  # older ComfyUI
        base = comfy.ops.pick_operations(dtype, manual)
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(
            dict(sd), model_options={"custom_operations": meta_operations(base), "dtype": dtype})
    except MixQuantError:
        raise
    except Exception as e:
        raise _bad(path, f"ComfyUI cannot build the model ({type(e).__name__}: {e}).") from None
    if patcher is None:
        raise _bad(path, "ComfyUI does not recognise the model its tensors describe.")
    dm = patcher.model.diffusion_model
    if type(dm).__name__ != arch["class"]:
        raise _bad(path, f"its architecture entry says {arch['class']}, but its tensors make a {type(dm).__name__}.")
    return patcher


def load_file_only(path: str):
    """A quantized MODEL from a MixQuant file alone (no checkpoint): see the module docstring."""
    from . import patching

    layout = read_layout(path)
    check_architecture(layout)
    tensors = read_tensors(path, layout)
    patcher = build_patcher(layout, tensors)
    view = patching.diffusion_model(patcher)
    skeleton = load_quantized(path, _meta_skeleton(view), None, layout=layout, tensors=tensors)
    layers = {n: skeleton.get_submodule(n) for n in layout.layers}
    dev = getattr(patcher, "offload_device", None)
    if dev is not None:
        for q in layers.values():
            q.to(dev)
    meta = layout.meta
    extra = meta.get("extra", {})
    info = {"base_fingerprint": meta["base_model"], "group_bounds": extra.get("act_group_bounds") or [],
            "report": extra.get("summary", {}) if isinstance(extra.get("summary", {}), dict) else {},
            "source": os.path.basename(path), "file_only": True}
    return patched_clone_checked(patcher, layers, info, info["group_bounds"])


class MixQuantLoadQuantizedFileOnly(QuantizedFileNode):
    DESCRIPTION = ("Loads a MixQuant file as a MODEL on its own: no checkpoint loader needed, and the full-precision "
                   "weights of the quantized layers are never loaded. The file is checked first (structure and "
                   "digests): a wrong or damaged file gives one message saying what to do. Works with the stock "
                   "KSampler and LoRA loaders like Load Quantized.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"quantized_file": cls.file_input()}}

    @staticmethod
    def check(path: str) -> None:
        check_architecture(read_layout(path))

    def load(self, quantized_file):
        return self.output(load_file_only(_full_path(FOLDER, quantized_file)))
