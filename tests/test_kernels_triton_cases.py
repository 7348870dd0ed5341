"""Triton kernels (kernels/triton_gemm.py, triton_conv.py) against the reference on odd shapes, and the fused producer
+ activation quantization kernels (kernels/triton_fused.py, #22 item 3) against their torch references.

Runs on a CUDA GPU when there is one; otherwise only under TRITON_INTERPRET=1, which must be set before Triton is
imported: tests/test_kernels_triton.py runs this file in a subprocess with it, so the main test process keeps
compiled-kernel semantics (and the dispatcher does not route CPU tensors to the interpreter in other tests).
"""
import os
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device (tests/test_kernels_triton.py runs these under TRITON_INTERPRET=1)",
                allow_module_level=True)

from mixquant.kernels import dispatch, triton_conv, triton_gemm  # noqa: E402
from mixquant.kernels import triton_fused as tf  # noqa: E402
from mixquant.kernels.synthetic import conv_geometry, random_call  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"

# (bits, group_size, a_mode, a_split, weight zero point)
FORMATS = [(8, None, "static", None, False), (8, None, "dynamic", None, False), (8, None, "static", 40, False),
           (4, None, "static", None, True), (4, 32, "dynamic", None, False), (2, 32, "static", 40, True),
           (4, 32, "none", None, True), (8, None, "none", None, False), (2, None, "dynamic", None, False)]


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _call(n, k, bits, group, a_mode, split, wzero, seed, bias=True):
    return random_call(n, k, bits=bits, group_size=group, symmetric=None if bits == 8 else not wzero,
                       a_mode=a_mode, a_split=split, bias=bias, seed=seed, device=DEV)


def _ref(op, x, call, geo=None):
    with dispatch.use_backend("reference"):
        return dispatch.linear(x, **call) if op == "linear" else dispatch.conv2d(x, **call, **geo)


