"""CPU paths (kernels/cpu_ops.py, cpu_routes.py) and the dispatcher against the reference, on odd shapes."""
import pytest
import torch

from mixquant.kernels import cache as kernel_cache
from mixquant.kernels import cpu_ops, cpu_routes, dispatch, reference
from mixquant.kernels.synthetic import conv_geometry, random_call

# (bits, group_size, a_mode, a_split): W8A8 static/dynamic, the skip-concat split, W4A8 per channel and grouped,
# W2A8, weight-only
FORMATS = [(8, None, "static", None), (8, None, "dynamic", None), (8, None, "static", 40), (4, None, "static", None),
           (4, 32, "dynamic", None), (2, None, "dynamic", None), (4, 32, "none", None), (2, 64, "none", None)]
INT_ROUTES = [r for r in ("onednn_split", "onednn_sparse", "int_mm") if r == "int_mm" or cpu_routes._has_onednn()]


@pytest.fixture(autouse=True)
def _no_route_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQUANT_CPU_CACHE", str(tmp_path / "routes.json"))


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _ref(op, x, call, geo=None):
    with dispatch.use_backend("reference"):
        return dispatch.linear(x, **call) if op == "linear" else dispatch.conv2d(x, **call, **geo)


@pytest.mark.parametrize("bits,group,a_mode,split", FORMATS)
def test_dequantize_equals_reference(bits, group, a_mode, split):
    call = random_call(37, 100, bits=bits, group_size=group, symmetric=False if bits < 8 else None)
    ref = reference.dequantize_weight(call["qweight"], call["scale"], call["zero"], bits, 100, group)
    assert torch.equal(cpu_ops.dequantize(call["qweight"], call["scale"], call["zero"], bits, 100, group), ref)


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32), (8, None)])
def test_compiled_dequantize_equals_reference(bits, group, monkeypatch):
    """Large weights dequantize through one compiled loop: the same values bit for bit, in fp32 and bf16; a shape that
    cannot compile runs eager with one warning. (Compiling takes seconds: the threshold is lowered to a small
    weight here.)"""
    monkeypatch.setattr(cpu_ops, "COMPILE_MIN", 64 * 96)
    monkeypatch.setattr(cpu_ops, "_COMPILED", {})
    monkeypatch.setattr(cpu_ops, "_BROKEN", [])
    call = random_call(64, 100 if group else 96, bits=bits, group_size=group, symmetric=False if bits < 8 else None)
    k = call["k"]
    ref = reference.dequantize_weight(call["qweight"], call["scale"], call["zero"], bits, k, group)
    for dtype in (torch.float32, torch.bfloat16):
        got = cpu_ops.dequantize(call["qweight"], call["scale"], call["zero"], bits, k, group, dtype)
        assert torch.equal(got, ref.to(dtype))
    assert len(cpu_ops._COMPILED) == 2 and all(f is not None for f in cpu_ops._COMPILED.values())
    with monkeypatch.context() as m:  # a compile failure: eager, one warning, and no compile attempt after it
        m.setattr(cpu_ops, "_COMPILED", {})
        m.setattr(cpu_ops, "_BROKEN", [])
        m.setattr(cpu_ops.torch, "compile", lambda fn, **kw: (lambda *a: (_ for _ in ()).throw(OSError("no cc"))))
        with pytest.warns(UserWarning, match="compiling the CPU dequantization failed"):
            got = cpu_ops.dequantize(call["qweight"], call["scale"], call["zero"], bits, k, group)
        assert torch.equal(got, ref) and list(cpu_ops._COMPILED.values()) == [None]
        assert not cpu_ops._compile_wanted(call["qweight"], 64, k)
    monkeypatch.setenv("MIXQUANT_CPU_COMPILE", "0")
    assert not cpu_ops._compile_wanted(call["qweight"], 64, k)


