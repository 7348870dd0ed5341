"""Apply a per-layer plan: swap Linear/Conv2d layers for quantized ones (torchao's `quantize_` shape of API)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import fusion
from .errors import MixQuantError
from .formats import LayerFormat, as_format
from .layers import QuantConv2d, QuantLayer, QuantLinear, attach_act_group_switch
from .offload import with_params_on
from .roles import quantizable
from .sizes import model_bytes, tensor_bytes  # noqa: F401  (tensor_bytes: the counters' public face here too)


@dataclass
class ActRange:
    """Calibrated activation range of one layer's input: lo/hi [T, S] (T timestep groups; S = 2 with a channel split
    at `split`, Q-Diffusion's shortcut split)."""
    lo: torch.Tensor
    hi: torch.Tensor
    split: int | None = None
    smooth: torch.Tensor | None = None  # channel balancing: lo/hi are the range of x / smooth (layers.py)


@dataclass
class QuantStats:
    """Real storage bytes (tensor storage, not bit counts) of the swapped layers before and after."""
    layers: dict = field(default_factory=dict)  # name -> {"format", "bytes", "bytes_before", "params"}
    bytes_before: int = 0
    bytes_after: int = 0
    model_bytes: int = 0  # the whole returned model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` inside `model` (the one place a layer is swapped)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def quantized_layer(src: nn.Module, fmt: LayerFormat, *, mode: str = "packed", search: str = "auto",
                    act_range: ActRange | None = None, bos: torch.Tensor | None = None) -> QuantLayer:
    """The quantized version of one Linear/Conv2d (the one place a quantized layer is built from a float one): its
    static activation range when the format has one, its channel balancing when the range carries one (every
    format of a balanced layer computes with W s and x / s, so that what the sensitivity measured per part is what
    the joint format runs), and for a Linear the BOS embedding whose output is then computed in full precision."""
    smooth = act_range.smooth if act_range is not None else None
    q = (QuantLinear if isinstance(src, nn.Linear) else QuantConv2d).from_float(src, fmt, mode=mode, search=search,
                                                                                smooth=smooth)
    if act_range is not None and fmt.a_bits < 16 and fmt.a_mode == "static":
        q.set_act_range(act_range.lo, act_range.hi, act_range.split)
    if bos is not None and isinstance(q, QuantLinear):
        q.set_bos(bos, src.weight.detach())
    return q


def quantize_model(model: nn.Module, plan: dict, act_ranges: dict | None = None, inplace: bool = False,
                   mode: str = "packed", search: str = "auto", bos: dict | None = None,
                   device=None) -> tuple[nn.Module, QuantStats]:
    """Return (quantized model, real bytes). `plan` maps layer name -> LayerFormat (or anything `as_format` reads);
    16/16 entries are left float. `bos` maps Linear layers (to_k/to_v) to the BOS embedding whose output is then
    computed in full precision. The input model is untouched unless `inplace`. Everything is checked before any
    layer is swapped, so an error leaves even an in-place model as it was.
    `device`: build the quantized model there, layer by layer: each float layer goes to the device alone, is
    quantized there and dropped, so the device holds the quantized layers and one float layer at a time, never the
    float model and its quantized copy together (a model larger than the device's memory, kept on the CPU, is
    quantized into it); the rest of the model follows at the end."""
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
    stats = QuantStats()
    new = {}
    device = None if device is None else torch.device(device)
    for name, fmt in formats.items():  # built from the source layers (which are only read)
        if not fmt.is_float:
            src = modules[name] if device is None else with_params_on(modules[name], device)
            new[name] = quantized_layer(src, fmt, mode=mode, search=search,
                                        act_range=act_ranges.get(name), bos=bos.get(name))
    # a copy takes the quantized layers in place of the float ones as it is made (deepcopy's memo), so the float
    # weights of the swapped layers are never copied: the copy costs the model's unquantized part only
    target = model if inplace else copy.deepcopy(model, {id(modules[n]): q for n, q in new.items()})
    for name, q in new.items():  # all built: now swap (nothing above touched `model`)
        before = model_bytes(modules[name])
        if inplace:
            set_submodule(target, name, q)
        stats.layers[name] = {"format": q.fmt.name, "bytes": q.storage_bytes(), "bytes_before": before,
                              "params": q.n * q.k}
        stats.bytes_before += before
        stats.bytes_after += stats.layers[name]["bytes"]
    if device is not None:
        target.to(device)  # the float rest (embedders, norms, protected layers); the quantized layers are there
    fusion.enable(target)
    stats.model_bytes = model_bytes(target)
    return target, stats


def uniform_plan(layers, fmt, skip_protected: bool = True, kinds=("linear", "conv2d")) -> dict:
    """The same format for every discovered layer (protected ones kept float)."""
    fmt = as_format(fmt)
    return {li.name: (LayerFormat(16, 16) if (li.protected and skip_protected) else fmt)
            for li in layers if li.kind in kinds}


def quantize_(model: nn.Module, plan: dict, calibration=None, *, bos: bool = True, search: str = "auto",
              inplace: bool = True, device=None) -> QuantStats | tuple[nn.Module, QuantStats]:
    """torchao-style, in place: swap `model`'s layers for the quantized ones of `plan` (layer name -> format) with
    the static activation ranges and BOS embeddings `calibration` (a quant.calibration.Calibration) observed, and
    the per-timestep switch of activation ranges when it has several timestep groups. Everything is checked before
    any layer is swapped. inplace=False leaves `model` as it is and returns (quantized copy, stats); the copy never
    holds a second float copy of a quantized layer. `device`: quantize into that device layer by layer
    (quantize_model)."""
    ranges = calibration.ranges() if calibration is not None else {}
    bos_map = calibration.bos() if calibration is not None and bos else {}
    target, stats = quantize_model(model, plan, ranges, inplace=inplace, search=search, bos=bos_map, device=device)
    if calibration is not None and calibration.n_groups > 1:
        attach_act_group_switch(target, calibration.group_bounds(), calibration.timestep_fn)
    return stats if inplace else (target, stats)