@pytest.mark.parametrize("bits,group,a_mode,split,wzero", FORMATS)
@pytest.mark.parametrize("prequant", [False, True])
def test_linear(bits, group, a_mode, split, wzero, prequant):
    if a_mode == "none" and prequant:
        pytest.skip("nothing to pre-quantize")
    call = _call(45, 100, bits, group, a_mode, split, wzero, seed=bits, bias=not prequant)
    x = torch.randn(2, 19, 100, device=DEV)
    ref = _ref("linear", x, call)
    dots = [True, False] if a_mode != "none" else [None]  # the int8 dot and the float dot (in-loop dequantized)
    for int_dot in dots:
        out = triton_gemm.qlinear(x, prequant=prequant, int_dot=int_dot, **call)
        assert out.shape == ref.shape and out.dtype == x.dtype
        assert _rel(out, ref) < 1e-5, (int_dot, _rel(out, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [(8, None, "static", None, False), (4, 32, "none", None, True)])
def test_linear_half_inputs(dtype, fmt):
    call = _call(40, 96, *fmt, seed=3)
    x = torch.randn(33, 96, device=DEV).to(dtype)
    ref = _ref("linear", x.float(), call)  # the fp32 reference; the kernel accumulates in fp32 too
    out = triton_gemm.qlinear(x, **call)
    assert out.dtype == dtype
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_linear_single_and_no_tokens():
    call = _call(24, 64, 8, None, "dynamic", None, False, seed=4)
    x = torch.randn(1, 64, device=DEV)
    assert _rel(triton_gemm.qlinear(x, **call), _ref("linear", x, call)) < 1e-5
    assert triton_gemm.qlinear(torch.randn(0, 64, device=DEV), **call).shape == (0, 24)


CONV_FORMATS = [(8, None, "static", None, False), (8, None, "dynamic", None, False), (8, None, "static", 5, False),
                (4, 32, "static", None, True), (2, None, "dynamic", None, False), (4, 32, "none", None, True)]


@pytest.mark.parametrize("bits,group,a_mode,split,wzero", CONV_FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("prequant", [False, True])
def test_conv3x3(bits, group, a_mode, split, wzero, stride, prequant):
    if a_mode == "none" and prequant:
        pytest.skip("nothing to pre-quantize")
    cin = 11  # K = 99: not a multiple of the block or of the group
    call = _call(21, 9 * cin, bits, group, a_mode, split, wzero, seed=5, bias=stride == 1)
    geo = conv_geometry(3, stride, 1)
    x = torch.randn(2, cin, 9, 7, device=DEV) * 2
    ref = _ref("conv2d", x, call, geo)
    for int_dot in ([True, False] if a_mode != "none" else [None]):
        out = triton_conv.qconv2d(x, prequant=prequant, int_dot=int_dot, **call, **geo)
        assert out.shape == ref.shape
        assert _rel(out, ref) < 1e-5, (int_dot, _rel(out, ref))


@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv1x1(a_mode, channels_last):
    call = _call(19, 13, 8, None, a_mode, None, False, seed=6)
    x = torch.randn(3, 13, 5, 7, device=DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    geo = conv_geometry(1, 1, 0)
    ref = _ref("conv2d", x, call, geo)
    out = triton_conv.qconv2d(x, **call, **geo)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("fmt", [(8, None, "static", 16, False), (4, 32, "static", None, True),
                                 (8, None, "dynamic", None, False)])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_channel_aligned_blocks(fmt, stride):
    """C_in a multiple of BLOCK_K: each K block lies inside one tap (per-row addressing), as in every SD conv."""
    cin = 64
    call = _call(24, 9 * cin, *fmt, seed=8)
    geo = conv_geometry(3, stride, 1)
    x = torch.randn(2, cin, 7, 5, device=DEV)
    ref = _ref("conv2d", x, call, geo)
    for prequant in ((False, True) if fmt[2] != "none" else (False,)):
        assert _rel(triton_conv.qconv2d(x, prequant=prequant, **call, **geo), ref) < 1e-5


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_precomputed_weight_sums(op):
    """Static zero points with the weight column sums precomputed once (what dispatch keeps in a layer's cache)."""
    for fmt in ((8, None, "static", None, False), (4, 64, "static", None, True), (2, 32, "static", 40, True)):
        k = 99 if op == "linear" else 9 * 64
        call = _call(20, k, *fmt, seed=9)
        if op == "conv2d" and call["a_split"]:
            call["a_split"] = 16
        wsum = triton_gemm.weight_sums(call["qweight"], call["zero"], call["bits"], k, call["group_size"],
                                       call["scale"].shape[1])
        if op == "linear":
            x = torch.randn(13, k, device=DEV)
            ref = _ref("linear", x, call)
            out = triton_gemm.qlinear(x, wsum=wsum, **call)
        else:
            x = torch.randn(2, 64, 5, 6, device=DEV)
            geo = conv_geometry(3, 1, 1)
            ref = _ref("conv2d", x, call, geo)
            out = triton_conv.qconv2d(x, wsum=wsum, **call, **geo)
        assert _rel(out, ref) < 1e-5
        cache = {}
        with dispatch.use_backend("triton"):
            again = dispatch.linear(x, cache=cache, **call) if op == "linear" else \
                dispatch.conv2d(x, cache=cache, **call, **geo)
        assert "triton_wsum" in cache and torch.equal(cache["triton_wsum"][1], wsum)
        assert _rel(again, ref) < 1e-5


def test_padding_reads_the_zero_code():
    """A static zero point far from the middle: a padded border that read code 0 instead of z would be off by
    z * sum(w) on every border pixel."""
    call = _call(8, 9 * 4, 8, None, "static", None, False, seed=7)
    call["a_zero"] = torch.tensor([230.0], device=DEV)
    geo = conv_geometry(3, 1, 1)
    x = torch.randn(1, 4, 5, 5, device=DEV)
    ref = _ref("conv2d", x, call, geo)
    for prequant in (False, True):
        assert _rel(triton_conv.qconv2d(x, prequant=prequant, **call, **geo), ref) < 1e-5


@pytest.mark.parametrize("a_mode,split", [("static", None), ("static", 3), ("dynamic", None)])
def test_conv_uneven_padding_dilation_and_strides(a_mode, split):
    """The pre-quantized input is padded by (ph, pw) on each side and read with padding 0: padding (2, 1), dilation
    2, stride (2, 1), a 3x1 kernel and no padding at all must all land on the right codes."""
    cin = 6
    x = torch.randn(2, cin, 9, 8, device=DEV) * 2
    geos = [dict(kernel_size=(3, 3), stride=(2, 1), padding=(2, 1), dilation=(2, 2)),
            dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0), dilation=(1, 1)),
            dict(kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1))]
    for i, geo in enumerate(geos):
        kh, kw = geo["kernel_size"]
        call = _call(7, kh * kw * cin, 8, None, a_mode, split, False, seed=20 + i)
        if a_mode == "static":  # zero points far from the middle: a border read as code 0 would show
            call["a_zero"] = torch.tensor([230.0, 20.0][:1 if split is None else 2], device=DEV)
        ref = _ref("conv2d", x, call, geo)
        for prequant in (False, True):
            out = triton_conv.qconv2d(x, prequant=prequant, **call, **geo)
            assert out.shape == ref.shape and _rel(out, ref) < 1e-5, (geo, prequant)


