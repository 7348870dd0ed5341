"""Per-layer kernel caches: what every backend keeps in the dict a quantized layer owns, and how it keys it.

A layer may pass `cache=` (a dict it owns) to kernels/dispatch.py; the backends keep data prepared from the weight
in it (the CPU int8 routes: one prepacked int8 copy; Triton: the weight column sums a static zero point needs), one
entry per slot: `cache[slot] = (key, value)`. `cache_key()` builds the key from the weight's data pointer, version
counter, shape and strides (and the scales' pointer, version and, on the CPU, a fingerprint); `cached()` adds
`cache["epoch"]`, a value the layer changes whenever its weight may have changed where pointer and version do not
show it (a new weight at a freed one's address, a write through `.data`, an inference tensor). The same dict also
counts misses (`cache["misses"]`, `cache["missed_for"]`: `weight_keeps_moving()`), and the CPU route planner keeps
its memo there (`cache["route"]`). Without a dict nothing is cached.
"""
from __future__ import annotations

import torch


def version_of(t: torch.Tensor) -> int:
    """The tensor's in-place write counter (its base's for a view; -1 for an inference tensor without one)."""
    if t.is_inference():  # views taken under torch.inference_mode() are inference tensors: no version counter
        base = t._base     # (checked first: reading `_version` raises for them, and the exception cost ~7 us)
        return base._version if base is not None and not base.is_inference() else -1
    return t._version


def fingerprint(t: torch.Tensor) -> int | None:
    """A cheap content fingerprint of a CPU tensor (the integer sum of its bits; None on other devices, where
    reading it back would synchronize). Writes through a plain tensor's `.data` (ComfyUI's copy_to_param, which swaps
    hook-scheduled LoRA weights) do not bump its version counter: caches keyed on the version add this to see them
    (a cache owner that counts such writes itself says so through cache["epoch"]; this covers the others)."""
    if t.device.type != "cpu":
        return None
    size = t.element_size()
    if size not in (1, 2, 4, 8) or not t.is_contiguous():
        t, size = t.contiguous(), t.element_size()
    return int(t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).sum())


def cache_key(qweight, scale=None, extra=()) -> tuple:
    """The key of data derived from `qweight` (and `scale`): it changes whenever they may have."""
    # `_version` changes on every in-place write (a LoRA patch through the layer's set_weight), so a patched weight is
    # never served from a stale prepack; views share their base's counter. Writes through a plain tensor's `.data` do
    # not count (unless the cache's owner counts them: cache["epoch"], see cached), so on the CPU the key also holds
    # a fingerprint of the scales, which every requantization changes (a sum over N values: microseconds).
    fp = fingerprint(scale) if scale is not None and scale.dtype == torch.float16 else None
    return (qweight.data_ptr(), version_of(qweight), tuple(qweight.shape), tuple(qweight.stride())) + (
        () if scale is None else (scale.data_ptr(), version_of(scale), fp)) + tuple(extra)


def cached(cache: dict | None, slot: str, key: tuple, build):
    """The value built for `key` in `cache[slot]` (one entry per slot). cache["epoch"], a value the cache's owner
    changes whenever its weight may have changed unseen by data pointer and version, is part of every key."""
    if cache is None:
        return build()
    key = key + (cache.get("epoch"),)
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        cache["misses"] = 0
        return hit[1]
    cache.pop(slot, None)  # free the stale one before building its replacement
    value = build()
    cache[slot] = (key, value)
    change = key[:2] + key[-1:]
    if hit is not None and cache.get("missed_for") != change:  # one miss per weight change, however many slots
        cache["misses"] = cache.get("misses", 0) + 1
        cache["missed_for"] = change
    return value


def weight_keeps_moving(cache: dict | None) -> bool:
    """True once a layer's weight has come back changed twice in a row (a low-VRAM layer copied to the device for
    every call): caching derived data for it only costs time. A LoRA patch misses once, then hits again."""
    return cache is not None and cache.get("misses", 0) >= 2


def cache_bytes(cache: dict) -> int:
    """Bytes held by a layer's kernel cache (oneDNN's opaque prepacked weights counted as numel * itemsize)."""
    total = 0

    def visit(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    for entry in cache.values():
        if isinstance(entry, tuple):
            visit(entry[1])
    return total
