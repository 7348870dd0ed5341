import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixquant.app.diffusers_host.files import load_denoiser, save_denoiser
from mixquant.quant.apply import quantize_model
from mixquant.quant.calibration import collect_act_ranges
from mixquant.quant.errors import MixQuantError
from mixquant.quant.fileformat import META_KEY, fingerprint, read_header, sign, tensor_digests
from mixquant.quant.formats import LayerFormat
from mixquant.quant.roles import discover_layers


def _run(model, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return model(x, t, ctx).sample


@pytest.fixture(scope="module")
def saved(small_unet, unet_inputs, tmp_path_factory):
    """A mixed plan: W8A8 static, W4 g64 A16, W2, dynamic A8, float protected layers."""
    layers = discover_layers(small_unet)
    fmts = [LayerFormat(8, 8), LayerFormat(4, 16, 64), LayerFormat(2, 16, 64), LayerFormat(8, 8, None, "dynamic"),
            LayerFormat(4, 8)]
    plan = {li.name: (LayerFormat(16, 16) if li.protected else fmts[i % len(fmts)]) for i, li in enumerate(layers)}
    ranges = collect_act_ranges(small_unet, lambda: _run(small_unet, unet_inputs))
    q, _ = quantize_model(small_unet, plan, ranges)
    path = str(tmp_path_factory.mktemp("q") / "q.safetensors")
    save_denoiser(q, path, fingerprint(small_unet), extra={"note": "test"})
    return q, path


def test_save_load_identical_outputs(saved, small_unet, unet_inputs):
    q, path = saved
    loaded = load_denoiser(path, base=small_unet)
    assert torch.equal(_run(q, unet_inputs), _run(loaded, unet_inputs))
    meta = read_header(path)
    assert meta["format_version"] == 2 and meta["extra"]["note"] == "test"
    assert meta["architecture"]["class"] == "UNet2DConditionModel"
    assert {e["format"]["w_bits"] for e in meta["layers"].values()} == {2, 4, 8}
    # the file alone rebuilds it (no base model given)
    assert torch.equal(_run(load_denoiser(path), unet_inputs), _run(q, unet_inputs))


def _rewrite(path, dst, tensors=None, meta=None, resign=True):
    """A copy with tensors / metadata changed, re-signed (as a deliberately edited file would be) so that the checks
    behind the digest are what catches it."""
    t = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        m = json.loads(f.metadata()[META_KEY])
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    if resign:
        m.pop("digest", None)
        m = sign(m, tensor_digests(t))
    save_file(t, dst, metadata={META_KEY: json.dumps(m)})
    return dst


def _first_layer(meta_or_path, w_bits=None):
    meta = read_header(meta_or_path) if isinstance(meta_or_path, str) else meta_or_path
    return next(n for n, e in meta["layers"].items() if w_bits is None or e["format"]["w_bits"] == w_bits)


def _bad_files(path, d, other_unet):
    name4 = _first_layer(path, 4)
    data = open(path, "rb").read()
    cases = {}
    p = d / "truncated.safetensors"
    p.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (p, "truncated or corrupt")
    p = d / "garbage.safetensors"
    p.write_bytes(os.urandom(4096))
    cases["garbage"] = (p, "not a readable")
    p = d / "pickle.safetensors"
    p.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    cases["pickle"] = (p, "pickle")
    p = d / "zip.safetensors"
    torch.save({"w": torch.zeros(2)}, p)
    cases["torch zip"] = (p, "pickle")
    cases["version"] = (_rewrite(path, d / "v.safetensors", meta=lambda m: m.update(format_version=99)), "version")
    cases["missing"] = (_rewrite(path, d / "m.safetensors", tensors=lambda t: t.pop(f"{name4}.weight_scale")),
                        "missing")
    cases["missing rest"] = (_rewrite(path, d / "mr.safetensors", tensors=lambda t: t.pop("conv_in.weight")),
                             "missing")

    def wrong_shape(t):
        t[f"{name4}.qweight"] = t[f"{name4}.qweight"][:, :-1].contiguous()

    cases["shape"] = (_rewrite(path, d / "s.safetensors", tensors=wrong_shape), "shape")

    def nan_scale(t):
        s = t[f"{name4}.weight_scale"].clone()
        s[0, 0] = float("nan")
        t[f"{name4}.weight_scale"] = s

    cases["nan scale"] = (_rewrite(path, d / "n.safetensors", tensors=nan_scale), "NaN")
    cases["not ours"] = (d / "plain.safetensors", "not a MixQuant")
    save_file({"x": torch.zeros(2)}, str(d / "plain.safetensors"))
    cases["nonexistent"] = (d / "nope.safetensors", "not found")
    return cases


CASES = ["truncated", "garbage", "pickle", "torch zip", "version", "missing", "missing rest", "shape", "nan scale",
         "not ours", "nonexistent"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_raise_one_clear_error(saved, small_unet, tmp_path, case):
    _, path = saved
    p, needle = _bad_files(path, tmp_path, small_unet)[case]
    with pytest.raises(MixQuantError, match=needle) as ei:
        load_denoiser(str(p), base=small_unet)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg


def test_mismatched_base_model(saved, small_unet):
    import copy

    _, path = saved
    other = copy.deepcopy(small_unet)
    with torch.no_grad():
        for prm in other.parameters():
            prm.mul_(1.5)
    with pytest.raises(MixQuantError, match="different base model"):
        load_denoiser(path, base=other)
    # the same weights in another dtype still match
    load_denoiser(path, base=copy.deepcopy(small_unet).half())


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch, small_unet):
    import safetensors.torch

    q, _ = saved
    dst = tmp_path / "out.safetensors"

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_denoiser(q, str(dst), fingerprint(small_unet))
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_failed_save_keeps_old_file(saved, tmp_path, monkeypatch, small_unet):
    import safetensors.torch

    q, path = saved
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old")
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save_denoiser(q, str(dst), fingerprint(small_unet))
    assert dst.read_bytes() == b"old"


def test_file_only_skeleton_has_no_fp_weights_of_quantized_layers(saved):
    """The ComfyUI file-only loader's float skeleton: the file's own tensors, and meta placeholders (no memory) in
    the float shape of each quantized layer's weight; a diffusers file is refused with what to do instead."""
    from mixquant.nodes.loader import check_architecture, skeleton_state_dict
    from mixquant.quant.fileformat import read_layout, read_tensors

    q, path = saved
    layout = read_layout(path)
    sd = skeleton_state_dict(layout, read_tensors(path, layout))
    fp = {k: v for k, v in q.state_dict().items() if not any(k.startswith(n + ".") for n in layout.layers)}
    for name, e in layout.layers.items():
        w = sd[f"{name}.weight"]
        assert w.is_meta and tuple(w.shape) == tuple(q.get_submodule(name)._from_2d(
            torch.empty(e["out"], q.get_submodule(name).k, device="meta")).shape)
    assert all(not v.is_meta and torch.equal(v, fp[k]) for k, v in sd.items() if k in fp)
    with pytest.raises(MixQuantError, match="export --to comfyui"):
        check_architecture(layout)


@pytest.mark.parametrize("low_byte", [0x80, ord("P")])
def test_a_header_length_that_looks_like_a_pickle_opcode_still_loads(saved, small_unet, unet_inputs, tmp_path,
                                                                     low_byte):
    """A safetensors file starts with its header's length: 128 mod 256 makes the first byte 0x80 (pickle's PROTO
    opcode). The ninth byte ("{") tells the two apart; such a file (the header padded with spaces, as safetensors
    allows) loads, and a real pickle is still refused."""
    q, path = saved
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    pad = (low_byte - n) % 256
    pad += 256 if pad % 8 else 0  # keep the data 8-byte aligned
    while (n + pad) % 256 != low_byte or (n + pad) % 8:
        pad += 8
    new = tmp_path / "padded.safetensors"
    new.write_bytes((n + pad).to_bytes(8, "little") + raw[8:8 + n] + b" " * pad + raw[8 + n:])
    assert new.read_bytes()[0] == low_byte
    loaded = load_denoiser(str(new), base=small_unet)
    assert torch.equal(_run(loaded, unet_inputs), _run(q, unet_inputs))
    bad = tmp_path / "pickle.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(MixQuantError, match="pickle"):
        load_denoiser(str(bad), base=small_unet)
