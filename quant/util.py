"""Small things every host shares: prompt lists from text, and JSON-safe values."""
from __future__ import annotations

import math

from .errors import MixQuantError


def parse_prompts(text_or_lines, required: bool = True, hint: str = "one per line") -> list[str]:
    """The prompts of a text (or a list of lines): one per line, blank lines and lines starting with # left out.
    `required`: an empty list is a MixQuantError saying how to give prompts (`hint`)."""
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else list(text_or_lines or [])
    prompts = [ln.strip() for ln in lines if ln and ln.strip() and not ln.lstrip().startswith("#")]
    if required and not prompts:
        raise MixQuantError(f"the prompt list is empty: give at least one prompt to calibrate on ({hint}).")
    return prompts


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
