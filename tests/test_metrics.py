import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import numpy as np
import pytest
import torch

from mixquant.quant.metrics import gaussian_window, psnr_db, sqnr_db, ssim


def test_sqnr_known_values():
    ref = torch.ones(4, 8, 8, dtype=torch.float64)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-9)  # signal N, noise 0.01 N
    assert sqnr_db(ref, ref * 0.5) == pytest.approx(10 * math.log10(4.0))  # noise 0.25 N
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g, dtype=torch.float64)
    n = torch.randn(1000, generator=g, dtype=torch.float64)
    assert sqnr_db(x, x + n) == pytest.approx(10 * math.log10(float((x * x).sum() / (n * n).sum())), rel=1e-12)
    assert sqnr_db(x, x + 0.01 * n) > sqnr_db(x, x + 0.1 * n) > sqnr_db(x, x + n)  # more noise, lower SQNR
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError):
        sqnr_db(torch.zeros(3), torch.zeros(4))


def test_psnr_known_values():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    assert psnr_db(a, a) == math.inf
    assert psnr_db(a, a + 0.1) == pytest.approx(20.0)
    assert psnr_db(a, a + 25.5, data_range=255.0) == pytest.approx(20.0)
    assert psnr_db(a, a + 0.2, data_range=2.0) == pytest.approx(20.0)


def _ssim_reference(x: np.ndarray, y: np.ndarray, win: int, sigma: float, L: float = 1.0) -> float:
    """Straight loop over window positions (Wang et al. with Gaussian weights), one [H,W] channel."""
    w = gaussian_window(win, sigma).numpy()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            px, py = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    for win in (11, 7, 16):
        sigma = 1.5 * win / 11
        expect = np.mean([_ssim_reference(x[b, c].numpy(), y[b, c].numpy(), win, sigma)
                          for b in range(2) for c in range(3)])
        assert ssim(x, y, window_size=win) == pytest.approx(expect, abs=1e-10)
    per = ssim(x, y, per_image=True)
    assert per.shape == (2,) and float(per.mean()) == pytest.approx(ssim(x, y), abs=1e-6)


def test_ssim_closed_forms():
    x = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    # two constant images: only the luminance term is left
    a, b = torch.full((1, 1, 12, 12), 0.3), torch.full((1, 1, 12, 12), 0.6)
    assert ssim(a, b) == pytest.approx((2 * 0.3 * 0.6 + c1) / (0.3 ** 2 + 0.6 ** 2 + c1), rel=1e-9)
    # mirrored contrast around the (weighted) mean, window = whole image: (c2 - 2 var) / (2 var + c2)
    w = gaussian_window(12, 1.5 * 12 / 11)
    mu = float((w * x[0, 0]).sum())
    var = float((w * (x[0, 0] - mu) ** 2).sum())
    y = 2 * mu - x
    assert ssim(x, y, window_size=12) == pytest.approx((c2 - 2 * var) / (2 * var + c2), rel=1e-9)
    with pytest.raises(ValueError):
        ssim(x, x, window_size=13)


def test_ssim_orders_damage():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 16, 16, generator=g)
    n = torch.randn(x.shape, generator=g)
    s = [ssim(x, (x + k * n).clamp(0, 1)) for k in (0.02, 0.1, 0.3)]
    assert 1.0 > s[0] > s[1] > s[2]


def test_ssim_matches_skimage_if_installed():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = skm.structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    assert ssim(x, y) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("win", [3, 11, 40, 48])
def test_ssim_with_the_separable_window_equals_the_2d_window(win):
    """ssim filters with the Gaussian's 1-D factor twice; the 2-D window (its outer product) gives the same."""
    import torch.nn.functional as F

    from mixquant.quant.metrics import gaussian_window

    g = torch.Generator().manual_seed(win)
    a = torch.rand(2, 3, 48, 52, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    k = gaussian_window(win, 1.5 * win / 11)[None, None].expand(3, 1, win, win).contiguous()

    def f(x):
        return F.conv2d(x.double(), k, groups=3)

    mx, my = f(a), f(b)
    sxx, syy, sxy = f(a * a) - mx * mx, f(b * b) - my * my, f(a * b) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))).mean())
    assert ssim(a, b, window_size=win) == pytest.approx(want, abs=1e-7)  # (float rounding of the two orders)
