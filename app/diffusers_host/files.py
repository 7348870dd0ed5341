"""diffusers side of the MixQuant file: describe a denoiser's architecture, rebuild an empty one from that
description, load/save quantized denoisers of diffusers pipelines, and write a quantize run's outputs (the file and
its report JSON)."""
from __future__ import annotations

import contextlib
import json
import math
import warnings

import torch
import torch.nn as nn

from ...quant.errors import MixQuantError
from ...quant.fileformat import build_guard, fingerprint, load_quantized, read_layout, save_quantized
from ...quant.layers import QuantLayer, attach_act_group_switch
from ...quant.sizes import RANGE_BUFFERS
from ...quant.util import json_safe, write_atomic

_CLASSES = ("UNet2DConditionModel", "Transformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
            "FluxTransformer2DModel")


def architecture_of(denoiser: nn.Module) -> dict:
    cfg = getattr(denoiser, "config", None)
    if cfg is None:
        raise MixQuantError(f"{type(denoiser).__name__} has no diffusers config: cannot describe its architecture")
    config = json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, default=list))
    return {"library": "diffusers", "class": type(denoiser).__name__, "config": config}


def _ints(v) -> list:
    return v if isinstance(v, list) else [v]


def _bad(path: str, what: str) -> MixQuantError:
    return MixQuantError(f"{path}: its architecture entry {what}. The file is corrupt or was edited; re-create it "
                         "with `mixquant quantize`.")


def _check_values(path: str, v, bound: int, where: str = "config", depth: int = 0) -> None:
    """JSON values only, numbers finite and no larger than the file's own tensors could need, lists no longer than
    its tensor list."""
    if depth > 8:
        raise _bad(path, f"nests too deeply at {where}")
    if isinstance(v, dict):
        for k, x in v.items():
            _check_values(path, x, bound, f"{where}.{k}", depth + 1)
    elif isinstance(v, list):
        if len(v) > bound:
            raise _bad(path, f"has a list of {len(v)} items at {where}")
        for i, x in enumerate(v):
            _check_values(path, x, bound, f"{where}[{i}]", depth + 1)
    elif isinstance(v, bool) or v is None:
        pass
    elif isinstance(v, int):
        if abs(v) > bound:
            raise _bad(path, f"gives {where} = {v}, more than any tensor of the file holds")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise _bad(path, f"gives {where} = {v}")
    elif isinstance(v, str):
        if len(v) > 256:
            raise _bad(path, f"has a {len(v)}-character string at {where}")
    else:
        raise _bad(path, f"has a {type(v).__name__} at {where}")


def _kind_ok(v, default) -> bool:
    """Does a config value have the kind of its parameter's default (numbers stay numbers and keep their sign,
    strings strings, flags flags; an int parameter may also take a per-block list, a tuple parameter one value)?"""
    if default is None or v is None and not isinstance(default, bool):
        return True
    if isinstance(default, bool):
        return isinstance(v, bool)
    if isinstance(default, (int, float)):
        if isinstance(v, list):
            return all(_kind_ok(x, default) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 or default < 0)
    if isinstance(default, str):
        return isinstance(v, str)
    if isinstance(default, (tuple, list)):
        items = v if isinstance(v, list) else [v]
        return not default or all(_kind_ok(x, default[0]) or isinstance(x, list) and _kind_ok(x, list(default))
                                  for x in items)
    return True


def _check_kinds(path: str, cls, cfg: dict) -> None:
    import inspect

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    for k, v in cfg.items():
        p = params.get(k)
        if p is not None and p.default is not inspect.Parameter.empty and not _kind_ok(v, p.default):
            raise _bad(path, f"gives {k} = {v!r}, not a value of the kind {cls.__name__} takes there "
                             f"(default {p.default!r})")


def _count(shapes: dict, prefix: str) -> int:
    """How many numbered children `prefix.N.` the file's tensors show."""
    idx = {k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return len([i for i in idx if i.isdigit()])


def _check_unet(path: str, cfg: dict, shapes: dict) -> None:
    """UNet2DConditionModel: block counts, layers per block and channel counts against the tensor shapes, before
    anything is built."""

    def shape(key):
        if key not in shapes:
            raise _bad(path, f"describes a UNet with a tensor {key}, which is missing from the file")
        return shapes[key][1]

    def same(what, got, want):
        if got != want:
            raise _bad(path, f"gives {what} = {got!r}, but the tensors say {want!r}")

    n_down, n_up = _count(shapes, "down_blocks."), _count(shapes, "up_blocks.")
    for key, n in (("down_block_types", n_down), ("up_block_types", n_up), ("block_out_channels", n_down)):
        v = cfg.get(key)
        if not isinstance(v, list) or len(v) != n:
            raise _bad(path, f"gives {key} = {v!r}, but the tensors show {n} blocks")
    for i, c in enumerate(cfg["block_out_channels"]):
        same(f"block_out_channels[{i}]", c, shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0])
    lpb = _ints(cfg.get("layers_per_block"))
    if len(lpb) not in (1, n_down):
        raise _bad(path, f"gives layers_per_block = {cfg.get('layers_per_block')!r} for {n_down} blocks")
    for i in range(n_down):
        same(f"layers_per_block (block {i})", lpb[min(i, len(lpb) - 1)], _count(shapes, f"down_blocks.{i}.resnets."))
    same("in_channels", cfg.get("in_channels"), shape("conv_in.weight")[1])
    same("out_channels", cfg.get("out_channels"), shape("conv_out.weight")[0])
    to_k = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    cad = _ints(cfg.get("cross_attention_dim"))
    if to_k and not all(shape(k)[1] in cad for k in to_k):
        raise _bad(path, f"gives cross_attention_dim = {cfg.get('cross_attention_dim')!r}, but the tensors say "
                         f"{shape(to_k[0])[1]}")


