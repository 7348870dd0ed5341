"""Image helpers of the hosts: the size argument, the nearest-neighbour upscale for viewing small images, and the
atomic PNG write (temporary file in the same folder, then rename). Used by the CLI, the harness and the Gradio app."""
from __future__ import annotations

import math
import os
import tempfile

from ...quant.errors import MixQuantError

VIEW_SIZE = 128


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """"WxH" -> (width, height); None -> (None, None). Both must be positive multiples of 8."""
    if not text:
        return None, None
    try:
        w, h = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise MixQuantError(f"--size {text!r} is not WxH (e.g. 512x512)") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise MixQuantError(f"--size {text}: width and height must be positive multiples of 8")
    return w, h


def upscale_for_viewing(image, target: int = VIEW_SIZE):
    """Nearest-neighbour upscale by the smallest integer factor that brings the longer side to >= target;
    images already that large are returned unchanged."""
    from PIL import Image

    w, h = image.size
    if max(w, h) >= target:
        return image
    k = math.ceil(target / max(w, h))
    return image.resize((w * k, h * k), resample=Image.NEAREST)


def save_png_atomic(image, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MixQuantError(f"output folder {folder} does not exist; create it or choose another --out")
    fd, tmp = tempfile.mkstemp(prefix=".mixquant-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