def test_quantized_layers_agree_on_every_path():
    from mixquant.quant.formats import as_format
    from mixquant.quant.layers import QuantConv2d, QuantLinear

    torch.manual_seed(0)
    for name in ("W8A8", "W8A8d", "W4g64A8", "W4g64A16"):
        fmt = as_format(name)
        for layer, x in ((torch.nn.Linear(70, 33), torch.randn(2, 5, 70)),
                         (torch.nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 7))):
            cls = QuantLinear if isinstance(layer, torch.nn.Linear) else QuantConv2d
            q = cls.from_float(layer.to(DEV), fmt)
            x = x.to(DEV)
            if fmt.a_bits < 16 and fmt.a_mode == "static":
                q.set_act_range(x.min(), x.max())
            outs = {}
            for backend in ("reference", "triton") + (("cpu",) if DEV == "cpu" else ()):
                with torch.no_grad(), dispatch.use_backend(backend):
                    args = q._kernel_args(q.weight, q.bias, x.device)
                    args.pop("cache", None)
                    assert dispatch.path("linear" if cls is QuantLinear else "conv2d", x, **args,
                                         **({} if cls is QuantLinear else dict(
                                             kernel_size=q.kernel_size, stride=q.stride, padding=q.padding,
                                             dilation=q.dilation))).startswith(backend)
                    outs[backend] = q(x)
            for backend, out in outs.items():
                assert _rel(out, outs["reference"]) < 1e-5, (name, cls.__name__, backend)


# --- fused producer + activation quantization (kernels/triton_fused.py) ------------------------------------------


def _static(lo, hi, bits=8):
    s = torch.tensor((hi - lo) / (2 ** bits - 1), device=DEV)
    return s, torch.round(-torch.tensor(lo, device=DEV) / s)


def _same_codes(q, q_ref, tol_share=0.002):
    """Equal codes, but for a code moved by one where the fp32 statistics round differently (sum order)."""
    d = (q.int() - q_ref.int()).abs()
    moved = float((d > 0).float().mean())
    assert int(d.max()) <= 1 and moved <= tol_share, (int(d.max()), moved)


@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_quant(a_mode, affine):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 37, 100, generator=g) * 3 + 1).to(DEV)
    w = (torch.rand(100, generator=g) + 0.5).to(DEV) if affine else None
    b = (torch.randn(100, generator=g) * 0.1).to(DEV) if affine else None
    s, z = _static(-4.0, 5.0)
    kw = dict(a_scale=s, a_zero=z) if a_mode == "static" else {}
    y, q, sr = tf.layernorm_quant(x, w, b, 1e-6, a_mode, **kw)
    y_ref, q_ref, sr_ref = tf.layernorm_quant_ref(x, w, b, 1e-6, a_mode, **kw)
    assert y.shape == x.shape and torch.allclose(y, y_ref, atol=1e-5)
    assert q.shape == (3 * 37, 100) and q.dtype == torch.int8
    _same_codes(q, q_ref)
    if a_mode == "dynamic":
        assert torch.allclose(sr, sr_ref, rtol=1e-5)
    else:
        assert sr is None


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("geglu", [False, True])
@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
def test_gelu_and_geglu_quant(approximate, geglu, a_mode):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 21, 72, generator=g) * 2).to(DEV)
    gate = (torch.randn(2, 21, 72, generator=g) * 2).to(DEV) if geglu else None
    s, z = _static(-3.0, 9.0)
    kw = dict(a_scale=s, a_zero=z) if a_mode == "static" else {}
    y, q, sr = tf.gelu_quant(x, a_mode, approximate=approximate, gate=gate, **kw)
    y_ref, q_ref, sr_ref = tf.gelu_quant_ref(x, a_mode, approximate=approximate, gate=gate, **kw)
    assert torch.allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    _same_codes(q, q_ref, 0.01)