def check_architecture(layout) -> dict:
    """The diffusers architecture entry, validated against the file's tensors: the class, JSON-only config values
    bounded by the tensors present, and (UNet2DConditionModel) block, layer and channel counts."""
    path, arch = layout.path, layout.meta["architecture"]
    cls_name = arch.get("class")
    if arch.get("library") != "diffusers" or not isinstance(cls_name, str) or cls_name not in _CLASSES:
        raise MixQuantError(f"{path}: the file's architecture {arch.get('library')!r} {cls_name!r} is not one "
                            f"this MixQuant can rebuild here (supported: diffusers {', '.join(_CLASSES)}).")
    cfg = arch.get("config")
    if not isinstance(cfg, dict):
        raise _bad(path, "has no config object")
    shapes = layout.shapes
    bound = max([len(shapes), 4096] + [max(s, default=0) for _, s in shapes.values()])
    _check_values(path, cfg, bound)
    import diffusers

    if hasattr(diffusers, cls_name):
        _check_kinds(path, getattr(diffusers, cls_name), cfg)
    if cls_name == "UNet2DConditionModel":
        _check_unet(path, cfg, shapes)
    return arch


def build_skeleton(architecture: dict, device="meta", layout=None) -> nn.Module:
    """An uninitialised denoiser of the described architecture (on the meta device by default: no memory). With
    `layout` (fileformat.read_layout of the file) the entry is checked against the file's tensors first and the
    build is stopped as soon as it goes past what those tensors imply."""
    import diffusers

    if layout is not None:
        architecture = check_architecture(layout)
    cls_name = architecture.get("class")
    if architecture.get("library") != "diffusers" or cls_name not in _CLASSES or not hasattr(diffusers, cls_name):
        raise MixQuantError(f"the file's architecture {cls_name!r} is not one this MixQuant can rebuild "
                            f"(supported: {', '.join(_CLASSES)}).")
    cls = getattr(diffusers, cls_name)
    where = f"{layout.path}: " if layout is not None else ""
    guard = build_guard(layout) if layout is not None else contextlib.nullcontext()
    try:
        with guard, torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_config(architecture["config"]).eval()
    except MixQuantError:
        raise
    except Exception as e:
        raise MixQuantError(f"{where}cannot build {cls_name} from the file's config ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file is corrupt or was edited. "
                            "Re-create it with `mixquant quantize`.") from None


def save_denoiser(q_denoiser: nn.Module, path: str, base_fingerprint: dict, extra: dict | None = None) -> int:
    return save_quantized(q_denoiser, path, architecture=architecture_of(q_denoiser),
                          base_fingerprint=base_fingerprint, extra=extra)


def load_denoiser(path: str, base: nn.Module | None = None, dtype=None) -> nn.Module:
    """Rebuild the quantized denoiser from the file alone; with `base` (the FP denoiser it should belong to) the
    fingerprint must match."""
    layout = read_layout(path)
    meta = layout.meta
    fp = fingerprint(base) if base is not None else None
    skeleton = build_skeleton(meta["architecture"], layout=layout)
    q = load_quantized(path, skeleton, fp, layout=layout)
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in q.state_dict().values()):
        q.to(dtype)
        for m in q.modules():  # activation ranges and BOS vectors stay fp32 whatever the compute dtype
            if isinstance(m, QuantLayer):
                for name in RANGE_BUFFERS:
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


def write_json_atomic(obj, path: str):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=1)

    write_atomic(path, write)


def save_outputs(fp_unet, qunet, report: dict, out: str, report_path: str | None, model: str) -> int:
    """Write the quantized file (atomically, with what it was made from) and the report JSON; returns the file
    size. Shared by the CLI and the Gradio app."""
    extra = {"model": model, "target": report.get("target", "mixquant"), "sampler": report.get("sampler"),
             "act_group_bounds": getattr(qunet, "_mixquant_act_groups", None),
             "summary": {k: report[k] for k in ("avg_w_bits", "avg_a_bits", "bytes_fp16", "bytes_quantized")}}
    if report.get("speed"):  # the speed it was planned for, and each quantized layer's measured time (inspect shows)
        extra["speed"] = report["speed"]
        extra["layer_times_ms"] = {li["name"]: [li["time_ms"], li["fp_time_ms"]] for li in report["layers"]
                                   if "time_ms" in li and li["format"] != "W16A16"}
    size = save_denoiser(qunet, out, fingerprint(fp_unet), extra=json_safe(extra))
    report["file"] = {"path": out, "bytes_on_disk": size}
    if report_path:
        write_json_atomic(json_safe(report), report_path)
    return size
