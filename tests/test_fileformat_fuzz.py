"""Damaged MixQuant files: a few hundred seeded variants of one small quantized UNet file, each loaded from the file
alone (`load_denoiser(path)`, as `mixquant generate --quantized` does) and run once on a fixed input.

Every case must end in ONE clean MixQuantError (one line, naming the file) or in a model identical to the saved one
(the same output, bit for bit); no other exception. Kinds of damage:
- meta:     a value of the `mixquant` metadata changed (every field of the architecture entry and of the layer
            entries: wrong types, negatives, zeros, huge values, wrong lengths, keys removed / renamed / added);
- resigned: the same edits with the digest recomputed, as a deliberately edited file would be: then the structural
            checks alone must hold. Here a third outcome is allowed: an edit that describes another valid model
            (e.g. norm_eps) loads and runs cleanly (that file *is* another model); it is counted, never an exception;
- entries:  safetensors tensor entries changed (dtype, shape, data_offsets, removed, renamed), raw and re-signed;
- flips:    bytes flipped in the tensor data (every one must be caught: the digest) and in the header;
- cuts:     truncations at every kind of place, and bytes appended.
Allocation bound: each load happens under a TorchDispatchMode that looks at every tensor allocation before it
happens and fails the test if one non-meta tensor would be larger than the file, or all of them together larger than
4x the file (the skeleton is built on the meta device; a 32 GB request would be stopped before it is made). The
forward runs outside it (the per-op hook would cost seconds per forward): the process's peak RSS may not grow by
more than 256 MB over all cases (the file is under 1 MB; one bogus 32 GB request would also end in a raw error).
"""
from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixquant.app.diffusers_host.files import load_denoiser, save_denoiser
from mixquant.quant.apply import quantize_model
from mixquant.quant.calibration import collect_act_ranges
from mixquant.quant.errors import MixQuantError
from mixquant.quant.fileformat import META_KEY, fingerprint, sign, tensor_digests
from mixquant.quant.formats import LayerFormat
from mixquant.quant.roles import discover_layers

SEED = 20


# --- the file and raw safetensors editing ------------------------------------------------------------------------------

def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 6, 32, generator=g)