@pytest.mark.parametrize("pad", [(1, 1), (0, 0)])
def test_groupnorm_silu_quant(pad):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 64, 5, 7, generator=g) * 2 + 0.5).to(DEV)
    w = (torch.rand(64, generator=g) + 0.5).to(DEV)
    b = (torch.randn(64, generator=g) * 0.2).to(DEV)
    s, z = _static(-0.3, 4.0)
    y, q, _ = tf.groupnorm_silu_quant(x, 8, w, b, 1e-5, s, z, pad=pad)
    y_ref, q_ref, _ = tf.groupnorm_silu_quant_ref(x, 8, w, b, 1e-5, s, z, pad=pad)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert q.shape == (2 * (5 + 2 * pad[0]) * (7 + 2 * pad[1]), 64)
    _same_codes(q, q_ref)
    if pad != (0, 0):  # border rows hold the code of 0.0
        border = q.reshape(2, 5 + 2 * pad[0], 7 + 2 * pad[1], 64)[:, 0]
        assert torch.equal(border, torch.full_like(border, int(z) - 128))


@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
def test_linear_reads_the_fused_codes(a_mode):
    """LayerNorm -> quantized linear: the GEMM on the producer's codes equals the quantized linear on its output."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, 96, generator=g).to(DEV)
    call = random_call(40, 96, bits=8, a_mode=a_mode, seed=4, device=DEV)
    if a_mode == "static":
        call["a_scale"], call["a_zero"] = _static(-3.0, 3.5)
    kw = dict(a_scale=call["a_scale"], a_zero=call["a_zero"]) if a_mode == "static" else {}
    y, q, sr = tf.layernorm_quant(x, None, None, 1e-6, a_mode, **kw)
    fused = triton_gemm.qlinear(y, codes=(q, sr), **call)
    plain = triton_gemm.qlinear(y, prequant=True, **call)
    assert torch.allclose(fused, plain, rtol=1e-6, atol=1e-6 * float(plain.abs().max()))
    with dispatch.use_backend("reference"):
        ref = dispatch.linear(y, **call)
    assert float((fused - ref).abs().max() / ref.abs().max()) < 1e-5


def test_conv_reads_the_fused_codes():
    """GroupNorm + SiLU -> quantized 3x3 conv (padding 1): the codes of the padded input come out of the producer."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 6, 6, generator=g).to(DEV)
    w = torch.ones(32, device=DEV)
    b = torch.zeros(32, device=DEV)
    call = random_call(16, 32 * 9, bits=8, a_mode="static", seed=6, device=DEV)
    call["a_scale"], call["a_zero"] = _static(-0.3, 3.0)
    geo = conv_geometry(3, 1, 1)
    y, q, _ = tf.groupnorm_silu_quant(x, 8, w, b, 1e-5, call["a_scale"], call["a_zero"], pad=(1, 1))
    fused = triton_conv.qconv2d(y, codes=(q, None), **call, **geo)
    plain = triton_conv.qconv2d(y, prequant=True, **call, **geo)
    assert torch.allclose(fused, plain, rtol=1e-6, atol=1e-6 * float(plain.abs().max()))


def _ffn_model():
    """A transformer block's shapes: LayerNorm -> q / k / v, GEGLU -> out (SD), GELU(tanh) -> out (diffusers' Flux /
    SD3), nn.GELU -> out (ComfyUI's Flux MLP)."""
    from diffusers.models.activations import GEGLU, GELU

    torch.manual_seed(7)
    m = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(64), "to_q": torch.nn.Linear(64, 64),
                             "to_k": torch.nn.Linear(64, 64), "to_v": torch.nn.Linear(64, 64),
                             "geglu": GEGLU(64, 96), "ff_out": torch.nn.Linear(96, 64),
                             "gelu": GELU(64, 96, approximate="tanh"), "ff2_out": torch.nn.Linear(96, 64),
                             "act": torch.nn.GELU(approximate="tanh"), "ff3_out": torch.nn.Linear(64, 64)})

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            h = self.m["norm"](x)
            a = self.m["to_q"](h) + self.m["to_k"](h) * 0.5 + self.m["to_v"](h) * 0.25
            return a + self.m["ff_out"](self.m["geglu"](a)) + self.m["ff2_out"](self.m["gelu"](a)) \
                + self.m["ff3_out"](self.m["act"](a))

    return Block().eval()


