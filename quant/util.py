"""Small things every host shares: prompt lists from text, images as tensors, JSON-safe values, atomic file writes."""
from __future__ import annotations

import math
import os
import tempfile
from typing import Callable

from .errors import MixQuantError


def parse_prompts(text_or_lines, required: bool = True, hint: str = "one per line") -> list[str]:
    """The prompts of a text (or a list of lines): one per line, blank lines and lines starting with # left out.
    `required`: an empty list is a MixQuantError saying how to give prompts (`hint`)."""
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else list(text_or_lines or [])
    prompts = [ln.strip() for ln in lines if ln and ln.strip() and not ln.lstrip().startswith("#")]
    if required and not prompts:
        raise MixQuantError(f"the prompt list is empty: give at least one prompt to calibrate on ({hint}).")
    return prompts


def images_to_tensor(images):
    """Images as a float [B, 3, H, W] tensor in [0, 1]: a list of PIL images (anything with `.convert`) or of
    H x W x C arrays in 0..255, or a tensor / list of tensors in [0, 1] ([N,C,H,W] or [N,H,W,C]; gray repeated)."""
    import torch

    if isinstance(images, (list, tuple)) and images and not torch.is_tensor(images[0]):
        import numpy as np

        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.float32) / 255.0
                        for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)
    x = torch.as_tensor(images if not isinstance(images, (list, tuple)) else torch.stack(list(images))).float()
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.clamp(0, 1)


def json_safe(x):
    """x with non-finite floats as "inf" / "-inf" / None (NaN), keys as strings, tuples as lists and any other object
    as its str(): json.dump never fails on it, and browsers' JSON.parse reads it."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_atomic(path: str, write: Callable[[str], None]) -> int:
    """`write(tmp)` writes the whole file to a temporary path in the same folder, which then replaces `path` in one
    step: an interrupted or failed write leaves no partial file (and any old file as it was). Returns the size."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MixQuantError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".mixquant-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)
