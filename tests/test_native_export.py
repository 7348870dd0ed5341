"""Export in ComfyUI's native per-layer format (quant/native.py): comfy-kitchen's eager backend, running on CPU,
computes every exported layer from the exported tensors and must match our layer; markers, keys, dtypes and shapes
as shared/comfy-native-quant.md specifies; no Conv2d marked; the CLI `mixquant export`."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixquant.kernels import dispatch
from mixquant.quant.apply import ActRange, quantize_model
from mixquant.quant.fileformat import fingerprint, save_quantized
from mixquant.quant.formats import LayerFormat
from mixquant.quant.layers import QuantLinear
from mixquant.quant.native import (diffusers_to_ldm, export_native, native_layer_tensors, read_marker, sd_family,
                                   split_model)

W8A8D = LayerFormat(8, 8, None, "dynamic")
W4G64 = LayerFormat(4, 16, 64)


def _ck():
    pytest.importorskip("packaging")
    return pytest.importorskip("comfy_kitchen")


def _ck_weight(t: dict, conf: dict, n: int, k: int, dtype):
    """The weight exactly as ComfyUI's loader builds it from the exported tensors (ops._load_quantized_module)."""
    from comfy_kitchen.tensor.awq_w4a16 import TensorCoreAWQW4A16Layout
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout

    if conf["format"] == "int8_tensorwise":
        p = TensorWiseINT8Layout.Params(scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(n, k), is_weight=True)
        return QuantizedTensor(t["weight"], "TensorWiseINT8Layout", p)
    assert conf["format"] == "awq_w4a16"
    p = TensorCoreAWQW4A16Layout.Params(scale=t["weight_scale"], orig_dtype=dtype, orig_shape=(n, k),
                                        zeros=t["weight_zeros"], group_size=conf["group_size"])
    return QuantizedTensor(t["weight"], "TensorCoreAWQW4A16Layout", p)