def test_fp32_activations_get_tiles_that_fit_shared_memory(monkeypatch):
    """The 256-row int8 tile (the fastest measured on an H100 for int8 / 16-bit activations) would need 311 KB of
    shared memory with fp32 activations quantized in the K loop (compiled for sm_90 with Triton 3.6 and 3.9), over an
    H100's 227 KB: fp32 inputs get the 128-row tile."""
    monkeypatch.setattr(triton_gemm, "_tile_list", lambda: triton_gemm._DATACENTER)
    for a_bytes in (1, 2):
        assert triton_gemm.heuristic_config(8192, 512, None, True, a_bytes=a_bytes)["BLOCK_M"] == 256
    assert triton_gemm.heuristic_config(8192, 512, None, True, a_bytes=4)["BLOCK_M"] == 128


def _count_codes(monkeypatch, module, planner: str, used: list):
    """Every GEMM / conv the Triton path runs (bound or not: both run a plan) appends whether it read fused codes."""
    real = getattr(module, planner)

    def counting(*a, **k):
        run = real(*a, **k)
        return lambda x, codes=None: (used.append(codes is not None), run(x, codes))[1]

    monkeypatch.setattr(module, planner, counting)


# the two ways hosts run a model without autograd; ComfyUI runs every node under torch.inference_mode, where tensors
# made have no version counter (the fused output's codes are checked against it)
GRADLESS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("a_mode,gradless", [("static", "no_grad"), ("dynamic", "no_grad"),
                                             ("static", "inference_mode")])
def test_fused_producers_feed_their_readers(a_mode, gradless, monkeypatch):
    """quant/fusion.py in eager mode: after the first call the LayerNorm / GEGLU / GELU write their readers' codes,
    the readers' GEMMs read them, and the output stays the quantized model's."""
    from mixquant.quant import fusion
    from mixquant.quant.apply import quantize_model
    from mixquant.quant.calibration import collect_act_ranges
    from mixquant.quant.formats import LayerFormat

    model = _ffn_model().to(DEV)
    x = torch.randn(2, 9, 64, device=DEV)
    names = ["m.to_q", "m.to_k", "m.to_v", "m.ff_out", "m.ff2_out", "m.ff3_out", "m.geglu.proj", "m.gelu.proj"]
    with torch.no_grad():
        ranges = collect_act_ranges(model, lambda: model(x))
        q, _ = quantize_model(model, {n: LayerFormat(8, 8, None, a_mode) for n in names}, ranges)
        used = []
        _count_codes(monkeypatch, triton_gemm, "plan_linear", used)
    with GRADLESS[gradless]():
        y0 = q(x)  # the first call: unfused, links producers and readers
        assert not any(used)
        groups = fusion.groups(q)
        assert sorted(len(g.readers) for g in groups) == [1, 1, 1, 3]
        used.clear()
        y1 = q(x)
    assert sum(used) == 6 and all(g.used == 1 for g in groups)  # q, k, v and the three ff outs read fused codes
    rel = float((y1 - y0).abs().max() / y0.abs().max())
    assert rel < 2e-2


