"""Fused producer + activation quantization kernels (kernels/triton_fused.py) against their torch references, and a
quantized layer reading the fused codes (#22 item 3). Runs on a CUDA GPU, or under TRITON_INTERPRET=1 (set before
Triton is imported: tests/test_kernels_triton.py runs this file in a subprocess with it)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device (tests/test_kernels_triton.py runs these under TRITON_INTERPRET=1)",
                allow_module_level=True)

from mixquant.kernels import dispatch, triton_conv, triton_fused as tf, triton_gemm  # noqa: E402
from mixquant.kernels.synthetic import conv_geometry, random_call  # noqa: E402

DEV = "cpu" if INTERPRET else "cuda"


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
