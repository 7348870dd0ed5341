"""Quality metrics for quantized vs full-precision outputs. Torch only.

- ``sqnr_db``: signal-to-quantization-noise ratio of a tensor (e.g. the denoiser output) vs its FP reference,
  10*log10(sum(ref^2) / sum((test - ref)^2)); +inf when identical. MixDQ scores quality-related layers with it.
- ``psnr_db``: peak signal-to-noise ratio of images, 10*log10(data_range^2 / MSE); +inf when identical.
- ``ssim``: structural similarity (Wang et al. 2004) of image batches [B,C,H,W] with a Gaussian window, computed
  per channel over the "valid" window positions (no padding) and averaged over positions, channels, then images.
  The default window is the standard 11 px (sigma 1.5) capped at the image size; MixDQ scores content-related
  layers with a window nearly as large as the image, which ``window_size`` allows up to min(H, W) (at min(H, W)
  the window covers the whole image once: one global, Gaussian-weighted SSIM per channel).

All computations run in float64 and return Python floats.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["sqnr_db", "psnr_db", "mse", "ssim", "gaussian_window"]


def _pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref, test = torch.as_tensor(ref), torch.as_tensor(test)
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    return ref.detach().to(torch.float64), test.detach().to(device=ref.device, dtype=torch.float64)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10*log10(sum(ref^2) / sum((test-ref)^2)) in dB. +inf when test == ref exactly (also for an all-zero
    reference); -inf when the reference is all zero but the test is not; nan if either holds a nan."""
    ref, test = _pair(ref, test)
    signal = float((ref * ref).sum())
    noise = float(((test - ref) ** 2).sum())
    if math.isnan(signal) or math.isnan(noise):
        return float("nan")
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def mse(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = _pair(ref, test)
    return float(((test - ref) ** 2).mean())


def psnr_db(ref: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> float:
    """10*log10(data_range^2 / mean((test-ref)^2)) in dB over all elements; +inf when identical.
    data_range: 1.0 for images in [0,1], 2.0 for [-1,1], 255 for uint8."""
    m = mse(ref, test)
    if math.isnan(m):
        return float("nan")
    if m == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range * data_range / m)


def gaussian_window(size: int, sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian window [size, size] (sums to 1)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(ref: torch.Tensor, test: torch.Tensor, window_size: int | None = None, sigma: float | None = None,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03, per_image: bool = False):
    """SSIM of image batches [B,C,H,W] (or one image [C,H,W]) with values in [0, data_range].

    window_size: side of the Gaussian window; default 11 capped at min(H, W); any value up to min(H, W).
    sigma: Gaussian std; default 1.5 * window_size / 11 (the standard 1.5 for the 11 px window, scaled with it).
    Returns the mean SSIM over the batch (float), or a [B] tensor with per_image=True. 1.0 when identical."""
    ref, test = _pair(ref, test)
    if ref.ndim == 3:
        ref, test = ref[None], test[None]
    if ref.ndim != 4:
        raise ValueError(f"ssim expects [B,C,H,W] or [C,H,W] images, got shape {tuple(ref.shape)}")
    b, c, h, w = ref.shape
    full = min(h, w)
    win = min(11, full) if window_size is None else int(window_size)
    if not 1 <= win <= full:
        raise ValueError(f"window_size must be in [1, {full}] for {h}x{w} images, got {window_size}")
    sig = 1.5 * win / 11.0 if sigma is None else float(sigma)
    # the 2-D Gaussian is separable: a column pass then a row pass, O(win) per pixel instead of O(win^2) (MixDQ's
    # content metric uses a window nearly as large as the image: at 1024 px that is the difference between a
    # second and hours)
    g = gaussian_window(win, sig, device=ref.device).sum(1)  # the 1-D factor
    k_col = g.view(1, 1, win, 1).expand(c, 1, win, 1).contiguous()
    k_row = g.view(1, 1, 1, win).expand(c, 1, 1, win).contiguous()

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, k_col, groups=c), k_row, groups=c)  # valid positions only

    mu_x, mu_y = filt(ref), filt(test)
    sxx = filt(ref * ref) - mu_x * mu_x
    syy = filt(test * test) - mu_y * mu_y
    sxy = filt(ref * test) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    per = s.mean(dim=(1, 2, 3))
    return per.to(torch.float32) if per_image else float(per.mean())
