"""The MixQuant file: one `.safetensors` that alone rebuilds the quantized denoiser, given its architecture.

Header metadata `mixquant` = JSON {format_version, base_model: {fingerprint}, architecture (from the adapter that
saved it, e.g. a diffusers class + config; the adapter validates it), layers: {name: {kind, format, in, out, bias,
a_split, geometry}}, extra, digest}. Tensors: per quantized layer `<l>.qweight` (int8 [N,K], float8_e4m3fn [N,K] for
fp8 formats, or packed uint8), `<l>.weight_scale` (fp16 [N,G]),
`<l>.weight_zero` (uint8 [N,G], asymmetric only), `<l>.bias`, `<l>.input_scale` / `<l>.input_zero` (fp32 [T,S],
static activations), `<l>.smooth` (fp32 [C_in], balanced input channels: the stored weight is W s); every other
tensor of the denoiser under its own name. Never pickle; writes are atomic.

Nothing in a file is trusted. Version 2 adds `digest`: a SHA-256 (first 128 bits) per tensor over its name, dtype,
shape and bytes, and one over the rest of the metadata, so damaged data or a changed value is caught at load
instead of running silently. Version 1 files (no digest) are still read, with every structural check but without
that one. Before any tensor is read, every layer entry is checked for types and ranges and against the tensor
entries actually present (so no size in the metadata can make a loader allocate more than the file's own tensors
imply); the tensors' digests are checked when they are read; the skeleton must agree with the layer entries
(names, in/out, geometry) and with every other tensor (names, shapes, dtypes). Any failure is one MixQuantError.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from ..kernels.packing import join_rows, packed_len
from .apply import set_submodule
from . import fusion
from .errors import MixQuantError
from .formats import A_BITS, A_MODES, W_BITS, LayerFormat
from .layers import QuantConv2d, QuantLayer, QuantLinear
from .sizes import RANGE_BUFFERS
from .util import write_atomic

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no digest (files written before it existed)
DIGEST = "sha256-128"
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


# --- digests -------------------------------------------------------------------------------------------------------

def _tensor_digest(item) -> str:
    name, t = item
    h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def tensor_digests(tensors: dict) -> dict:
    """name -> digest of each CPU tensor (name, dtype, shape and bytes). hashlib releases the GIL: threads hash
    tensors in parallel (~1.7 GB/s per core with SHA extensions)."""
    items = sorted(tensors.items())
    workers = max(1, min(8, os.cpu_count() or 1))
    if workers == 1 or len(items) < 2:
        return {n: _tensor_digest((n, t)) for n, t in items}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((n for n, _ in items), pool.map(_tensor_digest, items)))


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    body["digest"] = {k: v for k, v in meta.get("digest", {}).items() if k != "meta"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def sign(meta: dict, digests: dict) -> dict:
    """`meta` with its digest entry (tensor digests + one over everything else in the metadata)."""
    meta = json.loads(json.dumps(meta))  # what a reader will see (tuples -> lists, keys -> str)
    meta["digest"] = {"algorithm": DIGEST, "tensors": digests}
    meta["digest"]["meta"] = _meta_digest(meta)
    return meta


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
    if layer.smooth is not None:
        out[f"{name}.smooth"] = layer.smooth.float()
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
    meta = sign({"format_version": FORMAT_VERSION, "base_model": base_fingerprint, "architecture": architecture,
                 "layers": layers, "extra": extra or {}}, tensor_digests(tensors))
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


# --- read and validate ---------------------------------------------------------------------------------------------

_RECREATE = " The file is corrupt or was edited; re-create it with `mixquant quantize` (or Save Quantized)."
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
MAX_TIME_GROUPS = 64  # rows of static activation ranges (timestep groups) a layer may hold
MAX_STRIDE = 64  # conv stride / dilation (real denoisers use 1 or 2)


def _fail(path: str, what: str) -> MixQuantError:
    return MixQuantError(f"{path}: {what}")


def _check(cond: bool, path: str, what: str):
    if not cond:
        raise _fail(path, what + _RECREATE)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class Layout:
    """What a file's header says, checked: the metadata, the tensor entries {name: (dtype, shape)} and the float
    state dict the layers stand for {key: (dtype, shape)} (quantized layers' weights in their float shape)."""

    def __init__(self, path: str, meta: dict, table: dict):
        self.path, self.meta, self.table = path, meta, table
        self.layers = meta["layers"]
        self.float_dtype = _float_dtype(path, meta, table)
        shapes = {}
        for k, (dt, shape) in table.items():
            owner, _, suffix = k.rpartition(".")
            if owner not in self.layers:
                shapes[k] = (dt, shape)
        for name, e in self.layers.items():
            shapes[f"{name}.weight"] = (self.float_dtype, float_weight_shape(e))
            if e["bias"]:
                shapes[f"{name}.bias"] = table[f"{name}.bias"]
        self.shapes = shapes

    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes.values())


