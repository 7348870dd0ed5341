"""Timing candidates against each other, the one way every route race and speed measurement does it."""
from __future__ import annotations

import math
import time
from typing import Callable


def race(fns: dict, rounds: int = 5, sync: Callable[[], None] | None = None, target: float = 0.0) -> dict:
    """Seconds per call of each function: a warm-up call each (route races, autotuning, lazy preparation happen
    there), then `rounds` interleaved rounds, so that a noisy neighbour slows all of them alike; the best round of
    each. With `target` > 0 a round makes as many back-to-back calls as last about that long (short calls are then
    timed as a stream, host overhead included); `sync` (e.g. torch.cuda.synchronize) ends each timed stretch."""
    sync = sync or (lambda: None)
    reps = {}
    for name, fn in fns.items():
        fn()
        sync()
        if target > 0:
            t = time.perf_counter()
            fn()
            sync()
            reps[name] = max(1, min(200, int(target / max(time.perf_counter() - t, 1e-7))))
        else:
            reps[name] = 1
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) / reps[name])
    return best