@pytest.mark.parametrize("gradless", list(GRADLESS))
def test_a_fused_output_written_in_place_is_quantized_again(gradless):
    """A model that writes into the LayerNorm's output before the layer reads it: the reader sees the write (the
    output's version counter, which an inference tensor would not have) and quantizes the written tensor itself."""
    from mixquant.quant import fusion
    from mixquant.quant.apply import quantize_model
    from mixquant.quant.calibration import collect_act_ranges
    from mixquant.quant.formats import LayerFormat

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = torch.nn.LayerNorm(64), torch.nn.Linear(64, 64)

        def forward(self, x):
            h = self.norm(x)
            h.mul_(3.0)
            return self.lin(h)

    torch.manual_seed(9)
    model, x = Scaled().eval().to(DEV), torch.randn(2, 9, 64, device=DEV)
    with torch.no_grad():
        ranges = collect_act_ranges(model, lambda: model(x))
        q, _ = quantize_model(model, {"lin": LayerFormat(8, 8)}, ranges)
    with GRADLESS[gradless]():
        y0 = q(x)  # unfused (links the norm to its reader)
        assert [g.kind for g in fusion.groups(q)] == ["layernorm"]
        y1 = q(x)
    assert fusion.groups(q)[0].used == 1 and torch.equal(y1, y0)


@pytest.mark.parametrize("gradless", list(GRADLESS))
def test_fused_groupnorm_silu_feeds_the_resblock_convs(gradless, monkeypatch):
    """A UNet ResBlock (diffusers' ResnetBlock2D: GroupNorm -> SiLU -> 3x3 conv, twice): after the first call each
    GroupNorm computes GroupNorm + SiLU and its conv's padded static codes, the shared SiLU passes its output through
    (and still activates the time embedding), the convs read the codes, and the output stays the quantized block's."""
    from diffusers.models.resnet import ResnetBlock2D

    from mixquant.kernels import triton_conv
    from mixquant.quant import fusion
    from mixquant.quant.apply import quantize_model
    from mixquant.quant.calibration import collect_act_ranges
    from mixquant.quant.formats import LayerFormat

    torch.manual_seed(8)
    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=64, groups=8).eval().to(DEV)
    x, temb = torch.randn(2, 32, 6, 6, device=DEV), torch.randn(2, 64, device=DEV)
    with torch.no_grad():
        ranges = collect_act_ranges(block, lambda: block(x, temb))
        q, _ = quantize_model(block, {"conv1": LayerFormat(8, 8), "conv2": LayerFormat(8, 8)}, ranges)
        used = []
        _count_codes(monkeypatch, triton_conv, "plan_conv2d", used)
    with GRADLESS[gradless](), warnings.catch_warnings():
        warnings.simplefilter("error")  # (a fused kernel that fails warns and unfuses)
        y0 = q(x, temb)  # the first call: unfused, links the norms to the convs
        assert not any(used)
        groups = fusion.groups(q)
        assert sorted(g.kind for g in groups) == ["groupnorm_silu", "groupnorm_silu"]
        assert type(q.nonlinearity).forward is fusion._passthrough_forward
        used.clear()
        y1 = q(x, temb)
    assert used == [True, True] and all(g.used == 1 for g in groups)
    assert float((y1 - y0).abs().max() / y0.abs().max()) < 1e-2