def float_weight_shape(e: dict) -> tuple:
    return (e["out"], e["in"]) if e["kind"] == "linear" else (e["out"], e["in"], *e["kernel_size"])


def _float_dtype(path: str, meta: dict, table: dict):
    """The one float dtype of the denoiser's own tensors (activation ranges and BOS vectors are fp32 by design; fp8
    codes and fp16 weight scales are a quantized layer's)."""
    own = {dt for k, (dt, _) in table.items() if dt.is_floating_point
           and not (k.rpartition(".")[0] in meta["layers"] and k.rpartition(".")[2] in _FP32_SUFFIXES)
           and not (k.rpartition(".")[0] in meta["layers"] and k.rpartition(".")[2] in ("weight_scale", "qweight"))}
    _check(len(own) <= 1, path, f"its float tensors mix dtypes ({', '.join(sorted(map(str, own)))}).")
    return next(iter(own), torch.float32)


_FP32_SUFFIXES = RANGE_BUFFERS
_LAYER_SUFFIXES = ("qweight", "weight_scale", "weight_zero", "weight", "bias") + _FP32_SUFFIXES


def _check_fingerprint(path: str, fp) -> None:
    _check(isinstance(fp, dict), path, "metadata lacks 'base_model'.")
    for key in ("structure", "id"):
        _check(isinstance(fp.get(key, ""), str) and len(fp.get(key, "")) <= 128, path, f"base_model.{key} is not "
               "a short string.")
    probe = fp.get("probe", [])
    _check(isinstance(probe, list) and all(_is_num(v) for v in probe), path,
           "base_model.probe is not a list of finite numbers.")


def _check_extra(path: str, extra, layers: dict) -> None:
    _check(isinstance(extra, dict), path, "metadata 'extra' is not an object.")
    b = extra.get("act_group_bounds")
    if b is not None:
        _check(isinstance(b, list) and 1 <= len(b) <= MAX_TIME_GROUPS and all(_is_num(v) for v in b)
               and all(x >= y for x, y in zip(b, b[1:])), path,
               f"extra.act_group_bounds must be 1..{MAX_TIME_GROUPS} finite numbers, highest first.")


def _pair(path, name, e, key, lo, hi):
    v = e.get(key)
    _check(isinstance(v, list) and len(v) == 2 and all(_is_int(x) and lo <= x <= hi for x in v), path,
           f"layer {name}: {key} must be two integers in [{lo}, {hi}], not {v!r}.")
    return tuple(v)


