"""Apply a per-layer plan: swap Linear/Conv2d layers for quantized ones (torchao's `quantize_` shape of API)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import MixQuantError
from .formats import LayerFormat, as_format
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .roles import quantizable


@dataclass
class ActRange:
    """Calibrated activation range of one layer's input: lo/hi [T, S] (T timestep groups; S = 2 with a channel split
    at `split`, Q-Diffusion's shortcut split)."""
    lo: torch.Tensor
    hi: torch.Tensor
    split: int | None = None


@dataclass
class QuantStats:
    """Real storage bytes (tensor storage, not bit counts) of the swapped layers before and after."""
    layers: dict = field(default_factory=dict)  # name -> {"format", "bytes", "bytes_before", "params"}
    bytes_before: int = 0
    bytes_after: int = 0
    model_bytes: int = 0  # the whole returned model


def tensor_bytes(tensors) -> int:
    """Real bytes of the distinct storages behind `tensors` (shared storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.device.type) if st.data_ptr() else id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.state_dict(keep_vars=True).values())


def _get_parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def quantize_model(model: nn.Module, plan: dict, act_ranges: dict | None = None, inplace: bool = False,
                   mode: str = "packed", search: str = "auto", bos: dict | None = None) -> tuple[nn.Module, QuantStats]:
    """Return (quantized model, real bytes). `plan` maps layer name -> LayerFormat (or anything `as_format` reads);
    16/16 entries are left float. `bos` maps Linear layers (to_k/to_v) to the BOS embedding whose output is then
    computed in full precision. The input model is untouched unless `inplace`. Everything is checked before any
    layer is swapped, so an error leaves even an in-place model as it was."""
    bos = bos or {}
    act_ranges = act_ranges or {}
    formats = {name: as_format(f) for name, f in plan.items()}
    modules = dict(model.named_modules())
    problems = []
    for name, fmt in formats.items():
        m = modules.get(name)
        if m is None:
            problems.append(f"{name}: no such layer")
        elif quantizable(m) is None or isinstance(m, QuantLayer):
            problems.append(f"{name}: {type(m).__name__} cannot be quantized")
        elif fmt.a_bits < 16 and fmt.a_mode == "static" and name not in act_ranges:
            problems.append(f"{name}: static {fmt.a_bits}-bit activations need a calibrated range")
    if problems:
        raise MixQuantError("cannot apply the plan: " + "; ".join(problems[:5])
                            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                            + ". Calibrate the model first or fix the plan.")
    target = model if inplace else copy.deepcopy(model)
    tmods = dict(target.named_modules())
    stats = QuantStats()
    new = {}
    for name, fmt in formats.items():
        if fmt.is_float:
            continue
        src = tmods[name]
        cls = QuantLinear if isinstance(src, nn.Linear) else QuantConv2d
        q = cls.from_float(src, fmt, mode=mode, search=search)
        if name in act_ranges and fmt.a_bits < 16 and fmt.a_mode == "static":
            r = act_ranges[name]
            q.set_act_range(r.lo, r.hi, r.split)
        if name in bos and isinstance(q, QuantLinear):
            q.set_bos(bos[name], src.weight.detach())
        new[name] = q
    for name, q in new.items():  # all built: now swap (nothing above touched `target`)
        before = tensor_bytes(tmods[name].state_dict(keep_vars=True).values())
        parent, attr = _get_parent(target, name)
        setattr(parent, attr, q)
        stats.layers[name] = {"format": q.fmt.name, "bytes": q.storage_bytes(), "bytes_before": before,
                              "params": q.n * q.k}
        stats.bytes_before += before
        stats.bytes_after += stats.layers[name]["bytes"]
    stats.model_bytes = model_bytes(target)
    return target, stats


def uniform_plan(layers, fmt, skip_protected: bool = True, kinds=("linear", "conv2d")) -> dict:
    """The same format for every discovered layer (protected ones kept float)."""
    fmt = as_format(fmt)
    return {li.name: (LayerFormat(16, 16) if (li.protected and skip_protected) else fmt)
            for li in layers if li.kind in kinds}
