"""GPU-only checks of the Triton path: autotuned launches at SD-like sizes, CUDA-graph capture, torch.compile.
(The per-format correctness cases in test_kernels_triton_cases.py also run on the GPU when there is one.)"""
import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from mixquant.kernels import dispatch, triton_conv, triton_gemm  # noqa: E402
from mixquant.kernels.synthetic import conv_geometry, random_call  # noqa: E402

if triton_gemm.available("cuda") is not None:
    pytest.skip(triton_gemm.available("cuda"), allow_module_level=True)


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _ref(op, x, call, geo=None):
    with dispatch.use_backend("reference"):
        x32 = x.float()
        return dispatch.linear(x32, **call) if op == "linear" else dispatch.conv2d(x32, **call, **geo)


@pytest.mark.parametrize("fmt", [dict(bits=8, a_mode="static"), dict(bits=8, a_mode="dynamic"),
                                 dict(bits=4, group_size=64, a_mode="dynamic"), dict(bits=4, group_size=128,
                                                                                     a_mode="none")])
@pytest.mark.parametrize("mkn", [(2 * 1024 + 3, 640, 640), (77 * 2, 768, 1280), (8, 1280, 5120)])
def test_autotuned_linear(fmt, mkn):
    m, k, n = mkn
    call = random_call(n, k, device="cuda", **fmt)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = _ref("linear", x, call)
    dots = (None, True, False) if fmt["a_mode"] != "none" else (None,)  # default, int8 dot, float dot
    for prequant in ((None, True, False) if fmt["a_mode"] != "none" else (None,)):
        for int_dot in dots:
            out = triton_gemm.qlinear(x, prequant=prequant, int_dot=int_dot, **call)
            assert out.dtype == torch.float16
            assert _rel(out, ref) < 5e-3, (prequant, int_dot)


def test_autotuning_opt_in(monkeypatch):
    """MIXQUANT_AUTOTUNE=1: the autotuned launch (every listed tile timed per shape) gives the same result."""
    monkeypatch.setenv("MIXQUANT_AUTOTUNE", "1")
    assert triton_gemm.autotuning()
    call = random_call(640, 320, device="cuda", bits=8, a_mode="dynamic")
    x = torch.randn(300, 320, device="cuda", dtype=torch.float16)
    assert _rel(triton_gemm.qlinear(x, **call), _ref("linear", x, call)) < 5e-3


@pytest.mark.parametrize("fmt", [dict(bits=8, a_mode="static"), dict(bits=4, group_size=64, a_mode="dynamic")])
@pytest.mark.parametrize("shape", [(2, 320, 33, 31, 1), (2, 640, 16, 16, 2)])
def test_autotuned_conv(fmt, shape):
    b, c, h, w, stride = shape
    call = random_call(c, 9 * c, device="cuda", **fmt)
    geo = conv_geometry(3, stride, 1)
    for cl in (False, True):
        x = torch.randn(b, c, h, w, device="cuda", dtype=torch.float16)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for int_dot in (None, True, False):  # default, int8 dot, float dot (dequantized in the K loop)
            out = triton_conv.qconv2d(x, int_dot=int_dot, **call, **geo)
            assert _rel(out, _ref("conv2d", x, call, geo)) < 5e-3, int_dot


def test_cuda_graph_capture_and_replay():
    call = random_call(640, 640, device="cuda", a_mode="static")
    ccall = random_call(320, 9 * 320, device="cuda", a_mode="dynamic")
    geo = conv_geometry(3, 1, 1)
    x = torch.randn(512, 640, device="cuda", dtype=torch.float16)
    xc = torch.randn(2, 320, 16, 16, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: autotuning and compilation happen outside the capture
        for _ in range(2):
            dispatch.linear(x, **call)
            dispatch.conv2d(xc, **ccall, **geo)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = dispatch.linear(x, **call)
        yc = dispatch.conv2d(xc, **ccall, **geo)
    x.copy_(torch.randn_like(x))
    xc.copy_(torch.randn_like(xc))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(y, _ref("linear", x, call)) < 5e-3
    assert _rel(yc, _ref("conv2d", xc, ccall, geo)) < 5e-3


def test_torch_compile_without_graph_breaks():
    from mixquant.quant.formats import as_format
    from mixquant.quant.layers import QuantConv2d, QuantLinear

    torch.manual_seed(0)
    lin = QuantLinear.from_float(torch.nn.Linear(320, 640).cuda().half(), as_format("W8A8"))
    lin.set_act_range(torch.tensor(-4.0), torch.tensor(4.0))  # static: the cached weight sums stay out of the graph
    conv = QuantConv2d.from_float(torch.nn.Conv2d(64, 64, 3, padding=1).cuda().half(), as_format("W4g64A8d"))
    x = torch.randn(4, 77, 320, device="cuda", dtype=torch.float16)
    xc = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref, refc = lin(x), conv(xc)
        f = torch.compile(lin, fullgraph=True)
        fc = torch.compile(conv, fullgraph=True)
        assert _rel(f(x), ref) < 1e-3
        assert _rel(fc(xc), refc) < 1e-3