@pytest.mark.parametrize("a_mode,split", [("static", None), ("static", 3), ("dynamic", None)])
def test_fake_quant_equals_reference(a_mode, split):
    x = torch.randn(2, 7, 5, 3) * 3
    call = random_call(4, 7, a_mode=a_mode, a_split=split)
    args = (call["a_bits"], a_mode, call["a_scale"], call["a_zero"], split)
    for dim, dyn in ((1, (1, 2, 3)), (-1, (-1,))):
        if split is not None and dim == -1:
            continue
        ref = reference.fake_quant_act(x, *args, channel_dim=dim, dynamic_dims=dyn)
        assert torch.equal(cpu_ops.fake_quant(x, *args, channel_dim=dim, dynamic_dims=dyn), ref)


@pytest.mark.parametrize("route", ["float"] + INT_ROUTES)
@pytest.mark.parametrize("bits,group,a_mode,split", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_routes_match_reference(route, bits, group, a_mode, split, bias):
    call = random_call(45, 100, bits=bits, group_size=group, a_mode=a_mode, a_split=split, bias=bias, seed=1)
    x = torch.randn(3, 13, 100)
    if route != "float" and cpu_routes.int_route_accepts("linear", route, cache={}, **call) is not None:
        pytest.skip("route does not take this format")
    out = cpu_routes.linear(x, route=route, cache={}, **call)
    assert out.shape == (3, 13, 45)
    assert _rel(out, _ref("linear", x, call)) < 1e-5


@pytest.mark.parametrize("route", ["float"] + [r for r in INT_ROUTES if r != "int_mm"])
@pytest.mark.parametrize("bits,group,a_mode,split", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_routes_match_reference(route, bits, group, a_mode, split, stride):
    cin = 13
    call = random_call(21, 9 * cin, bits=bits, group_size=group, a_mode=a_mode,
                       a_split=5 if split else None, bias=stride == 1, seed=2)
    if route != "float" and cpu_routes.int_route_accepts("conv2d", route, cache={}, **call) is not None:
        pytest.skip("route does not take this format")
    geo = conv_geometry(3, stride, 1)
    x = torch.randn(2, cin, 9, 7) * 2
    out = cpu_routes.conv2d(x, route=route, cache={}, **call, **geo)
    ref = _ref("conv2d", x, call, geo)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_reduced_precision_float_route_is_close_to_the_reference(dtype, tol):
    """What the CPU plan may pick as the float dtype where it is the fastest: the float route in it stays within
    that dtype's rounding of the reference (and is not bit-equal: the dtype is really used)."""
    for op in ("linear", "conv2d"):
        call = random_call(21, 99, bits=4, group_size=32, a_mode="static", seed=3)
        x, geo = (torch.randn(5, 99), {}) if op == "linear" else (torch.randn(2, 11, 6, 5), conv_geometry(3, 1, 1))
        fn = cpu_routes.linear if op == "linear" else cpu_routes.conv2d
        out = fn(x, route="float", cache={}, dtype=dtype, **call, **geo)
        ref = _ref(op, x, call, geo or None)
        assert out.dtype == x.dtype and 0 < _rel(out, ref) < tol, (op, _rel(out, ref))


def test_float_route_is_the_reference_bit_for_bit():
    for op in ("linear", "conv2d"):
        call = random_call(21, 99, bits=4, group_size=32, a_mode="static")
        x, geo = (torch.randn(5, 99), {}) if op == "linear" else (torch.randn(2, 11, 6, 5), conv_geometry(3, 1, 1))
        fn = cpu_routes.linear if op == "linear" else cpu_routes.conv2d
        assert torch.equal(fn(x, route="float", dtype=torch.float32, **call, **geo), _ref(op, x, call, geo))


@pytest.mark.skipif(not cpu_routes._has_onednn(), reason="no oneDNN int8 ops in this torch")
def test_onednn_saturation_is_detected():
    """Full-range u8 activations: the split route is exact everywhere; the single call only where the probe says so
    (VNNI/AMX). Without VNNI a single call saturates in int16 and is never chosen."""
    call = random_call(32, 256, a_mode="static")
    call["a_zero"] = torch.tensor([0.0])  # codes up to 255 on positive inputs
    x = torch.rand(16, 256) * 4
    ref = _ref("linear", x, call)
    assert _rel(cpu_routes.linear(x, route="onednn_split", cache={}, **call), ref) < 1e-5
    single_ok = _rel(cpu_routes.linear(x, route="onednn", cache={}, **call), ref) < 1e-5
    assert single_ok == cpu_ops.onednn_single_call_exact()
    if not single_ok:
        assert "onednn" not in cpu_routes.plan().int_routes["linear"]


@pytest.mark.parametrize("route", INT_ROUTES)
def test_cache_follows_in_place_weight_updates(route):
    """A LoRA patch copies a new blob into the weight in place: the prepacked copy must not go stale."""
    call = random_call(24, 64, a_mode="dynamic")
    x = torch.randn(9, 64)
    cache = {}
    first = cpu_routes.linear(x, route=route, cache=cache, **call)
    assert cache and kernel_cache.cache_bytes(cache) >= 24 * 64
    call["qweight"].mul_(-1)  # in place, through the view: same data pointer, new version
    second = cpu_routes.linear(x, route=route, cache=cache, **call)
    assert _rel(second, _ref("linear", x, call)) < 1e-5
    assert not torch.allclose(first, second)


def test_no_cache_means_no_int8_route():
    call = random_call(24, 64, a_mode="static")
    assert cpu_routes.candidates("linear", cache=None, **call) == ["float"]
    assert "no cache" in cpu_routes.int_route_accepts("linear", "onednn_split", cache=None, **call)


def test_per_shape_race_records_a_winner_and_frees_the_loser():
    if len(cpu_routes.candidates("linear", cache={}, **random_call(8, 32, a_mode="static"))) < 2:
        pytest.skip("a single candidate here")
    call = random_call(48, 96, a_mode="static", seed=5)
    x = torch.randn(33, 96)
    cache = {}
    key = cpu_routes.shape_key("linear", x, call)
    cpu_routes.plan().decisions.pop(key, None)
    assert cpu_routes.choose("linear", x=x, cache=cache, **call) == "measure"
    out = cpu_routes.linear(x, cache=cache, **call)
    won = cpu_routes.plan().decisions[key]
    assert cpu_routes.choose("linear", x=x, cache=cache, **call) == won
    assert _rel(out, _ref("linear", x, call)) < 1e-5
    if won == "float":
        assert not [k for k in cache if k.startswith("cpu_")]  # the int8 prepack of the loser is gone


def test_dispatch_paths_and_forcing(monkeypatch):
    call = random_call(16, 40, bits=4, group_size=32, a_mode="none")
    x = torch.randn(3, 40)
    assert dispatch.path("linear", x, **call) == "cpu:float"
    with dispatch.use_backend("reference"):
        assert dispatch.path("linear", x, **call) == "reference"
    monkeypatch.setenv("MIXQUANT_KERNELS", "reference")
    assert dispatch.path("linear", x, **call) == "reference"
    monkeypatch.delenv("MIXQUANT_KERNELS")
    assert dispatch.path("linear", x.to(torch.int32), **call) == "reference"  # nobody takes int inputs
    text = dispatch.describe("cpu")
    assert "cpu" in text and "W8A8 static" in text and "float dtype" in text


def test_quantized_layers_agree_on_every_cpu_path():
    """QuantLinear / QuantConv2d (quant/layers.py) through the dispatcher: reference, the CPU float route and the
    CPU int8 route (with the cache dict a layer owns) give the same output."""
    from mixquant.quant.formats import as_format
    from mixquant.quant.layers import QuantConv2d, QuantLinear

    torch.manual_seed(0)
    for fmt_name in ("W8A8", "W8A8d", "W4g64A16"):
        fmt = as_format(fmt_name)
        for layer, x in ((torch.nn.Linear(70, 33), torch.randn(2, 5, 70)),
                         (torch.nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 7))):
            cls = QuantLinear if isinstance(layer, torch.nn.Linear) else QuantConv2d
            q = cls.from_float(layer, fmt)
            if fmt.a_bits < 16 and fmt.a_mode == "static":
                q.set_act_range(x.min(), x.max())
            with torch.no_grad(), dispatch.use_backend("reference"):
                ref = q(x)
            with torch.no_grad(), dispatch.use_backend("cpu"):
                assert _rel(q(x), ref) < 1e-5
            args = q._kernel_args(q.weight, q.bias, x.device)
            args.pop("cache", None)
            geo = {} if cls is QuantLinear else dict(kernel_size=q.kernel_size, stride=q.stride,
                                                     padding=q.padding, dilation=q.dilation)
            fn = cpu_routes.linear if cls is QuantLinear else cpu_routes.conv2d
            for route in cpu_routes.candidates("linear" if cls is QuantLinear else "conv2d", cache={}, **args):
                assert _rel(fn(x, route=route, cache={}, **args, **geo), ref) < 1e-5


@pytest.mark.skipif(not cpu_routes._has_onednn(), reason="no oneDNN int8 ops in this torch")
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("hot", [0, 3, 60])
def test_split_route_with_few_high_codes(op, hot):
    """SiLU-like inputs: codes above 127 only in `hot` channels (0: none; 60: too many for the sparse product)."""
    cin = 64
    k = cin if op == "linear" else 9 * cin
    call = random_call(40, k, a_mode="static", seed=11)
    call["a_scale"], call["a_zero"] = torch.tensor([0.05]), torch.tensor([20.0])
    shape = (30, cin) if op == "linear" else (2, cin, 7, 6)
    x = torch.rand(shape) * 4 - 0.5  # codes up to ~100
    cdim = 1
    idx = torch.arange(hot)
    x.index_fill_(cdim, idx, 0.0)
    x.index_add_(cdim, idx, torch.rand(shape).index_select(cdim, idx) * 11)  # these reach codes > 127
    geo = {} if op == "linear" else conv_geometry(3, 2, 1)
    fn = cpu_routes.linear if op == "linear" else cpu_routes.conv2d
    for route in ("onednn_split", "onednn_sparse"):
        out = fn(x, route=route, cache={}, **call, **geo)
        assert _rel(out, _ref(op, x, call, geo or None)) < 1e-5


@pytest.mark.skipif(not cpu_routes._has_onednn(), reason="no oneDNN int8 ops in this torch")
@pytest.mark.parametrize("op,stride", [("linear", 1), ("conv2d", 1), ("conv2d", 2)])
@pytest.mark.parametrize("density", [0.01, 0.2])
@pytest.mark.parametrize("zp", [20, 128])
def test_sparse_route_with_high_codes_in_every_channel(monkeypatch, op, stride, density, zp):
    """Codes far from the zero point scattered over all channels (no hot-channel shortcut): "onednn_sparse" computes
    them as a sparse product beside one oneDNN call when they are few, and falls back to two calls when they are
    not. zp 20: SiLU-like (outliers above 127); zp 128: norm-like (outliers on both sides of the window)."""
    cin = 48
    k = cin if op == "linear" else 9 * cin
    call = random_call(24, k, a_mode="static", seed=5)
    call["a_scale"], call["a_zero"] = torch.tensor([0.05]), torch.tensor([float(zp)])
    shape = (61, cin) if op == "linear" else (2, cin, 9, 7)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(shape, generator=g) * 4 - 0.5) if zp == 20 else (torch.rand(shape, generator=g) * 5 - 2.5)
    high = torch.rand(shape, generator=g) < density  # codes 120..240 (zp 20), beyond 128 -+ 75 (zp 128)
    far = 5 + torch.rand(shape, generator=g) * 6 if zp == 20 else \
        (3.75 + torch.rand(shape, generator=g) * 2) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x = torch.where(high, far, x)
    raw = "_onednn_linear_raw" if op == "linear" else "_onednn_conv_raw"
    calls = []
    real = getattr(cpu_ops, raw)
    monkeypatch.setattr(cpu_ops, raw, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    csr, real_csr = [], cpu_ops._csr
    monkeypatch.setattr(cpu_ops, "_csr", lambda *a: csr.append(1) or real_csr(*a))
    geo = {} if op == "linear" else conv_geometry(3, stride, 1)
    fn = cpu_routes.linear if op == "linear" else cpu_routes.conv2d
    cache = {}
    out = fn(x, route="onednn_sparse", cache=cache, **call, **geo)
    assert _rel(out, _ref(op, x, call, geo or None)) < 1e-5
    assert len(calls) == (1 if density < cpu_ops.SPARSE_DENSITY else 2)
    assert len(csr) == (density < cpu_ops.SPARSE_DENSITY)
    assert ("cpu_sparse_wt" in cache) == (density < cpu_ops.SPARSE_DENSITY)  # the transposed weight, kept
    call["qweight"][:, : k // 2].neg_()  # an in-place weight update (a LoRA patch): nothing stale is used
    assert _rel(fn(x, route="onednn_sparse", cache=cache, **call, **geo), _ref(op, x, call, geo or None)) < 1e-5
    assert not kernel_cache.weight_keeps_moving(cache)  # one patch is one miss, however many slots it refreshed
    assert cpu_routes.candidates(op, cache=cache, **call, **geo)[0] != "float"


def test_a_weight_that_moves_every_call_is_not_cached():
    call = random_call(16, 32, a_mode="static")
    cache = {}
    x = torch.randn(4, 32)
    for _ in range(3):  # a fresh copy of the blob per call, as a low-VRAM layer gets
        call["qweight"] = call["qweight"].clone()
        cpu_routes.linear(x, route="onednn_split" if cpu_routes._has_onednn() else "int_mm", cache=cache, **call)
    assert kernel_cache.weight_keeps_moving(cache)
    assert cpu_routes.candidates("linear", cache=cache, **call) == ["float"]


@pytest.mark.skipif(not cpu_routes._has_onednn(), reason="no oneDNN int8 ops in this torch")
def test_sparse_route_leaves_large_weights_to_the_second_gemm(monkeypatch):
    monkeypatch.setattr(cpu_ops, "SPARSE_WT_CACHE_MAX", 100)  # every weight here counts as large
    call = random_call(24, 9 * 16, a_mode="static", seed=3)
    call["a_scale"], call["a_zero"] = torch.tensor([0.05]), torch.tensor([20.0])
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 16, 8, 8, generator=g) * 4 - 0.5
    x[0, :, 3, 4] = 9.0  # a few codes above 127, in every channel
    cache, geo = {}, conv_geometry(3, 1, 1)
    out = cpu_routes.conv2d(x, route="onednn_sparse", cache=cache, **call, **geo)
    assert _rel(out, _ref("conv2d", x, call, geo)) < 1e-5
    assert "cpu_sparse_wt" not in cache and "cpu_onednn_conv" in cache


@pytest.mark.skipif(not cpu_routes._has_onednn(), reason="no oneDNN int8 ops in this torch")
def test_writes_through_data_do_not_serve_a_stale_prepack():
    """ComfyUI restores weights after hook-scheduled LoRAs with `param.data.copy_(...)`, which does not bump the
    version counter: the CPU caches must still notice (the scales' fingerprint is part of their key)."""
    call = random_call(24, 40, a_mode="static", seed=4)
    other = random_call(24, 40, a_mode="static", seed=9)
    x = torch.randn(6, 40)
    for route in ("onednn_split", "onednn_sparse"):
        c = {**call, "qweight": call["qweight"].clone(), "scale": call["scale"].clone()}
        cache = {}
        cpu_routes.linear(x, route=route, cache=cache, **c)
        c["qweight"].data.copy_(other["qweight"])
        c["scale"].data.copy_(other["scale"])
        assert _rel(cpu_routes.linear(x, route=route, cache=cache, **c), _ref("linear", x, c)) < 1e-5


def test_route_memo_follows_the_zero_point_zone(monkeypatch):
    """A layer whose timestep groups put the zero point in different zones gets each zone's route, not the first."""
    call = random_call(16, 32, a_mode="static", seed=6)
    x, cache = torch.randn(8, 32), {}
    seen = []
    monkeypatch.setattr(cpu_routes, "choose", lambda op, **kw: seen.append(cpu_routes._zone(kw)) or "float")
    for z in (10.0, 12.0, 130.0):
        cpu_routes.linear(x, cache=cache, **{**call, "a_zero": torch.tensor([z])})
    assert seen == ["|z-low", "|z-mid"]  # the second call is served from the memo, the third is not