def _run(model, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return model(x, t, ctx).sample


@pytest.fixture(scope="module")
def original(small_unet, tmp_path_factory):
    """A mixed plan (W8A8 static, W4 g64, W2 g64, dynamic A8, W4A8 asymmetric, split ranges, float layers) with
    two timestep groups, saved; its bytes, and the output of the model it was saved from."""
    inputs = _inputs()
    layers = discover_layers(small_unet)
    fmts = [LayerFormat(8, 8), LayerFormat(4, 16, 64), LayerFormat(2, 16, 64), LayerFormat(8, 8, None, "dynamic"),
            LayerFormat(4, 8)]
    plan = {li.name: (LayerFormat(16, 16) if li.protected else fmts[i % len(fmts)]) for i, li in enumerate(layers)}
    ranges = collect_act_ranges(small_unet, lambda: _run(small_unet, inputs))
    q, _ = quantize_model(small_unet, plan, ranges, search="minmax")
    split = next(m for n, m in q.named_modules() if getattr(m, "input_scale", None) is not None and m.k > 8)
    with torch.no_grad():  # two timestep groups and one layer with channel-split ranges: those fields get fuzzed too
        for m in q.modules():
            if getattr(m, "input_scale", None) is not None:
                cin = m.in_features if hasattr(m, "in_features") else m.in_channels
                lo, hi = -torch.rand(2, 2 if m is split else 1) - 0.5, torch.rand(2, 2 if m is split else 1) + 0.5
                m.set_act_range(lo, hi, cin // 2 if m is split else None)
    path = tmp_path_factory.mktemp("fuzz") / "q.safetensors"
    save_denoiser(q, str(path), fingerprint(small_unet), extra={"act_group_bounds": [600.0, 0.0], "note": "fuzz"})
    ref = _run(load_denoiser(str(path)), inputs)
    return path.read_bytes(), ref, inputs


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _meta_of(data: bytes) -> dict:
    return json.loads(_split(data)[0]["__metadata__"][META_KEY])


def _with_meta(data: bytes, meta: dict, resign: bool, digests: dict | None = None) -> bytes:
    header, body = _split(data)
    if resign:
        meta = {k: v for k, v in meta.items() if k != "digest"}
        meta = sign(meta, digests if digests is not None else _meta_of(data)["digest"]["tensors"])
    header["__metadata__"][META_KEY] = json.dumps(meta)
    return _join(header, body)


# --- value mutations ---------------------------------------------------------------------------------------------------

def _leaves(obj, path=()):
    """(path, value) of every leaf and every list of the metadata (the digest's per-tensor entries excluded)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if path[:2] == ("digest", "tensors"):
                continue
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        yield path, obj
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _replacements(v, rng):
    """Wrong types, negatives, zeros, huge values, wrong lengths, neighbours of the right value."""
    out = ["x", None, True, 1.5, -1, 0, 2 ** 31, 10 ** 30, [], {}, float("inf")]
    if isinstance(v, bool):
        out += [not v, 1]
    elif isinstance(v, int):
        out += [v + 1, v - 1, -v, 2 * v, v * 10 ** 6, float(v), str(v)]
    elif isinstance(v, float):
        out += [v * 1.001 + 1e-3, -v, float("nan"), int(v)]
    elif isinstance(v, str):
        out += ["", v + "x", v.upper(), "linear", "conv2d", "dynamic", "static", "Transformer2DModel", "comfyui"]
    elif isinstance(v, list):
        out += [v[:-1], v + v[-1:], v * 3, [x * 1000 if isinstance(x, int) and not isinstance(x, bool) else x
                                            for x in v], list(reversed(v)), [str(x) for x in v]]
    elif v is None:
        out += [1, 4, 2 ** 20, "static"]
    return out


def _set(meta, path, value):
    m = copy.deepcopy(meta)
    obj = m
    for p in path[:-1]:
        obj = obj[p]
    if value is _DELETE:
        if isinstance(obj, list):
            obj.pop(path[-1])
        else:
            del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return m


_DELETE = object()


def _meta_cases(meta, rng, n, resign):
    """n edits of the metadata, chosen so that every field of the architecture entry and of a layer entry (one
    linear, one conv, one static-split layer) is hit, the rest spread over all leaves."""
    leaves = list(_leaves(meta))
    names = list(meta["layers"])
    conv = next(k for k, e in meta["layers"].items() if e["kind"] == "conv2d")
    split = next((k for k, e in meta["layers"].items() if e.get("a_split") is not None), names[-1])
    focus = [p for p, _ in leaves if p[:1] == ("architecture",) or (p[:2] in (("layers", names[0]),
                                                                               ("layers", conv), ("layers", split)))]
    cases = []
    for p in focus:  # each focus field once, with a random bad value
        v = dict(leaves)[p]
        cases.append((f"{'/'.join(map(str, p))} set", _set(meta, p, rng.choice(
            _replacements(v, rng)))))
    while len(cases) < n:
        p, v = rng.choice(leaves)
        r = rng.random()
        if r < 0.1 and p:
            cases.append((f"{'/'.join(map(str, p))} removed", _set(meta, p, _DELETE)))
        else:
            cases.append((f"{'/'.join(map(str, p))} changed", _set(meta, p, rng.choice(_replacements(v, rng)))))
    # keys: a layer renamed, removed, duplicated under another name, a bogus layer, a layer inside another
    e0 = meta["layers"][names[0]]
    for label, edit in [
        ("layer renamed", lambda m: m["layers"].__setitem__(names[0] + "x", m["layers"].pop(names[0]))),
        ("layer removed", lambda m: m["layers"].pop(names[1])),
        ("layer added", lambda m: m["layers"].__setitem__("conv_in", copy.deepcopy(e0))),
        ("nested layer", lambda m: m["layers"].__setitem__(names[0] + ".inner", copy.deepcopy(e0))),
        ("empty name", lambda m: m["layers"].__setitem__("", copy.deepcopy(e0))),
        ("metadata not an object", None),
    ]:
        m = copy.deepcopy(meta)
        if edit is None:
            m = [m]
        else:
            edit(m)
        cases.append((label, m))
    return [(("resigned " if resign else "meta ") + label, m) for label, m in cases[:n + 6]]


# --- the harness ---------------------------------------------------------------------------------------------------

class AllocationGuard(TorchDispatchMode):
    """Fails (AssertionError, never caught as a clean outcome) before a non-meta tensor allocation that is larger than
    `limit` bytes, or that brings all of them past `total` bytes."""

    FACTORIES = {"empty", "empty_strided", "zeros", "ones", "full", "new_empty", "new_zeros", "new_ones",
                 "new_full", "new_empty_strided", "rand", "randn", "arange", "scalar_tensor"}

    def __init__(self, limit: int, total: int):
        super().__init__()
        self.limit, self.total, self.used, self.peak = limit, total, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in self.FACTORIES and str(kwargs.get("device", "cpu")) != "meta":
            size = args[1] if name.startswith("new_") else args[0]
            if isinstance(size, (list, tuple, torch.Size)) and all(isinstance(s, int) for s in size):
                dtype = kwargs.get("dtype") or (args[0].dtype if name.startswith("new_") else torch.float32)
                nbytes = math.prod(size) * torch.empty((), dtype=dtype, device="meta").element_size()
                assert nbytes <= self.limit, f"{func}: {nbytes} bytes requested, more than the file ({self.limit})"
                self.used += nbytes
                self.peak = max(self.peak, nbytes)
                assert self.used <= self.total, f"{self.used} bytes allocated in all, over {self.total}"
        return func(*args, **kwargs)


def _outcome(data: bytes, path, ref, inputs, allow_other: bool) -> str:
    path.write_bytes(data)
    guard = AllocationGuard(limit=len(data), total=4 * len(data))
    try:
        with guard:  # every allocation of the load is looked at before it happens
            model = load_denoiser(str(path))
        out = _run(model, inputs)  # (outside: the per-op hook costs seconds per forward; RSS is checked instead)
    except MixQuantError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return "error"
    if out.shape == ref.shape and torch.equal(out, ref):
        return "identical"
    assert allow_other, "a damaged file loaded and ran on different data without an error"
    return "other model"


def test_damaged_files(original, tmp_path):
    data, ref, inputs = original
    rng = random.Random(SEED)
    meta = _meta_of(data)
    header, body = _split(data)
    n_head = len(data) - len(body)
    cases = []  # (kind, label, bytes, other model allowed)

    for resign, n in ((False, 90), (True, 130)):
        for label, m in _meta_cases(meta, rng, n, resign):
            if not isinstance(m, dict):
                h = copy.deepcopy(header)
                h["__metadata__"][META_KEY] = json.dumps(m)
                cases.append(("meta", label, _join(h, body), False))
            else:
                cases.append(("resigned" if resign else "meta", label, _with_meta(data, m, resign), resign))

    names = sorted(k for k in header if k != "__metadata__")
    for i in range(60):
        h = copy.deepcopy(header)
        k = rng.choice(names)
        ent = h[k]
        what = rng.choice(["dtype", "shape", "offsets", "remove", "rename", "swap offsets"])
        if what == "dtype":
            ent["dtype"] = rng.choice([d for d in ("F32", "F16", "BF16", "I32", "U8", "I8", "I64", "F64", "X9")
                                       if d != ent["dtype"]])
        elif what == "shape":
            s = ent["shape"]
            ent["shape"] = rng.choice([s[::-1], s + [1], s[:-1], [x + 1 for x in s], [0] + s, [-1] + s[1:],
                                       [2 ** 40] + s[1:], [math.prod(s)]])
        elif what == "offsets":
            a, b = ent["data_offsets"]
            ent["data_offsets"] = rng.choice([[a + 1, b], [a, b + 1], [a - 1, b - 1], [b, a], [0, b - a],
                                              [a, 2 ** 62], [-1, b]])
        elif what == "remove":
            del h[k]
        elif what == "rename":
            h[k + "_"] = h.pop(k)
        else:
            j = rng.choice(names)
            h[k]["data_offsets"], h[j]["data_offsets"] = h[j]["data_offsets"], h[k]["data_offsets"]
        resigned = i % 3 == 2 and what in ("dtype", "shape")
        raw = _join(h, body)
        if resigned:  # reinterpret with the same byte count, digests recomputed (a deliberate edit)
            h = copy.deepcopy(header)
            ent = h[k]
            size = {"F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "F64": 8, "I64": 8}[ent["dtype"]]
            ent["dtype"] = rng.choice([d for d, s in (("F32", 4), ("I32", 4), ("F16", 2), ("BF16", 2), ("U8", 1),
                                                      ("I8", 1)) if s == size and d != ent["dtype"]] or ["F32"])
            if len(ent["shape"]) >= 2 and rng.random() < 0.5:
                ent["shape"] = ent["shape"][::-1]
            raw = _join(h, body)
            p = tmp_path / "resign.safetensors"
            p.write_bytes(raw)
            try:
                from safetensors.torch import load_file

                digests = tensor_digests(load_file(str(p)))
                raw = _with_meta(raw, meta, True, digests)
            except Exception:
                pass  # safetensors refuses the entry itself: the raw edit stays
        cases.append(("entries", f"{k} {what}{' resigned' if resigned else ''}", raw, resigned))

    for i in range(60):
        b = bytearray(data)
        in_data = i < 50
        lo, hi = (n_head, len(data)) if in_data else (8, n_head)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(lo, hi)
            b[pos] ^= rng.choice([1 << rng.randrange(8), 0xFF, rng.randrange(1, 256)])
        cases.append(("flips-data" if in_data else "flips-header", f"{i}", bytes(b), False))

    cuts = [0, 4, 8, 9, n_head // 2, n_head - 1, n_head, n_head + 1, len(data) // 2, len(data) - 1] + \
        [rng.randrange(n_head, len(data)) for _ in range(8)]
    for c in cuts:
        cases.append(("cuts", f"truncated at {c}", data[:c], False))
    for extra in (b"\x00", b"x" * 7, b"\x00" * 4096):
        cases.append(("cuts", f"{len(extra)} bytes appended", data + extra, False))

    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = Counter()
    others = []
    by_kind = {}
    failures = []
    path = tmp_path / "damaged.safetensors"
    for kind, label, blob, allow in cases:
        try:
            got = _outcome(blob, path, ref, inputs, allow)
        except AssertionError as e:
            failures.append(f"{kind} {label}: {str(e)[:300]}")
            continue
        except Exception as e:  # a raw error: the failure this test is about
            failures.append(f"{kind} {label}: raw {type(e).__name__}: {str(e)[:300]}")
            continue
        outcomes[got] += 1
        by_kind.setdefault(kind, Counter())[got] += 1
        if got == "other model":
            others.append(label)
    print(f"\n{len(cases)} damaged files: {dict(outcomes)}; by kind: "
          + "; ".join(f"{k} {dict(v)}" for k, v in by_kind.items()) + f"; loaded as another valid model: {others}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown < 256 * 1024, f"peak RSS grew by {grown} KiB while loading and running the damaged files"
    assert len(cases) >= 350
    assert by_kind["flips-data"] == Counter(error=50), by_kind["flips-data"]  # the digest catches every one
    assert set(by_kind["cuts"]) <= {"error", "identical"}
    assert by_kind["resigned"]["error"] > 0 and by_kind["meta"]["error"] > 0


def test_pristine_copy_is_identical(original, tmp_path):
    data, ref, inputs = original
    assert _outcome(data, tmp_path / "same.safetensors", ref, inputs, allow_other=False) == "identical"


def test_version_1_file_without_digest_still_loads(original, tmp_path):
    """Files written before the digest existed (format 1) load with every structural check, without the digest."""
    data, ref, inputs = original
    meta = _meta_of(data)
    meta.pop("digest")
    meta["format_version"] = 1
    assert _outcome(_with_meta(data, meta, resign=False), tmp_path / "v1.safetensors", ref, inputs, False) == \
        "identical"
    # a v2 file whose digest was stripped is not taken for a v1 file
    meta["format_version"] = 2
    with pytest.raises(MixQuantError, match="digest"):
        p = tmp_path / "v2.safetensors"
        p.write_bytes(_with_meta(data, meta, resign=False))
        load_denoiser(str(p))
