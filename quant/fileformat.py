"""The MixQuant file: one `.safetensors` that alone rebuilds the quantized denoiser, given its architecture.

Header metadata `mixquant` = JSON {format_version, base_model: {fingerprint}, architecture (opaque, from the
adapter that saved it, e.g. a diffusers class + config), layers: {name: {kind, format, shape, geometry, ...}},
extra}. Tensors: per quantized layer `<l>.qweight` (int8 [N,K] or packed uint8), `<l>.weight_scale` (fp16 [N,G]),
`<l>.weight_zero` (uint8 [N,G], asymmetric only), `<l>.bias`, `<l>.input_scale` / `<l>.input_zero` (fp32 [T,S],
static activations); every other tensor of the denoiser under its own name. Never pickle; writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile

import torch
import torch.nn as nn

from ..kernels.packing import join_rows, packed_len
from .errors import MixQuantError
from .formats import LayerFormat
from .layers import QuantConv2d, QuantLayer, QuantLinear

FORMAT_VERSION = 1
META_KEY = "mixquant"


# --- base-model fingerprint ------------------------------------------------------------------------------------------

def fingerprint(model_or_state: nn.Module | dict, probe_len: int = 256) -> dict:
    """Identify an FP denoiser: a hash of its tensor names and shapes plus, per tensor, the mean |value| of an
    evenly strided sample. Values compare with a tolerance, so the same weights loaded in fp32, fp16 or bf16 match."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    probe = []
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(probe_len, flat.numel())).long().clamp_(max=flat.numel() - 1)
            probe.append(float(flat[idx].float().abs().mean()))
    sig = ",".join(f"{v:.2e}" for v in probe)
    return {"structure": h.hexdigest()[:16], "probe": probe,
            "id": hashlib.sha256((h.hexdigest() + sig).encode()).hexdigest()[:16]}


def same_base(a: dict, b: dict, rtol: float = 2e-2) -> bool:
    if a.get("structure") != b.get("structure") or len(a.get("probe", [])) != len(b.get("probe", [])):
        return False
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=1e-6) for x, y in zip(a["probe"], b["probe"]))


# --- save ------------------------------------------------------------------------------------------------------------

def _layer_entry(layer: QuantLayer) -> dict:
    e = {"kind": "linear" if isinstance(layer, QuantLinear) else "conv2d", "format": layer.fmt.to_dict(),
         "in": layer.in_features if isinstance(layer, QuantLinear) else layer.in_channels,
         "out": layer.n, "bias": layer.bias is not None, "a_split": layer.a_split}
    if isinstance(layer, QuantConv2d):
        e.update(kernel_size=list(layer.kernel_size), stride=list(layer.stride), padding=list(layer.padding),
                 dilation=list(layer.dilation))
    return e


def _layer_tensors(name: str, layer: QuantLayer) -> dict:
    out = {}
    if layer.fmt.w_bits < 16:
        blob = layer.weight if layer.packed else layer._pack(layer.weight)
        codes, scale, zero = layer.packed_parts(blob)
        out[f"{name}.qweight"] = codes
        out[f"{name}.weight_scale"] = scale
        if zero is not None:
            out[f"{name}.weight_zero"] = zero
    else:
        out[f"{name}.weight"] = layer.weight
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    if layer.input_scale is not None:
        out[f"{name}.input_scale"] = layer.input_scale
        out[f"{name}.input_zero"] = layer.input_zero
    if layer.bos_out is not None:
        out[f"{name}.bos_in"] = layer.bos_in
        out[f"{name}.bos_out"] = layer.bos_out
    return out