def test_ops_are_registered_at_import_so_a_first_compiled_call_does_not_break():
    """Where the Triton backend runs, importing the dispatcher registers its custom ops: registered at the first call
    instead, a model's first call under torch.compile registered them inside dynamo's trace (a graph break, an error
    with fullgraph=True). A fresh process: no op is used before the compiled call."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, torch.nn as nn
        from mixquant.kernels import dispatch
        assert hasattr(torch.ops.mixquant, "qlinear") and hasattr(torch.ops.mixquant, "qconv2d")
        from mixquant.quant.formats import LayerFormat
        from mixquant.quant.layers import QuantConv2d, QuantLinear

        dev = "cpu" if not torch.cuda.is_available() else "cuda"
        torch.manual_seed(0)
        conv = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), LayerFormat(8, 8)).to(dev)
        conv.set_act_range(torch.tensor(-3.0), torch.tensor(3.0))
        lin = QuantLinear.from_float(nn.Linear(16, 32), LayerFormat(4, 8, 16)).to(dev)
        lin.set_act_range(torch.tensor(-2.0), torch.tensor(2.0))
        model = nn.Sequential(conv, nn.Flatten(2), nn.Linear(25, 16).to(dev), lin)
        x = torch.randn(2, 8, 5, 5, device=dev)
        with dispatch.use_backend("triton"), torch.no_grad():
            explain = torch._dynamo.explain(model)(x)
            assert explain.graph_break_count == 0 and explain.graph_count == 1, explain
            ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
            assert {"mixquant.qconv2d.default", "mixquant.qlinear.default"} <= ops, ops
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MIXQUANT_CPU_CACHE=""))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_a_bound_call_keeps_no_input_alive():
    """A layer keeps its bound calls (one per input shape) as long as its weight: they must not hold the input they
    were bound with (on a GPU: one forward's activations per shape, outside the host's memory accounting)."""
    import gc
    import weakref

    import torch.nn as nn

    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.layers import QuantConv2d, QuantLinear

    torch.manual_seed(10)
    for layer, shape in [(QuantLinear.from_float(nn.Linear(64, 48), LayerFormat(8, 8)), (2, 9, 64)),
                         (QuantConv2d.from_float(nn.Conv2d(32, 16, 3, padding=1), LayerFormat(8, 8)), (2, 32, 6, 6)),
                         (QuantConv2d.from_float(nn.Conv2d(32, 16, 3, padding=1), LayerFormat(4, 16, 32)),
                          (2, 32, 6, 6))]:
        layer = layer.to(DEV)
        layer.set_act_range(torch.tensor(-3.0), torch.tensor(3.0))
        x = torch.randn(*shape, device=DEV)
        with torch.inference_mode():
            layer(x)
        assert layer.__dict__.get("_bound_memo")
        gone = weakref.ref(x)
        del x
        gc.collect()
        assert gone() is None, type(layer).__name__


@pytest.mark.skipif(not INTERPRET, reason="a rehearsal of the GPU path on the CPU (on a GPU the real tests run)")
def test_a_unet_on_the_gpu_backends_path_under_inference_mode(small_unet, unet_inputs, monkeypatch):
    """The path a quantized UNet takes on a GPU in ComfyUI, rehearsed on the CPU under the interpreter: the GPU
    backend (registered here for CPU tensors, its route forced to Triton), fused producers reading into their
    readers, calls bound per layer, all under torch.inference_mode; the output agrees with the reference path's."""
    from mixquant.kernels import gpu_routes
    from mixquant.kernels.registry import Backend, Constraints
    from mixquant.quant import fusion
    from mixquant.quant.apply import quantize_model
    from mixquant.quant.calibration import collect_act_ranges
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.layers import QuantLayer
    from mixquant.quant.roles import discover_layers

    gpu = next(b for b in dispatch.backends() if b.name == "gpu")
    monkeypatch.setenv("MIXQUANT_GPU_ROUTE", "triton")
    monkeypatch.setenv("MIXQUANT_GPU_CACHE", "")
    gpu_routes.plan(refresh=True)
    dispatch.register(Backend("gpu", lambda: None, gpu.ops,
                              dict.fromkeys(gpu.ops, Constraints(devices=frozenset(("cpu",))))))
    try:
        x, t, ctx = unet_inputs
        fmts = [LayerFormat(8, 8), LayerFormat(4, 8, 64), LayerFormat(8, 8, None, "dynamic"), LayerFormat(4, 16, 64)]
        plan = {li.name: (LayerFormat(16, 16) if li.protected else fmts[i % len(fmts)])
                for i, li in enumerate(discover_layers(small_unet))}
        with torch.no_grad():
            ranges = collect_act_ranges(small_unet, lambda: small_unet(x, t, ctx))
            q, _ = quantize_model(small_unet, plan, ranges)
        used = []
        _count_codes(monkeypatch, triton_gemm, "plan_linear", used)
        _count_codes(monkeypatch, triton_conv, "plan_conv2d", used)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("error")  # (a fused kernel that fails warns and unfuses)
            q(x, t, ctx)  # the first call links producers and readers, binds the calls
            used.clear()
            y = q(x, t, ctx).sample
            with dispatch.use_backend("reference"):
                ref = q(x, t, ctx).sample
        layers = [m for m in q.modules() if isinstance(m, QuantLayer) and m.packed]
        assert layers and all(m.__dict__.get("_bound_memo") for m in layers)  # every layer bound its call
        assert len(used) >= len(layers) and any(used)  # on the Triton kernels, some reading fused codes
        assert fusion.groups(q) and all(g.used >= 1 for g in fusion.groups(q))
        assert _rel(y, ref) < 1e-3
    finally:
        dispatch.register(gpu)
        gpu_routes._PLAN.clear()