@pytest.mark.parametrize("n,k", [(96, 256), (40, 128), (320, 768)])
def test_int8_tensorwise_matches_comfy_kitchen(n, k):
    _ck()
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n)
    q = QuantLinear.from_float(lin, W8A8D)
    t, conf, _ = native_layer_tensors(q)
    assert conf == {"format": "int8_tensorwise"}
    assert t["weight"].dtype == torch.int8 and tuple(t["weight"].shape) == (n, k)
    assert t["weight_scale"].dtype == torch.float32 and tuple(t["weight_scale"].shape) == (n, 1)
    x = torch.randn(2, 77, k) * 3
    bias = q.bias.detach()
    y_ck = F.linear(x, _ck_weight(t, conf, n, k, torch.float32), bias)
    with dispatch.use_backend("reference"):
        y = q(x)
    # same integer codes, same scales, same dynamic per-token A8 (half-even rounding, clamp -128..127): only the
    # order of the fp32 epilogue multiplications differs
    assert torch.allclose(y_ck, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("n,k", [(96, 256), (64, 64), (320, 1280)])
def test_awq_w4a16_matches_comfy_kitchen(n, k):
    _ck()
    from comfy_kitchen.tensor.awq_w4a16 import TensorCoreAWQW4A16Layout

    torch.manual_seed(n * k)
    lin = nn.Linear(k, n)
    q = QuantLinear.from_float(lin, W4G64)
    t, conf, _ = native_layer_tensors(q)
    assert conf == {"format": "awq_w4a16", "group_size": 64}
    assert t["weight"].dtype == torch.int8 and tuple(t["weight"].shape) == (n, k // 2)
    for key in ("weight_scale", "weight_zeros"):  # comfy-kitchen 0.2.40 reads `weight_zeros` (plural)
        assert t[key].dtype == torch.float16 and tuple(t[key].shape) == (k // 64, n)
    # the decoded weight: (u - 8) * s + (8 - z) * s == (u - z) * s up to the fp16 rounding of the zeros term
    p = _ck_weight(t, conf, n, k, torch.float16)._params
    w_ck = TensorCoreAWQW4A16Layout.dequantize(t["weight"], p).float()
    w = q.dequantized_weight()
    assert (w_ck - w).abs().max() <= 2 ** -10 * float(w.abs().max())
    x = torch.randn(3, 16, k)
    y_ck = F.linear(x.half(), _ck_weight(t, conf, n, k, torch.float16), q.bias.detach().half()).float()
    with dispatch.use_backend("reference"):
        y = q(x)
    assert torch.allclose(y_ck, y, rtol=0, atol=3e-3 * float(y.abs().max()))


class Tiny(nn.Module):
    """Linear and conv layers whose plans cover every case: native int8, native AWQ, and what must stay float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 64, 3, padding=1)
        self.q8 = nn.Linear(64, 128)
        self.q4 = nn.Linear(128, 128)
        self.static8 = nn.Linear(128, 64)
        self.w2 = nn.Linear(64, 64)
        self.w8only = nn.Linear(64, 64)
        self.odd = nn.Linear(96, 64)  # K not a multiple of 64: no AWQ
        self.keep = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        h = self.w8only(self.w2(self.static8(self.q4(self.q8(h)))))
        return self.norm(self.keep(h + self.odd(torch.cat([h, h[:, :32]], 1))))


def _quantized_tiny():
    torch.manual_seed(0)
    m = Tiny().eval()
    plan = {"conv": W8A8D.__class__(8, 16), "q8": W8A8D, "q4": W4G64, "static8": LayerFormat(8, 8),
            "w2": LayerFormat(2, 16, 64), "w8only": LayerFormat(8, 16), "odd": W4G64, "keep": LayerFormat(16, 16)}
    ranges = {"static8": ActRange(torch.tensor([[-3.0]]), torch.tensor([[3.0]]))}
    qm, _ = quantize_model(m, plan, ranges)
    return m, qm


def test_export_markers_keys_dtypes_and_no_conv():
    qm = _quantized_tiny()[1]
    exp = export_native(*split_model(qm))
    t = exp.tensors
    markers = {k[: -len(".comfy_quant")]: read_marker(v) for k, v in t.items() if k.endswith(".comfy_quant")}
    assert markers == {"q8": {"format": "int8_tensorwise"}, "q4": {"format": "awq_w4a16", "group_size": 64}}
    for k, v in t.items():
        if k.endswith(".comfy_quant"):
            assert v.dtype == torch.uint8 and v.dim() == 1
            assert json.loads(bytes(v.tolist())) == markers[k.rsplit(".", 1)[0]]  # how ComfyUI reads it
    assert set(k for k in t if k.startswith("q8.")) == {"q8.weight", "q8.weight_scale", "q8.bias", "q8.comfy_quant"}
    assert set(k for k in t if k.startswith("q4.")) == {"q4.weight", "q4.weight_scale", "q4.weight_zeros", "q4.bias",
                                                         "q4.comfy_quant"}
    # what the format cannot express is a float weight in the float layer's shape, fp16
    assert t["conv.weight"].dtype == torch.float16 and tuple(t["conv.weight"].shape) == (64, 4, 3, 3)
    for name, shape in {"static8": (64, 128), "w2": (64, 64), "w8only": (64, 64), "odd": (64, 96), "keep": (32, 64)}.items():
        assert t[f"{name}.weight"].dtype == torch.float16 and tuple(t[f"{name}.weight"].shape) == shape
        assert f"{name}.weight_scale" not in t and f"{name}.comfy_quant" not in t
    assert t["norm.weight"].dtype == torch.float16
    assert set(exp.float_layers) == {"conv", "static8", "w2", "w8only", "odd"}
    assert "conv2d" in exp.float_layers["conv"] and "static" in exp.float_layers["static8"]
    assert not any(k.startswith("conv.") and k.endswith("comfy_quant") for k in t)
    # float-kept quantized layers carry our dequantized weight
    assert torch.allclose(t["w2.weight"].float(), qm.w2.dequantized_weight(), atol=1e-3)
    s = exp.summary()
    assert s["native_layers"] == 2 and s["native_formats"] == {"int8_tensorwise": 1, "awq_w4a16": 1}
    assert 0 < s["native_bytes"] < s["total_bytes"]


def test_exported_model_runs_under_comfy_kitchen_like_ours():
    """Rebuild the whole tiny model from the exported state dict the way ComfyUI does (marked Linear layers get
    comfy-kitchen weights, everything else loads as float) and compare with our quantized model."""
    _ck()
    base, qm = _quantized_tiny()
    exp = export_native(*split_model(qm))
    t = {k: v for k, v in exp.tensors.items()}
    rebuilt = Tiny().eval()
    for name, mod in rebuilt.named_modules():
        if f"{name}.comfy_quant" in t:
            conf = read_marker(t.pop(f"{name}.comfy_quant"))
            parts = {k.split(".", 1)[1]: t.pop(k) for k in list(t) if k.startswith(name + ".") and k != f"{name}.bias"}
            mod.weight = nn.Parameter(_ck_weight(parts, conf, mod.out_features, mod.in_features, torch.float32),
                                      requires_grad=False)
    rebuilt.load_state_dict({k: v.float() for k, v in t.items()}, strict=False)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y_ck = rebuilt(x)
        # ours with the exported (float-kept) layers' activations in float, as the native file runs them
        ref = Tiny().eval()
        ref.load_state_dict(base.state_dict())
        plan = {"q8": W8A8D, "q4": W4G64}
        qref, _ = quantize_model(ref, plan)
        for name in ("conv", "static8", "w2", "w8only", "odd", "keep"):
            getattr(qref, name).weight.data = exp.tensors[f"{name}.weight"].float()
            getattr(qref, name).bias.data = exp.tensors[f"{name}.bias"].float()
        qref.q8.bias.data = exp.tensors["q8.bias"].float()
        qref.q4.bias.data = exp.tensors["q4.bias"].float()
        qref.norm.load_state_dict({"weight": exp.tensors["norm.weight"].float(), "bias": exp.tensors["norm.bias"].float()})
        with dispatch.use_backend("reference"):
            y = qref(x)
    assert torch.allclose(y_ck, y, rtol=1e-3, atol=1e-3)


def test_sd15_name_map():
    cfg = {"in_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
           "cross_attention_dim": 768,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert sd_family(cfg) == "SD1.x"
    r = diffusers_to_ldm(cfg)
    expect = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "output_blocks.3.1.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    assert {k: r(k) for k in expect} == expect
    assert sd_family({**cfg, "block_out_channels": [32, 64]}) is None  # e.g. the embedded digits model


def test_cli_export(tmp_path, capsys):
    from mixquant.app.cli import main

    base, qm = _quantized_tiny()
    src = tmp_path / "q.safetensors"
    save_quantized(qm, str(src), architecture={"library": "test", "class": "Tiny"}, base_fingerprint=fingerprint(base))
    out = tmp_path / "native.safetensors"
    assert main(["export", str(src), "--to", "comfyui", "--out", str(out), "--list"]) == 0
    text = capsys.readouterr().out
    assert "2 layers in native form" in text and "diffusers names kept" in text and "float  conv" in text
    from safetensors.torch import load_file

    t = load_file(str(out))
    assert read_marker(t["q8.comfy_quant"]) == {"format": "int8_tensorwise"}
    assert t["q4.weight_zeros"].shape == (2, 128)
    direct = export_native(*split_model(qm)).tensors
    assert set(t) == set(direct)
    for k in direct:
        assert torch.equal(t[k], direct[k]), k
    # a bad input file: one clear line, exit code 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    assert main(["export", str(bad), "--to", "comfyui", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "mixquant: error:" in capsys.readouterr().err


def _dense(t: dict, name: str) -> torch.Tensor:
    """An exported layer's weight as float, decoded the way ComfyUI's loader does (comfy-kitchen; fp8: codes x
    scale)."""
    conf = read_marker(t[f"{name}.comfy_quant"]) if f"{name}.comfy_quant" in t else None
    if conf is None:
        return t[f"{name}.weight"].float()
    if conf["format"] == "float8_e4m3fn":
        return t[f"{name}.weight"].float() * t[f"{name}.weight_scale"]
    parts = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".") and k[len(name) + 1:] in
             ("weight", "weight_scale", "weight_zeros")}
    n = parts["weight"].shape[0]
    k = parts["weight"].shape[1] * (2 if conf["format"] == "awq_w4a16" else 1)
    return _ck_weight(parts, conf, n, k, torch.float32).dequantize().float()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_export_under_original_names(family):
    """A diffusers Flux / SD3 transformer quantized with a mixed plan exports under the original (ComfyUI) names:
    fused layers stack their parts (row-wise formats exactly, differing parts requantized to the most precise one),
    and decoding the file and splitting it back gives our dequantized weights."""
    _ck()
    from mixquant.app.diffusers_host.random_models import random_denoiser
    from mixquant.quant.dit_names import from_original, layout_for, to_original
    from mixquant.quant.formats import as_format

    model = random_denoiser(family, "small", seed=3)
    lay = layout_for(type(model).__name__, dict(model.config))
    d = "transformer_blocks.0.attn."
    plan = {d + "to_q": W8A8D, d + "to_k": W4G64, d + "to_v": W8A8D,  # int8 + W4: W4 part requantized to int8
            d + "add_q_proj": W8A8D, d + "add_k_proj": W8A8D, d + "add_v_proj": W8A8D,  # stacked exactly
            "transformer_blocks.1.attn.to_q": as_format("W8A16-fp8"), "transformer_blocks.1.attn.to_k": W4G64,
            "transformer_blocks.1.attn.to_v": W4G64,  # fp8 + W4: requantized as one fp8 tensor
            "norm_out.linear": W8A8D, "transformer_blocks.0.ff.net.0.proj": W4G64}  # a swapped and a plain layer
    if family == "flux":
        s = "single_transformer_blocks.0."
        plan.update({s + "attn.to_q": W4G64, s + "attn.to_k": W4G64, s + "attn.to_v": W4G64, s + "proj_mlp": W4G64})
        s = "single_transformer_blocks.1."  # quantized parts beside a float one: the stacked layer stays float
        plan.update({s + "attn.to_q": W8A8D, s + "attn.to_k": W8A8D, s + "attn.to_v": W8A8D})
    qm, _ = quantize_model(model, plan)
    exp = export_native(*split_model(qm), layout=lay, naming="original")
    t = exp.tensors
    # the key set is exactly the original layout's (plus each native layer's scales and marker)
    float_orig = to_original(model.state_dict(), lay)
    extra = ("comfy_quant", "weight_scale", "weight_zeros", "input_scale")
    assert {k for k in t if not k.endswith(extra)} == set(float_orig)
    qkv = "double_blocks.0.img_attn.qkv" if family == "flux" else "joint_blocks.0.x_block.attn.qkv"
    ctx = "double_blocks.0.txt_attn.qkv" if family == "flux" else "joint_blocks.0.context_block.attn.qkv"
    fp8qkv = "double_blocks.1.img_attn.qkv" if family == "flux" else "joint_blocks.1.x_block.attn.qkv"
    assert exp.native_layers[qkv] == exp.native_layers[ctx] == "int8_tensorwise"
    assert exp.native_layers[fp8qkv] == "float8_e4m3fn"
    assert exp.native_layers["final_layer.adaLN_modulation.1"] == "int8_tensorwise"
    assert "requantized to int8_tensorwise" in exp.requantized[qkv] and ctx not in exp.requantized
    if family == "flux":
        assert exp.native_layers["single_blocks.0.linear1"] == "awq_w4a16"
        assert "single_blocks.1.linear1" in exp.float_layers
    # decode every layer the way ComfyUI does and split it back into diffusers' layers
    modules = {e.module for e in lay.entries}
    decoded = {}
    for m in modules:
        if f"{m}.weight" in t:
            decoded[f"{m}.weight"] = _dense(t, m)
        for a in ("bias", "scale", "pos_embed"):
            key = f"{m}.{a}" if m else a
            if key in t:
                decoded[key] = t[key].float()
    back = from_original(decoded, lay)
    ours = {n: m.unbalanced_weight() for n, m in qm.named_modules() if hasattr(m, "unbalanced_weight")}
    for name, w in ours.items():
        got = back[name + ".weight"].reshape(w.shape)
        err = (got - w).abs().max() / w.abs().max()
        requant = name in (d + "to_k",) or name.startswith("transformer_blocks.1.attn.")
        assert err < (0.07 if name.startswith("transformer_blocks.1.attn.") else 5e-3 if requant else 1e-3), name
    # stacked exactly: the int8 rows of to_q are ours, code for code
    codes = t[qkv + ".weight"]
    w = model.config.num_attention_heads * model.config.attention_head_dim
    q_codes, q_scale, _ = qm.get_submodule(d + "to_q").packed_parts()
    assert torch.equal(codes[:w], q_codes) and torch.equal(t[qkv + ".weight_scale"][:w].half(), q_scale.reshape(-1, 1))