def check_entry(path: str, name: str, e, table: dict | None = None, groups: int = 0) -> LayerFormat:
    """Validate one layer entry (types, ranges, geometry) and, with `table` ({tensor: (dtype, shape)}), the tensor
    entries it needs: exactly those, with the dtypes and shapes the entry implies. Returns its LayerFormat."""
    _check(isinstance(name, str) and name and not name.startswith(".") and not name.endswith(".")
           and ".." not in name, path, f"layer name {name!r} is not a module path.")
    _check(isinstance(e, dict), path, f"layer {name}: its entry is not an object.")
    f = e.get("format")
    _check(isinstance(f, dict) and set(f) <= {"w_bits", "a_bits", "group_size", "a_mode", "w_symmetric", "fp8"},
           path, f"layer {name}: bad format entry {f!r}.")
    _check(_is_int(f.get("w_bits")) and f["w_bits"] in W_BITS and _is_int(f.get("a_bits", 16))
           and f.get("a_bits", 16) in A_BITS and f.get("a_mode", "static") in A_MODES
           and (f.get("group_size") is None or (_is_int(f["group_size"]) and f["group_size"] >= 1))
           and (f.get("w_symmetric") is None or isinstance(f["w_symmetric"], bool))
           and isinstance(f.get("fp8", False), bool), path,
           f"layer {name}: bad format entry {f!r}.")
    try:
        fmt = LayerFormat.from_dict(f)
    except (TypeError, ValueError) as err:
        raise _fail(path, f"layer {name}: bad format entry ({err})." + _RECREATE) from None
    kind = e.get("kind")
    _check(kind in ("linear", "conv2d"), path, f"layer {name}: unknown kind {kind!r}.")
    cin, n = e.get("in"), e.get("out")
    _check(_is_int(cin) and _is_int(n) and cin >= 1 and n >= 1, path,
           f"layer {name}: in/out must be positive integers, not {cin!r}/{n!r}.")
    _check(isinstance(e.get("bias"), bool), path, f"layer {name}: bias must be true or false.")
    k = cin
    if kind == "conv2d":
        kh, kw = _pair(path, name, e, "kernel_size", 1, 2 ** 16)
        sh, sw = _pair(path, name, e, "stride", 1, MAX_STRIDE)
        dh, dw = _pair(path, name, e, "dilation", 1, MAX_STRIDE)
        ph, pw = _pair(path, name, e, "padding", 0, 2 ** 16)
        _check(ph <= dh * (kh - 1) and pw <= dw * (kw - 1), path,
               f"layer {name}: padding {[ph, pw]} is wider than the kernel reaches.")
        k = cin * kh * kw
    else:
        _check(not any(key in e for key in ("kernel_size", "stride", "padding", "dilation")), path,
               f"layer {name}: a linear layer with conv geometry.")
    static = fmt.a_bits < 16 and fmt.a_mode == "static"
    split = e.get("a_split")
    _check(split is None or (static and _is_int(split) and 1 <= split < cin), path,
           f"layer {name}: a_split {split!r} is not a channel index inside 1..{cin - 1} of a static layer.")
    if table is None:
        return fmt

    def want(key, dtypes, shape):
        got = table.get(f"{name}.{key}")
        _check(got is not None, path, f"tensor {name}.{key} is missing.")
        _check(got[0] in dtypes, path, f"tensor {name}.{key} has dtype {got[0]}, expected "
                                       f"{' or '.join(map(str, dtypes))}.")
        if shape is not None:
            _check(tuple(got[1]) == tuple(shape), path,
                   f"tensor {name}.{key} has shape {tuple(got[1])}, expected {tuple(shape)}.")
        return got

    expected = set()
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if fmt.w_bits < 16:
        g = 1 if fmt.group_size is None else -(-k // fmt.group_size)
        code_dtype = torch.float8_e4m3fn if fmt.w_fp8 else torch.int8 if fmt.w_bits == 8 else torch.uint8
        want("qweight", (code_dtype,), (n, packed_len(k, fmt.w_bits)))
        want("weight_scale", (torch.float16,), (n, g))
        expected |= {"qweight", "weight_scale"}
        if not fmt.symmetric:
            want("weight_zero", (torch.uint8,), (n, g))
            expected.add("weight_zero")
    else:
        want("weight", floats, (n, cin) if kind == "linear" else (n, cin, kh, kw))
        expected.add("weight")
    if e["bias"]:
        want("bias", floats, (n,))
        expected.add("bias")
    if static:
        s = want("input_scale", (torch.float32,), None)[1]
        _check(len(s) == 2 and 1 <= s[0] <= max(1, groups or MAX_TIME_GROUPS) and s[1] == (1 if split is None else 2),
               path, f"layer {name}: activation ranges have shape {tuple(s)}; expected [groups, "
                     f"{1 if split is None else 2}] with at most {max(1, groups or MAX_TIME_GROUPS)} groups.")
        want("input_zero", (torch.float32,), s)
        expected |= {"input_scale", "input_zero"}
    if f"{name}.bos_in" in table or f"{name}.bos_out" in table:
        _check(kind == "linear", path, f"layer {name}: BOS tensors on a conv layer.")
        want("bos_in", (torch.float32,), (cin,))
        want("bos_out", (torch.float32,), (n,))
        expected |= {"bos_in", "bos_out"}
    if f"{name}.smooth" in table:
        want("smooth", (torch.float32,), (cin,))
        expected.add("smooth")
    for suffix in _LAYER_SUFFIXES:
        _check(suffix in expected or f"{name}.{suffix}" not in table, path,
               f"tensor {name}.{suffix} does not belong to a {fmt.name} {kind} layer.")
    return fmt


def _header_table(path: str) -> tuple[dict, dict]:
    """(metadata strings, {tensor: (torch dtype, shape)}) from the safetensors header; safetensors itself checks
    that the entries' offsets tile the data exactly (truncations, overlaps)."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors header is a little-endian length and then JSON: its first byte is any value (0x80 too, when
    # the length is 128 mod 256), its ninth a "{"
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise _fail(path, "this is a pickle / PyTorch zip file, not safetensors. MixQuant never unpickles files "
                          "(they can run code); re-create it with `mixquant quantize`.")
    try:
        with safe_open(path, framework="pt") as f:
            strings = f.metadata() or {}
            table = {}
            for k in f.keys():
                sl = f.get_slice(k)
                table[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise _fail(path, f"not a readable .safetensors file (truncated or corrupt: {e}). Re-create or "
                          "re-download it.") from None
    out = {}
    for k, (dt, shape) in table.items():
        _check(dt in _DTYPES, path, f"tensor {k} has dtype {dt}, which a MixQuant file never holds.")
        out[k] = (_DTYPES[dt], shape)
    return strings, out


def read_layout(path: str) -> Layout:
    """The file's metadata and tensor entries, all checked (cheap: reads the header only)."""
    if not os.path.isfile(path):
        raise _fail(path, "file not found. Give the path of a .safetensors file written by `mixquant quantize`.")
    strings, table = _header_table(path)
    raw = strings.get(META_KEY)
    if raw is None:
        raise _fail(path, "a safetensors file, but not a MixQuant one (no 'mixquant' metadata). Quantize the model "
                          "with `mixquant quantize` first.")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise _fail(path, "its MixQuant metadata is not valid JSON: the file is corrupt; re-create it.") from None
    _check(isinstance(meta, dict), path, "its MixQuant metadata is not an object.")
    version = meta.get("format_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise _fail(path, f"format version {version!r}, but this MixQuant reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}. Use the MixQuant version that wrote it, or "
                          "re-quantize the model.")
    if version >= 2:
        d = meta.get("digest")
        _check(isinstance(d, dict) and d.get("algorithm") == DIGEST and isinstance(d.get("tensors"), dict)
               and isinstance(d.get("meta"), str), path, "its digest entry is missing or malformed.")
        _check(d["meta"] == _meta_digest(meta), path,
               "its metadata does not match its digest (a value was changed or damaged).")
        _check(set(d["tensors"]) == set(table) and all(isinstance(v, str) for v in d["tensors"].values()), path,
               "its tensor entries do not match the digest's list of tensors (entries added, removed or renamed).")
    for key in ("base_model", "architecture", "layers"):
        _check(isinstance(meta.get(key), dict), path, f"metadata lacks '{key}'.")
    meta.setdefault("extra", {})
    _check_fingerprint(path, meta["base_model"])
    _check_extra(path, meta["extra"], meta["layers"])
    _check(isinstance(meta["architecture"].get("library"), str), path, "the architecture entry names no library.")
    layers = meta["layers"]
    groups = len(meta["extra"].get("act_group_bounds") or [])
    for name, e in layers.items():
        check_entry(path, name, e, table, groups)
    for name in layers:  # a layer inside another one (QuantLayers are leaves)
        parent = name.rpartition(".")[0]
        while parent:
            _check(parent not in layers, path, f"layer {name} lies inside layer {parent}.")
            parent = parent.rpartition(".")[0]
    for k in table:  # a tensor under a layer's name that is not one of its own
        owner = k
        while "." in owner:
            owner = owner.rpartition(".")[0]
            _check(owner not in layers or k.rpartition(".")[0] == owner, path,
                   f"tensor {k} lies inside quantized layer {owner}.")
    return Layout(path, meta, table)


