"""diffusers side of the MixQuant file: describe a denoiser's architecture, rebuild an empty one from that
description, and load/save quantized denoisers of diffusers pipelines."""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from ..quant.errors import MixQuantError
from ..quant.fileformat import fingerprint, load_quantized, read_header, save_quantized
from ..quant.layers import QuantLayer, attach_act_group_switch

_CLASSES = ("UNet2DConditionModel", "Transformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
            "FluxTransformer2DModel")


def architecture_of(denoiser: nn.Module) -> dict:
    cfg = getattr(denoiser, "config", None)
    if cfg is None:
        raise MixQuantError(f"{type(denoiser).__name__} has no diffusers config: cannot describe its architecture")
    config = json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, default=list))
    return {"library": "diffusers", "class": type(denoiser).__name__, "config": config}


def build_skeleton(architecture: dict, device="meta") -> nn.Module:
    """An uninitialised denoiser of the described architecture (on the meta device by default: no memory)."""
    import diffusers

    cls_name = architecture.get("class")
    if architecture.get("library") != "diffusers" or cls_name not in _CLASSES or not hasattr(diffusers, cls_name):
        raise MixQuantError(f"the file's architecture {cls_name!r} is not one this MixQuant can rebuild "
                            f"(supported: {', '.join(_CLASSES)}).")
    cls = getattr(diffusers, cls_name)
    try:
        with torch.device(device):
            return cls.from_config(architecture["config"]).eval()
    except Exception as e:
        raise MixQuantError(f"cannot build {cls_name} from the file's config ({e}); the file is corrupt.") from None


def save_denoiser(q_denoiser: nn.Module, path: str, base_fingerprint: dict, extra: dict | None = None) -> int:
    return save_quantized(q_denoiser, path, architecture=architecture_of(q_denoiser),
                          base_fingerprint=base_fingerprint, extra=extra)


def load_denoiser(path: str, base: nn.Module | None = None, dtype=None) -> nn.Module:
    """Rebuild the quantized denoiser from the file alone; with `base` (the FP denoiser it should belong to) the
    fingerprint must match."""
    meta = read_header(path)
    skeleton = build_skeleton(meta["architecture"])
    q = load_quantized(path, skeleton, fingerprint(base) if base is not None else None)
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in q.state_dict().values()):
        q.to(dtype)
        for m in q.modules():  # activation ranges and BOS vectors stay fp32 whatever the compute dtype
            if isinstance(m, QuantLayer):
                for name in ("input_scale", "input_zero", "bos_in", "bos_out"):
                    t = getattr(m, name)
                    if t is not None:
                        setattr(m, name, t.float())
    bounds = meta.get("extra", {}).get("act_group_bounds")
    if bounds and len(bounds) > 1:
        attach_act_group_switch(q, bounds, diffusers_timestep)
    return q.eval()


def diffusers_timestep(args, kwargs) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return float(torch.as_tensor(t).reshape(-1)[0])