def save_quantized(model: nn.Module, path: str, *, architecture: dict, base_fingerprint: dict,
                   extra: dict | None = None) -> int:
    """Write the quantized denoiser atomically (temp file + rename); returns the file size in bytes."""
    from safetensors.torch import save_file

    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    tensors, layers = {}, {}
    for name, layer in qlayers.items():
        layers[name] = _layer_entry(layer)
        tensors.update(_layer_tensors(name, layer))
    prefixes = tuple(n + "." for n in qlayers)
    for k, v in model.state_dict().items():
        if not k.startswith(prefixes):
            tensors[k] = v
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format_version": FORMAT_VERSION, "base_model": base_fingerprint, "architecture": architecture,
            "layers": layers, "extra": extra or {}}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MixQuantError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".mixquant-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


# --- read and validate ---------------------------------------------------------------------------------------------

def _fail(path: str, what: str) -> MixQuantError:
    return MixQuantError(f"{path}: {what}")


def read_header(path: str) -> dict:
    """The validated `mixquant` metadata of a file (cheap: reads the header only)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise _fail(path, "file not found. Give the path of a .safetensors file written by `mixquant quantize`.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise _fail(path, "this is a pickle / PyTorch zip file, not safetensors. MixQuant never unpickles files "
                          "(they can run code); re-create it with `mixquant quantize`.")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise _fail(path, f"not a readable .safetensors file (truncated or corrupt: {e}). Re-create or "
                          "re-download it.") from None
    if raw is None:
        raise _fail(path, "a safetensors file, but not a MixQuant one (no 'mixquant' metadata). Quantize the model "
                          "with `mixquant quantize` first.")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise _fail(path, "its MixQuant metadata is not valid JSON: the file is corrupt; re-create it.") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"format version {version!r}, but this MixQuant reads version {FORMAT_VERSION}. "
                          "Use the MixQuant version that wrote it, or re-quantize the model.")
    for key in ("base_model", "architecture", "layers"):
        if not isinstance(meta.get(key), dict):
            raise _fail(path, f"metadata lacks '{key}': the file is corrupt; re-create it.")
    return meta


def read_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise _fail(path, f"its tensor data cannot be read (truncated or corrupt: {e}). Re-create it.") from None


def _check(cond: bool, path: str, what: str):
    if not cond:
        raise _fail(path, what + " The file is corrupt or was edited; re-create it with `mixquant quantize`.")


def build_layer(path: str, name: str, e: dict, tensors: dict) -> QuantLayer:
    try:
        fmt = LayerFormat.from_dict(e["format"])
        kind, cin, n, has_bias = e["kind"], int(e["in"]), int(e["out"]), bool(e["bias"])
    except (KeyError, TypeError, ValueError) as err:
        raise _fail(path, f"layer {name}: bad plan entry ({err}). The file is corrupt; re-create it.") from None
    _check(kind in ("linear", "conv2d"), path, f"layer {name}: unknown kind {kind!r}.")
    if kind == "linear":
        layer = QuantLinear(cin, n, has_bias, fmt)
    else:
        layer = QuantConv2d(cin, n, tuple(e["kernel_size"]), tuple(e["stride"]), tuple(e["padding"]),
                            tuple(e["dilation"]), has_bias, fmt)
    k = layer.k

    def get(key, dtype, shape):
        t = tensors.get(f"{name}.{key}")
        _check(t is not None, path, f"tensor {name}.{key} is missing.")
        _check(t.dtype == dtype, path, f"tensor {name}.{key} has dtype {t.dtype}, expected {dtype}.")
        _check(tuple(t.shape) == tuple(shape), path,
               f"tensor {name}.{key} has shape {tuple(t.shape)}, expected {tuple(shape)}.")
        return t

    with torch.no_grad():
        if fmt.w_bits < 16:
            g = layer.groups
            codes = get("qweight", torch.int8 if fmt.w_bits == 8 else torch.uint8, (n, packed_len(k, fmt.w_bits)))
            scale = get("weight_scale", torch.float16, (n, g))
            _check(bool(torch.isfinite(scale).all()) and bool((scale > 0).all()), path,
                   f"tensor {name}.weight_scale has NaN, infinite or non-positive scales.")
            zero = None
            if not fmt.symmetric:
                zero = get("weight_zero", torch.uint8, (n, g))
                _check(int(zero.max()) < 2 ** fmt.w_bits, path, f"tensor {name}.weight_zero is out of range.")
            layer.weight.data = join_rows(codes, scale, zero)
        else:
            shape = (n, cin) if kind == "linear" else (n, cin, *e["kernel_size"])
            w = tensors.get(f"{name}.weight")
            _check(w is not None and tuple(w.shape) == shape and w.is_floating_point(), path,
                   f"tensor {name}.weight is missing or has the wrong shape/dtype.")
            layer.weight.data = w
        if has_bias:
            b = tensors.get(f"{name}.bias")
            _check(b is not None and tuple(b.shape) == (n,) and b.is_floating_point(), path,
                   f"tensor {name}.bias is missing or has the wrong shape/dtype.")
            layer.bias.data = b
        if fmt.a_bits < 16 and fmt.a_mode == "static":
            s, z = tensors.get(f"{name}.input_scale"), tensors.get(f"{name}.input_zero")
            _check(s is not None and z is not None, path, f"layer {name}: activation ranges are missing.")
            _check(s.dim() == 2 and s.shape == z.shape and s.dtype == torch.float32, path,
                   f"layer {name}: activation ranges have the wrong shape/dtype.")
            _check(bool(torch.isfinite(s).all()) and bool((s > 0).all()) and bool(torch.isfinite(z).all()), path,
                   f"tensor {name}.input_scale has NaN, infinite or non-positive values.")
            layer.input_scale, layer.input_zero = s, z
            layer.a_split = e.get("a_split")
        bi, bo = tensors.get(f"{name}.bos_in"), tensors.get(f"{name}.bos_out")
        if bi is not None or bo is not None:
            _check(kind == "linear" and bi is not None and bo is not None and tuple(bi.shape) == (cin,)
                   and tuple(bo.shape) == (n,) and bool(torch.isfinite(bi).all() and torch.isfinite(bo).all()),
                   path, f"layer {name}: BOS tensors are incomplete, misshapen or not finite.")
            layer.bos_in, layer.bos_out = bi.float(), bo.float()
    return layer


def load_quantized(path: str, skeleton: nn.Module, base_fingerprint: dict | None = None) -> nn.Module:
    """Rebuild the quantized denoiser from `path` into `skeleton` (an instance of the saved architecture; its own
    weights are replaced, and it may live on the meta device). With `base_fingerprint`, the file must have been made
    from that FP model. Every check runs before the skeleton is touched."""
    meta = read_header(path)
    if base_fingerprint is not None and not same_base(meta["base_model"], base_fingerprint):
        raise _fail(path, "was made from a different base model than the one given (fingerprints differ). Use "
                          "the model it was quantized from, or re-quantize this model.")
    tensors = read_tensors(path)
    layers = {name: build_layer(path, name, e, tensors) for name, e in meta["layers"].items()}
    modules = dict(skeleton.named_modules())
    for name in layers:
        _check(name in modules, path, f"layer {name} does not exist in this architecture.")
    prefixes = tuple(n + "." for n in layers)
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    expected = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(prefixes)}
    missing = sorted(set(expected) - set(rest))
    unexpected = sorted(set(rest) - set(expected))
    _check(not missing, path, f"{len(missing)} tensors are missing (e.g. {missing[:3]}).")
    _check(not unexpected, path, f"{len(unexpected)} tensors do not belong to this architecture "
                                 f"(e.g. {unexpected[:3]}).")
    for k, v in rest.items():
        _check(tuple(v.shape) == tuple(expected[k].shape), path,
               f"tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}.")
        _check(not v.is_floating_point() or bool(torch.isfinite(v).all()), path, f"tensor {k} holds NaN/inf.")
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        setattr(parent, attr, layer)
    skeleton.load_state_dict(rest, strict=False, assign=True)
    return skeleton