def read_header(path: str) -> dict:
    """The validated `mixquant` metadata of a file (cheap: reads the header only)."""
    return read_layout(path).meta


def read_tensors(path: str, layout: Layout | None = None) -> dict:
    """All tensors of the file, checked against the header and (format 2) against their digests."""
    from safetensors.torch import load_file

    layout = layout or read_layout(path)
    try:
        tensors = load_file(path)
    except Exception as e:
        raise _fail(path, f"its tensor data cannot be read (truncated or corrupt: {e}). Re-create it.") from None
    _check(set(tensors) == set(layout.table), path, "its tensors changed while it was read.")
    digests = layout.meta.get("digest", {}).get("tensors") if layout.meta["format_version"] >= 2 else None
    if digests is not None:
        got = tensor_digests(tensors)
        bad = sorted(k for k in tensors if got[k] != digests[k])
        _check(not bad, path, f"{len(bad)} tensors do not match their digests (damaged data, e.g. {bad[:3]}).")
    return tensors


def build_layer(path: str, name: str, e: dict, tensors: dict) -> QuantLayer:
    """The QuantLayer of a layer entry, from the file's tensors (entry and tensors checked first; built on the meta
    device and then given the file's tensors, so nothing is allocated from the entry's numbers)."""
    table = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items() if k.rpartition(".")[0] == name}
    fmt = check_entry(path, name, e, table)
    kind, cin, n, has_bias = e["kind"], e["in"], e["out"], e["bias"]
    if kind == "linear":
        layer = QuantLinear(cin, n, has_bias, fmt, device="meta")
    else:
        layer = QuantConv2d(cin, n, tuple(e["kernel_size"]), tuple(e["stride"]), tuple(e["padding"]),
                            tuple(e["dilation"]), has_bias, fmt, device="meta")

    def get(key):
        return tensors[f"{name}.{key}"]

    with torch.no_grad():
        if fmt.w_bits < 16:
            scale = get("weight_scale")
            _check(bool(torch.isfinite(scale).all()) and bool((scale > 0).all()), path,
                   f"tensor {name}.weight_scale has NaN, infinite or non-positive scales.")
            zero = None
            if not fmt.symmetric:
                zero = get("weight_zero")
                _check(int(zero.max()) < 2 ** fmt.w_bits if zero.numel() else True, path,
                       f"tensor {name}.weight_zero is out of range.")
            if fmt.w_fp8:
                _check(bool(torch.isfinite(get("qweight").float()).all()), path,
                       f"tensor {name}.qweight holds NaN float8 codes.")
            weight = join_rows(get("qweight"), scale, zero)
        else:
            weight = get("weight")
            _check(bool(torch.isfinite(weight).all()), path, f"tensor {name}.weight holds NaN/inf.")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if has_bias:
            b = get("bias")
            _check(bool(torch.isfinite(b).all()), path, f"tensor {name}.bias holds NaN/inf.")
            layer.bias = nn.Parameter(b, requires_grad=False)
        if fmt.a_bits < 16 and fmt.a_mode == "static":
            s, z = get("input_scale"), get("input_zero")
            qmax = 0 if fmt.a_fp8 else 2 ** fmt.a_bits - 1  # (e4m3 activations are symmetric: no zero point)
            _check(bool(torch.isfinite(s).all()) and bool((s > 0).all()) and bool(torch.isfinite(z).all())
                   and bool(((z >= 0) & (z <= qmax) & (z == z.round())).all()), path,
                   f"layer {name}: activation ranges hold NaN, infinite, non-positive scales or zero points "
                   f"outside 0..{qmax}.")
            layer.input_scale, layer.input_zero = s, z
            layer.a_split = e.get("a_split")
        if f"{name}.bos_in" in tensors:
            bi, bo = get("bos_in"), get("bos_out")
            _check(bool(torch.isfinite(bi).all() and torch.isfinite(bo).all()), path,
                   f"layer {name}: BOS tensors are not finite.")
            layer.bos_in, layer.bos_out = bi.float(), bo.float()
        if f"{name}.smooth" in tensors:
            sm = get("smooth")
            _check(bool(torch.isfinite(sm).all()) and bool((sm > 0).all()), path,
                   f"layer {name}: its balancing vector holds NaN, infinite or non-positive values.")
            layer.smooth = sm.float()
    return layer


