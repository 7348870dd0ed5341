import pytest
import torch

from mixquant.kernels.packing import pack_codes, packed_len, unpack_codes
from mixquant.quant.quantizer import (calc_qparams, dequantize, fake_quantize, packed_weight_bytes, qrange, quantize,
                                      quantize_weight, unpacked_codes)

GRANS = [("tensor", None), ("channel", None), ("token", None), ("group", 64), ("group", 128)]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("gran,group", GRANS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_within_half_step(bits, gran, group, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(24, 200) * torch.linspace(0.1, 3, 24)[:, None] + (0 if symmetric else 0.7)
    qp = calc_qparams(x, bits, gran, group, symmetric)
    q = quantize(x, qp)
    lo, hi = qrange(bits, symmetric)
    assert q.min() >= lo and q.max() <= hi
    assert torch.equal(q, q.round())
    err = (dequantize(q, qp) - x).abs()
    # per element: half its own scale when symmetric; asymmetric adds the zero point's rounding (another half step
    # at one end of the range). 1% slack for the fp16 rounding of stored scales.
    step = (dequantize(torch.ones_like(x), qp) - dequantize(torch.zeros_like(x), qp)).abs()
    assert (err <= step * (0.5 if symmetric else 1.0) * 1.01 + 1e-6).all()


@pytest.mark.parametrize("gran,group", GRANS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_falls_with_every_extra_bit(gran, group, symmetric):
    torch.manual_seed(0)
    x = torch.randn(24, 200) * torch.linspace(0.1, 3, 24)[:, None]
    errs = []
    for bits in (2, 3, 4, 6, 8):
        qp = calc_qparams(x, bits, gran, group, symmetric)
        errs.append(float(((fake_quantize(x, qp) - x) ** 2).mean() / (x ** 2).mean()))
    assert all(a > 2 * b for a, b in zip(errs, errs[1:]))  # each step at least halves the error
    assert errs[-1] < 2e-4


def test_asymmetric_zero_point_and_exact_zero():
    x = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    qp = calc_qparams(x, 4, "tensor", symmetric=False)
    assert qp.zero is not None and 0 < float(qp.zero) < 15  # range [-1, 3] puts the zero inside the grid
    assert float(fake_quantize(x, qp)[0, 1]) == 0.0  # 0.0 is exactly representable
    assert float(qp.scale) == pytest.approx(4.0 / 15, rel=1e-3)
    # an all-positive range still holds 0 exactly (the grid is widened to include it)
    qp2 = calc_qparams(torch.tensor([[2.0, 5.0]]), 8, "tensor", symmetric=False)
    assert float(qp2.zero) == 0.0


def test_per_token_granularity_reduces_over_last_dim():
    x = torch.randn(3, 5, 16)
    x[1, 2] *= 100
    qp = calc_qparams(x, 8, "token")
    assert qp.scale.shape == (15, 1)
    assert float(qp.scale.max()) > 50 * float(qp.scale.min())


def test_mse_search_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((64, 256))
    e = {}
    for search in ("minmax", "mse"):
        qp = calc_qparams(x, 4, "channel", symmetric=True, search=search)
        e[search] = float(((fake_quantize(x, qp) - x) ** 2).mean())
    assert e["mse"] < 0.9 * e["minmax"]  # measured: 0.64 vs 0.74


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k", [1, 7, 64, 129])
def test_pack_unpack_round_trip(bits, k):
    codes = torch.randint(0, 2 ** bits, (5, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_len(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_int4_nibble_order_matches_comfy_kitchen():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43]]  # element 2j low nibble, 2j+1 high nibble


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), (4, 128), (4, None), (2, 64)])
def test_packed_weight_is_real_and_accurate(bits, group):
    torch.manual_seed(0)
    w = torch.randn(96, 300) * 0.02
    pw = quantize_weight(w, bits, group)
    assert pw.nbytes == packed_weight_bytes(96, 300, bits, group, bits == 8)
    assert pw.qweight.numel() * pw.qweight.element_size() == 96 * packed_len(300, bits)
    assert pw.scale.dtype == torch.float16
    rel = float(((pw.dequantize() - w) ** 2).mean() / (w ** 2).mean())
    assert rel < {8: 1e-4, 4: 0.02, 2: 0.2}[bits]
    c = unpacked_codes(pw)
    assert c.shape == (96, 300)


@pytest.mark.parametrize("gran,group,sym", [("group", 64, False), ("channel", None, True), ("group", 32, True)])
def test_the_mse_search_in_blocks_of_rows_equals_the_whole_tensor_search(monkeypatch, gran, group, sym):
    import mixquant.quant.quantizer as qz

    w = torch.randn(37, 200) * torch.rand(37, 1) * 3
    monkeypatch.setattr(qz, "_MSE_BLOCK", 1 << 40)
    whole = qz.calc_qparams(w, 4, gran, group, sym, "mse")
    monkeypatch.setattr(qz, "_MSE_BLOCK", 300)  # a row or two per block, and a ragged last block
    blocks = qz.calc_qparams(w, 4, gran, group, sym, "mse")
    assert torch.equal(whole.scale, blocks.scale)
    assert (whole.zero is None and blocks.zero is None) or torch.equal(whole.zero, blocks.zero)
    minmax = qz.calc_qparams(w, 4, gran, group, sym, "minmax")
    assert not torch.equal(whole.scale, minmax.scale)  # the search did clip somewhere
    # on a GPU the blocks are 64x larger (small blocks there are launch-bound), on the CPU cache-sized
    assert qz.mse_block("cpu") == qz._MSE_BLOCK and qz.mse_block("cuda:0") == qz.mse_block("meta") > 32 * qz._MSE_BLOCK
