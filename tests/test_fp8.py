"""float8 e4m3 formats (#22 item 2): numerics against a plain-torch reference, storage, every backend's choice, the
GPU route's logic with stubbed devices, the file, ComfyUI's native float8_e4m3fn export and the menu."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixquant.kernels import cpu_routes, dispatch, fp8, gpu_routes
from mixquant.kernels.packing import row_layout
from mixquant.kernels.synthetic import random_call
from mixquant.quant import engine
from mixquant.quant.apply import ActRange, quantize_model
from mixquant.quant.errors import MixQuantError
from mixquant.quant.formats import LayerFormat, as_format
from mixquant.quant.layers import QuantLinear
from mixquant.quant.native import native_format, native_layer_tensors
from mixquant.quant.roles import LayerInfo

E4M3 = torch.float8_e4m3fn
# every finite positive e4m3 value: 2^-9 .. 448 (subnormals m * 2^-9; normals (1 + m/8) * 2^(e-7))
GRID = torch.tensor(sorted({m * 2.0 ** -9 for m in range(1, 8)} | {(1 + m / 8) * 2.0 ** (e - 7)
                                                                  for e in range(1, 16) for m in range(8)
                                                                  if (1 + m / 8) * 2.0 ** (e - 7) <= 448}))


def _nearest_distance(v: torch.Tensor) -> torch.Tensor:
    """|v - the nearest e4m3 value| (v clamped to +-448), by search over the grid of every e4m3 value."""
    grid = torch.cat([-GRID.flip(0), torch.zeros(1), GRID]).double()
    a = v.double().clamp(-448, 448)
    idx = torch.searchsorted(grid, a).clamp(1, len(grid) - 1)
    return torch.minimum((a - grid[idx - 1]).abs(), (grid[idx] - a).abs())


def _is_nearest(got: torch.Tensor, v: torch.Tensor) -> bool:
    """got is an e4m3 value (finite) as near to v as any (ties either way)."""
    a = v.double().clamp(-448, 448)
    on_grid = torch.isin(got.double().abs(), torch.cat([torch.zeros(1), GRID]).double())
    return bool(on_grid.all() and torch.isclose((got.double() - a).abs(), _nearest_distance(v), rtol=1e-9,
                                                atol=1e-12).all())


def test_e4m3_cast_is_round_to_nearest_on_the_grid():
    torch.manual_seed(0)
    v = torch.cat([torch.randn(4000) * 30, torch.rand(200) * 0.01, torch.tensor([448.0, 500.0, -1e6, 0.0])])
    got = fp8.to_e4m3(v).float()
    assert torch.isfinite(got).all() and got[-3:-1].tolist() == [448.0, -448.0]  # clamped: never NaN
    assert _is_nearest(got, v)


def test_format_names_sizes_and_checks():
    for name in ("W8A8d-fp8", "W8A8-fp8", "W8A16-fp8", "W16A8d-fp8"):
        f = as_format(name)
        back = LayerFormat.from_dict(f.to_dict())
        assert f.fp8 and f.name == name and back.name == name and back.fp8 and (back.symmetric or f.w_bits == 16)
    assert "fp8" not in LayerFormat(8, 8).to_dict()  # int formats' entries read as before
    assert as_format("W8A8d-fp8").w_fp8 and as_format("W8A8d-fp8").a_fp8
    assert as_format("W8A16-fp8").w_fp8 and not as_format("W8A16-fp8").a_fp8
    for bad in (dict(w_bits=4, a_bits=16, group_size=64), dict(w_bits=16, a_bits=16), dict(w_bits=8, a_bits=4)):
        with pytest.raises(ValueError, match="fp8"):
            LayerFormat(**bad, fp8=True)
    lin = nn.Linear(200, 48)
    q = QuantLinear.from_float(lin, as_format("W8A16-fp8"))
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == q.fmt.weight_bytes(48, 200) \
        == 48 * row_layout(200, 8, 1, False)["row_bytes"]  # real bytes: one e4m3 byte per weight + an fp16 scale
    codes, scale, zero = q.packed_parts()
    assert codes.dtype == E4M3 and scale.shape == (48, 1) and zero is None


def test_weight_codes_and_scales():
    torch.manual_seed(1)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]
    codes, scale = fp8.quantize_weight(w)
    s = (w.abs().amax(1, keepdim=True) / 448).to(torch.float16).float()
    assert torch.equal(scale.float(), s)
    assert _is_nearest(codes.float(), w / s)
    assert codes.float().abs().amax(1).le(448).all() and codes.float().abs().amax(1).ge(400).all()  # full range used
    rel = ((codes.float() * s - w).norm() / w.norm()).item()
    assert rel < 0.04  # e4m3 keeps ~4 significant bits per weight: a few percent, whatever the row's magnitude


@pytest.mark.parametrize("mode", ["fp8_dynamic", "fp8_static"])
def test_activation_fake_quant_matches_the_definition(mode):
    torch.manual_seed(2)
    x = torch.randn(3, 17, 64) * torch.linspace(0.1, 20, 64)
    s_static = torch.tensor(15.0 / 448)
    q, s = fp8.quantize_act(x, mode, s_static)
    want_s = x.abs().amax(-1, keepdim=True) / 448 if mode == "fp8_dynamic" else s_static
    assert torch.equal(s, want_s) and q.dtype == E4M3
    assert _is_nearest(q.float(), x / s)
    got = fp8.fake_quant_act(x, mode, s_static)
    assert torch.equal(got, q.float() * s)
    # the reference and the CPU backend's in-place path take the same modes
    from mixquant.kernels import cpu_ops, reference
    a = reference.fake_quant_act(x, 8, mode, s_static)
    b = cpu_ops.fake_quant(x, 8, mode, s_static, None, None, -1, (-1,))
    assert torch.equal(a, got) and torch.equal(b, got)


@pytest.mark.parametrize("name", ["W8A8d-fp8", "W8A8-fp8", "W8A16-fp8"])
def test_layer_packed_simulate_and_reference_agree(name):
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    x = torch.randn(2, 9, 128) * 2
    fmt = as_format(name)
    packed = QuantLinear.from_float(lin, fmt)
    sim = QuantLinear.from_float(lin, fmt, mode="simulate")
    if fmt.a_bits < 16 and fmt.a_mode == "static":
        for q in (packed, sim):
            q.set_act_range(x.min(), x.max())
        assert torch.equal(packed.input_zero, torch.zeros_like(packed.input_zero))
        assert torch.allclose(packed.input_scale, torch.maximum(-x.min(), x.max()) / 448)
    with dispatch.use_backend("reference"):
        y, ys = packed(x), sim(x)
    assert torch.equal(y, ys)
    # the reference by hand: dequantized e4m3 weight, e4m3 activations
    codes, scale, _ = packed.packed_parts()
    w = codes.float() * scale.float()
    xs = x if fmt.a_bits == 16 else fp8.fake_quant_act(
        x, "fp8_dynamic" if fmt.a_mode == "dynamic" else "fp8_static", packed.input_scale)
    assert torch.allclose(y, F.linear(xs, w, lin.bias), atol=1e-5)
    # the CPU backend (float route, in the CPU's fastest float dtype) is close to it
    y_cpu = packed(x)
    assert dispatch.path("linear", x, **packed._kernel_args(packed.weight, packed.bias, x.device)) == "cpu:float"
    assert (y_cpu - y).norm() / y.norm() < 1e-2
    # and the quantization costs what e4m3 costs: 25-40 dB, below int8's per-channel W8A8
    sqnr = 10 * torch.log10(lin(x).pow(2).sum() / (y - lin(x)).pow(2).sum())
    assert 20 < sqnr < 45


def test_routes_that_cannot_run_fp8_refuse_it():
    call = random_call(64, 640, bits=8, a_mode="fp8_dynamic", fp8=True)  # (rows >= 512 bytes: 16-byte aligned)
    x = torch.randn(4, 640)
    assert call["qweight"].dtype == E4M3
    for route in ("onednn", "onednn_split", "int_mm"):
        assert "float8" in cpu_routes.int_route_accepts("linear", route, cache={}, **call)
    wo = random_call(64, 128, bits=8, a_mode="none", fp8=True)
    assert "float8" in cpu_routes.int_route_accepts("linear", "int_mm", cache={}, **wo)
    assert dispatch.TRITON_CONSTRAINTS["linear"].check({"x": x, **wo}) is not None  # int8 kernels: not fp8 codes
    with dispatch.use_backend("reference"):
        ref = dispatch.linear(x, **call)
    assert torch.allclose(dispatch.linear(x, cache={}, **call), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_scaled_mm_route_matches_the_reference():
    """The GPU route's own math (torch._scaled_mm with row-wise scales), run here on the CPU's _scaled_mm."""
    for mode in ("fp8_dynamic", "fp8_static"):
        call = random_call(48, 96, bits=8, a_mode=mode, fp8=True, seed=5)
        x = torch.randn(2, 7, 96)
        try:
            y = fp8.linear_scaled_mm(x, **call)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"this torch has no CPU _scaled_mm: {e}")
        with dispatch.use_backend("reference"):
            ref = dispatch.linear(x, **call)
        assert y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_gpu_route_race_offers_scaled_mm_only_where_fp8_runs(monkeypatch):
    call = random_call(64, 640, bits=8, a_mode="fp8_dynamic", fp8=True)  # (rows >= 512 bytes: 16-byte aligned)
    x = torch.randn(4, 640)
    assert "scaled_mm" not in gpu_routes.candidates("linear", x, cache={}, **call)  # no fp8 tensor cores here
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    assert gpu_routes.candidates("linear", x, cache={}, **call)[-2:] == ["scaled_mm", "float"]
    for not_it in (random_call(64, 128, bits=8, a_mode="dynamic"),  # int8 codes
                   random_call(64, 128, bits=8, a_mode="none", fp8=True),  # weight-only: the float floor
                   random_call(64, 120, bits=8, a_mode="fp8_dynamic", fp8=True),  # K not a multiple of 16
                   random_call(64, 128, bits=8, a_mode="fp8_dynamic", fp8=True)):  # 130-byte rows: cuBLASLt's fp8
        # GEMM wants leading dimensions of a multiple of 16 bytes
        assert "scaled_mm" not in gpu_routes.candidates("linear", torch.randn(4, not_it["k"]), cache={}, **not_it)
    monkeypatch.setattr(gpu_routes, "_save", lambda *a: None)
    gpu_routes.plan(refresh=True)
    got = gpu_routes.decide("linear", x, {}, call, measure=lambda fns: {r: (0.5 if r == "scaled_mm" else 1.0)
                                                                         for r in fns})
    assert got == "scaled_mm"
    gpu_routes.plan(refresh=True)


def test_file_round_trip_and_a_nan_code_is_refused(small_unet, unet_inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    from mixquant.app.diffusers_host.files import load_denoiser, save_denoiser
    from mixquant.quant.calibration import collect_act_ranges
    from mixquant.quant.fileformat import fingerprint, sign, tensor_digests, read_header, META_KEY
    from mixquant.quant.roles import discover_layers

    def run(m):
        x, t, ctx = unet_inputs
        with torch.no_grad():
            return m(x, t, ctx).sample

    layers = discover_layers(small_unet)
    fmts = [as_format("W8A8d-fp8"), as_format("W8A8-fp8"), as_format("W8A16-fp8")]
    lin = [li for li in layers if li.kind == "linear" and not li.protected]
    plan = {li.name: fmts[i % 3] for i, li in enumerate(lin)}
    ranges = collect_act_ranges(small_unet, lambda: run(small_unet))
    q, stats = quantize_model(small_unet, plan, ranges)
    assert stats.bytes_after < 0.55 * stats.bytes_before  # fp32 -> one byte per weight (+ scales)
    path = str(tmp_path / "q.safetensors")
    save_denoiser(q, path, fingerprint(small_unet))
    assert torch.equal(run(load_denoiser(path, base=small_unet)), run(q))
    assert {e["format"].get("fp8") for e in read_header(path)["layers"].values()} == {True}
    # a float8 NaN code (0x7f) in a re-signed file: one clear error
    import json
    from safetensors import safe_open
    t = load_file(path)
    name = next(k for k, v in t.items() if v.dtype == E4M3)
    t[name] = t[name].clone()
    t[name].view(torch.uint8)[0, 0] = 0x7F
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    bad = str(tmp_path / "bad.safetensors")
    save_file(t, bad, {META_KEY: json.dumps(sign(meta, tensor_digests(t)))})
    with pytest.raises(MixQuantError, match="NaN float8"):
        load_denoiser(bad, base=small_unet)


def _ck_fp8(t, n, k):
    pytest.importorskip("packaging")
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.fp8 import TensorCoreFP8Layout
    p = TensorCoreFP8Layout.Params(scale=t["weight_scale"], orig_dtype=torch.float32, orig_shape=(n, k))
    return QuantizedTensor(t["weight"], "TensorCoreFP8Layout", p)


@pytest.mark.parametrize("name", ["W8A8-fp8", "W8A8d-fp8", "W8A16-fp8"])
def test_native_float8_export_loads_as_comfy_kitchen_reads_it(name):
    torch.manual_seed(4)
    n, k = 96, 256
    lin = nn.Linear(k, n)
    x = torch.randn(2, 33, k) * 3
    q = quantize_model(lin_holder := nn.Sequential(lin), {"0": as_format(name)},
                       {"0": ActRange(torch.tensor([[float(x.min())], [float(x.min()) * 2]]),
                                      torch.tensor([[float(x.max())], [float(x.max()) * 0.5]]))})[0][0]
    assert lin_holder[0] is lin
    fmt, why = native_format(q)
    assert fmt == "float8_e4m3fn", why
    t, conf, _ = native_layer_tensors(q)
    assert t["weight"].dtype == E4M3 and tuple(t["weight"].shape) == (n, k)
    assert t["weight_scale"].dtype == torch.float32 and t["weight_scale"].dim() == 0
    static = name == "W8A8-fp8"
    assert ("input_scale" in t) == static and conf.get("full_precision_matrix_mult", False) == (not static)
    if static:  # the widest of the timestep groups' ranges
        assert torch.isclose(t["input_scale"], torch.tensor(max(-2 * float(x.min()), float(x.max())) / 448))
    wq = _ck_fp8(t, n, k)
    w_ck = wq.dequantize()
    with dispatch.use_backend("reference"):
        y = q(x)
    w_ours = q.dequantized_weight()
    # per-tensor requantization of our per-channel codes: a second e4m3 rounding, a few percent at most
    assert ((w_ck - w_ours).norm() / w_ours.norm()) < 0.05
    y_ck = F.linear(x, w_ck, q.bias)
    assert ((y_ck - y).norm() / y.norm()) < 0.08


def test_menu_offers_fp8_to_linear_layers_where_asked():
    lin = LayerInfo("a.to_q", "linear", "quality", 64, 64, 4096, False)
    conv = LayerInfo("a.conv", "conv2d", "quality", 64 * 9, 64, 64 * 64 * 9, False)
    on = engine.QuantizeConfig(avg_w_bits=6, fp8="on")
    names = [f.name for f in engine.menu(lin, on, "dynamic")]
    assert "W8A8d-fp8" in names and "W8A16-fp8" in names
    assert not any(f.fp8 for f in engine.menu(conv, on, "static"))
    assert not any(f.fp8 for f in engine.menu(lin, engine.QuantizeConfig(avg_w_bits=6, fp8="off"), "dynamic"))
    # auto: only where the GPU has fp8 tensor cores (none here)
    assert not any(f.fp8 for f in engine.menu(lin, engine.QuantizeConfig(avg_w_bits=6), "dynamic")) \
        or fp8.scaled_mm_supported("cuda")
    assert not any(f.fp8 for f in engine.menu(lin, engine.QuantizeConfig(avg_w_bits=6, fp8="on",
                                                                           target="comfyui-native"), "dynamic"))
    w_menu, a_menu, _ = engine.menus(on, [lin, conv])
    assert any(f.fp8 for f in w_menu["quality"]) and [f.name for f in a_menu if f.fp8] == ["W16A8d-fp8"] or \
        [f.name for f in a_menu if f.fp8] == ["W16A8-fp8"]
    assert engine.joint_loss(type("S", (), {"loss": {"a.to_q": {"W8A16-fp8": 1.0, "W16A8d-fp8": 2.0}}})(),
                             "a.to_q", as_format("W8A8d-fp8")) == 3.0
    with pytest.raises(MixQuantError, match="fp8"):
        engine.QuantizeConfig(avg_w_bits=6, fp8="maybe").check()


def test_sensitivity_measures_fp8_like_any_format_and_the_plan_gets_it_as_options(tmp_path):
    """digits, fp8 on: every non-protected Linear layer gets a measured loss for e4m3 weights and activations (none
    for convs); e4m3 weights (3 mantissa bits) cost more than int8 per-channel ones on most layers; a plan whose only
    8-bit activations are e4m3 is quantized, saved and reloaded."""
    from mixquant.app.diffusers_host.api import quantize_pipeline
    from mixquant.app.diffusers_host.models import load_pipeline
    from mixquant.app.diffusers_host.runner import PipelineRunner, SamplerSettings

    pipe = load_pipeline("digits")
    runner = PipelineRunner(pipe, SamplerSettings(steps=2))
    cfg = engine.QuantizeConfig(avg_w_bits=9, fp8="on", a_mode="dynamic", speed="off", cache_dir=str(tmp_path))
    prep = engine.prepare(runner, ["digit one", "the number 2"], cfg)
    lin = [li for li in prep.layers if li.kind == "linear" and not li.protected]
    conv = [li for li in prep.layers if li.kind == "conv2d" and not li.protected]
    loss = prep.sens.loss
    assert lin and conv
    assert all({"W8A16-fp8", "W16A8d-fp8"} <= set(loss[li.name]) for li in lin)
    assert not any(k.endswith("-fp8") for li in conv for k in loss.get(li.name, {}))
    worse = sum(loss[li.name]["W8A16-fp8"] > loss[li.name]["W8A16"] for li in lin)
    assert worse >= 0.8 * len(lin)
    # the integer program sees them as options of the Linear layers, at int8's bytes
    prob = prep.problem(cfg)
    for li, opts in zip(prob.layers, prob.options):
        f8 = [f for f in opts if f.fp8]
        assert bool(f8) == (li.kind == "linear" and not li.protected)
        assert all(f.weight_bytes(li.out_features, li.in_features) ==
                   LayerFormat(8, 16).weight_bytes(li.out_features, li.in_features) for f in f8)