_GEOMETRY = ("kernel_size", "stride", "padding", "dilation")


def _check_slot(path: str, name: str, e: dict, mod) -> None:
    """The skeleton's module at a quantized layer's name must be the float layer the entry describes."""
    if e["kind"] == "linear":
        ok = isinstance(mod, nn.Linear) and (mod.in_features, mod.out_features) == (e["in"], e["out"])
    else:
        ok = (isinstance(mod, nn.Conv2d) and (mod.in_channels, mod.out_channels) == (e["in"], e["out"])
              and mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
              and all(tuple(getattr(mod, g)) == tuple(e[g]) for g in _GEOMETRY))
    ok = ok and (getattr(mod, "bias", None) is not None) == e["bias"]
    _check(ok, path, f"layer {name}: its entry ({e['kind']} {e['in']}->{e['out']}"
                     + (f", {', '.join(f'{g} {e[g]}' for g in _GEOMETRY)}" if e["kind"] == "conv2d" else "")
                     + f", bias {e['bias']}) does not match this architecture's layer there ({mod!r}).")


def load_quantized(path: str, skeleton: nn.Module, base_fingerprint: dict | None = None, *,
                   layout: Layout | None = None, tensors: dict | None = None) -> nn.Module:
    """Rebuild the quantized denoiser from `path` into `skeleton` (an instance of the saved architecture; its own
    weights are replaced, and it may live on the meta device). With `base_fingerprint`, the file must have been made
    from that FP model. Every check runs before the skeleton is touched."""
    layout = layout or read_layout(path)
    meta = layout.meta
    if base_fingerprint is not None and not same_base(meta["base_model"], base_fingerprint):
        raise _fail(path, "was made from a different base model than the one given (fingerprints differ). Use "
                          "the model it was quantized from, or re-quantize this model.")
    modules = dict(skeleton.named_modules())
    for name, e in meta["layers"].items():
        _check(name in modules, path, f"layer {name} does not exist in this architecture.")
        _check_slot(path, name, e, modules[name])
    prefixes = tuple(n + "." for n in meta["layers"])
    expected = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(prefixes)}
    rest_keys = {k for k in layout.table if not k.startswith(prefixes)}
    missing = sorted(set(expected) - rest_keys)
    unexpected = sorted(rest_keys - set(expected))
    _check(not missing, path, f"{len(missing)} tensors are missing (e.g. {missing[:3]}).")
    _check(not unexpected, path, f"{len(unexpected)} tensors do not belong to this architecture "
                                 f"(e.g. {unexpected[:3]}).")
    for k in rest_keys:
        dt, shape = layout.table[k]
        want = expected[k]
        _check(shape == tuple(want.shape), path, f"tensor {k} has shape {shape}, expected {tuple(want.shape)}.")
        _check(dt.is_floating_point == want.is_floating_point() and (dt == torch.bool) == (want.dtype == torch.bool),
               path, f"tensor {k} has dtype {dt}, expected a {want.dtype} kind of tensor.")
    tensors = tensors if tensors is not None else read_tensors(path, layout)
    layers = {name: build_layer(path, name, e, tensors) for name, e in meta["layers"].items()}
    rest = {k: tensors[k] for k in rest_keys}
    for k, v in rest.items():
        _check(not v.is_floating_point() or bool(torch.isfinite(v).all()), path, f"tensor {k} holds NaN/inf.")
    for name, layer in layers.items():
        set_submodule(skeleton, name, layer)
    skeleton.load_state_dict(rest, strict=False, assign=True)
    fusion.enable(skeleton)
    return skeleton


