"""Quantized layers into a ComfyUI MODEL (a ModelPatcher) the way GGUF does it: swap layers, never the model.

- The FP MODEL is never mutated: the result is `model.clone()` with one `add_object_patch("diffusion_model.<name>",
  quantized_layer)` per quantized layer. Every other node keeps working on it (LoRA loaders, model patches, other
  packs), ComfyUI loads/offloads it as usual, and its reported size is the quantized size.
- Reading the FP weights: the diffusion model is shared by every clone of a checkpoint, and while another clone is
  loaded it may hold that clone's object patches (e.g. our own quantized layers) or LoRA-patched weights. `fp_view`
  resolves the tree as *this* MODEL defines it (its own object patches, the originals behind other clones' patches,
  the unpatched weights from the patcher's backup) without copying any tensor.
- Timestep-aware activation ranges: a `model_function_wrapper` (chained with one already set) picks each call's
  group from its sigma before the denoiser runs.
Only duck-typed ModelPatcher attributes are used here; nothing imports ComfyUI, so the tests run with a stand-in.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..quant.apply import quantize_model
from ..quant.errors import MixQuantError
from ..quant.layers import QuantLayer, act_group_at, set_act_group
from ..quant.sizes import model_bytes

PREFIX = "diffusion_model."
OPTIONS_KEY = "mixquant"  # model_options entry: JSON-safe facts about the quantized MODEL (deep-copied by clone)


def diffusion_model(model) -> nn.Module:
    return model.model.diffusion_model


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter/buffer/child of `module`, with its own child/param dicts."""
    new = copy.copy(module)
    new._modules = type(module._modules)(module._modules)
    new._parameters = type(module._parameters)(module._parameters)
    return new


def resolve(model, name: str) -> nn.Module:
    """The module at `name` (inside the diffusion model) as this MODEL defines it."""
    return model.get_model_object(PREFIX + name)


def fp_view(model, copy_paths=()) -> nn.Module:
    """The diffusion model as the FP `model` defines it, sharing all tensors. Modules along `copy_paths` (and along
    every resolved path) are shallow copies, so swapping layers there never touches the shared model."""
    root = diffusion_model(model)
    names = set(copy_paths)
    for key in list(getattr(model, "object_patches", {})) + list(getattr(model, "object_patches_backup", {})):
        if key.startswith(PREFIX):
            names.add(key[len(PREFIX):])
    backup = getattr(model, "backup", {}) or {}
    for key in backup:
        if key.startswith(PREFIX):
            names.add(key[len(PREFIX):].rpartition(".")[0])
    view = _shallow(root)
    for name in sorted(names, key=lambda n: n.count(".")):
        parts = name.split(".")
        parent = view
        path = ""
        for p in parts[:-1]:  # copy each parent on the way once
            path = f"{path}.{p}" if path else p
            child = parent._modules.get(p)
            if child is None:
                break
            if not getattr(child, "_mixquant_view", False):
                child = _shallow(child)
                child._mixquant_view = True
                parent._modules[p] = child
            parent = child
        else:
            try:
                mod = resolve(model, name)
            except AttributeError:
                continue
            if not isinstance(mod, nn.Module):
                continue
            mod = _shallow(mod)
            mod._mixquant_view = True
            for pname in list(mod._parameters):
                bk = backup.get(f"{PREFIX}{name}.{pname}")
                if bk is not None:  # weights currently LoRA-patched in place: the original is in the backup
                    mod._parameters[pname] = nn.Parameter(bk.weight, requires_grad=False)
            parent._modules[parts[-1]] = mod
    return view


def check_fp(view: nn.Module):
    q = [n for n, m in view.named_modules() if isinstance(m, QuantLayer)]
    if q:
        raise MixQuantError(f"this MODEL is already quantized ({len(q)} MixQuant layers, e.g. {q[0]}): connect the "
                            "full-precision MODEL from the checkpoint loader instead.")


def quantized_layers(model) -> dict[str, QuantLayer]:
    """name -> QuantLayer for a MODEL made by Quantize / Load Quantized (survives clones: object patches do)."""
    return {k[len(PREFIX):]: v for k, v in getattr(model, "object_patches", {}).items()
            if k.startswith(PREFIX) and isinstance(v, QuantLayer)}


def quantize_layers(model, plan: dict, ranges: dict, bos: dict, search: str = "auto"):
    """Build the quantized layers of `plan` from this MODEL's FP weights (nothing shared is modified). Returns
    (view with the layers in place, {name: QuantLayer}, QuantStats)."""
    names = [n for n, f in plan.items() if not f.is_float]
    view = fp_view(model, names)
    check_fp(view)
    missing = [n for n in names if n not in dict(view.named_modules())]
    if missing:
        raise MixQuantError(f"the plan names layers this MODEL does not have (e.g. {missing[0]}): it was made for "
                            "another model. Plan on this model's calibration.")
    qview, stats = quantize_model(view, {n: plan[n] for n in names}, ranges, inplace=True, bos=bos, search=search)
    return qview, {n: qview.get_submodule(n) for n in names}, stats


def act_group_wrapper(layers: list, bounds: list[float], model_sampling, previous=None):
    """A model_function_wrapper that selects the activation-range group from each call's timestep. `bounds[g]` is
    the lowest timestep of group g (noisiest first), on the scale the diffusion model sees (model_sampling.timestep
    of the sigma). Chains to a wrapper that was already set."""
    layers = [m for m in layers if m.input_scale is not None and m.input_scale.shape[0] > 1]

    def wrapper(apply_model, args):
        sigma = args["timestep"]
        t = float(torch.as_tensor(model_sampling.timestep(sigma)).reshape(-1)[0]) if model_sampling is not None \
            else float(torch.as_tensor(sigma).reshape(-1)[0])
        g = act_group_at(bounds, t)
        for m in layers:
            m.act_group = g
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapper._mixquant = True
    return wrapper


def patched_clone(model, layers: dict, info: dict, group_bounds=None, model_sampling=None):
    """model.clone() with the quantized layers swapped in (object patches), its size set to the quantized size,
    facts for the other nodes under model_options['mixquant'], and the timestep-group switch when there are
    several groups. `model_sampling`: what maps the wrapper's sigma to the diffusion model's timestep (default:
    ComfyUI's `model.model.model_sampling`; WebUI Forge's is its KModel's `predictor`)."""
    out = model.clone()
    dm = diffusion_model(model)
    before = after = 0
    for name, q in layers.items():
        out.add_object_patch(PREFIX + name, q)
        try:
            src = resolve(model, name)
            before += model_bytes(src)
        except AttributeError:
            pass
        after += q.storage_bytes()
    fp_size = model.model_size() if hasattr(model, "model_size") else model_bytes(dm)
    if hasattr(out, "size"):
        out.size = max(1, int(fp_size - before + after))  # what ComfyUI's memory estimates use
    opts = getattr(out, "model_options", None)
    if opts is not None:
        opts[OPTIONS_KEY] = {**info, "fp_bytes": int(fp_size), "quantized_bytes": int(fp_size - before + after),
                             "layers": len(layers)}
        if group_bounds and len(group_bounds) > 1:
            ms = model_sampling if model_sampling is not None else getattr(model.model, "model_sampling", None)
            opts["model_function_wrapper"] = act_group_wrapper(list(layers.values()), list(group_bounds), ms,
                                                               opts.get("model_function_wrapper"))
        elif group_bounds:
            for q in layers.values():
                set_act_group(q, 0)
    return out