# --- a bound on building a skeleton ----------------------------------------------------------------------------------

class _TooBig(MixQuantError):
    pass


_FACTORIES = {"empty", "zeros", "ones", "full", "rand", "randn", "randint", "arange", "tensor", "as_tensor",
              "linspace", "logspace", "eye", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
              "randn_like", "empty_strided", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"}


class build_guard:
    """Context manager for building a skeleton from a file's description: counts the tensors created and their
    elements, and stops the build (MixQuantError) as soon as it goes past what the file's own tensors imply (a
    generous multiple of them). Use it with the meta device: then the build allocates nothing at all, and this
    bounds the time and the Python objects a bogus description could cost."""

    def __init__(self, layout: Layout, slack: float = 4.0):
        from torch.overrides import TorchFunctionMode

        self.path = layout.path
        self.max_tensors = int(slack * len(layout.shapes)) + 1024
        self.max_numel = int(slack * layout.numel()) + 2 ** 22
        self.tensors = self.numel = 0
        guard = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if getattr(func, "__name__", "") in _FACTORIES and isinstance(out, torch.Tensor):
                    guard.tensors += 1
                    guard.numel += out.numel()
                    if guard.tensors > guard.max_tensors or guard.numel > guard.max_numel:
                        raise _TooBig()
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, typ, value, tb):
        self.mode.__exit__(typ, value, tb)
        if typ is _TooBig or isinstance(value, _TooBig):
            raise _fail(self.path, f"its architecture entry describes a model far larger than its tensors (over "
                                   f"{self.max_tensors} tensors or {self.max_numel} elements)." + _RECREATE) from None
        return False
