"""Timing candidates against each other, the one way every route race and speed measurement does it."""
from __future__ import annotations

import json
import math
import os
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


# --- what races decided, kept across runs ---------------------------------------------------------------------------

def decisions_file(env: str, name: str) -> str | None:
    """Where a route table lives: $`env` if set ("" = nowhere), else ~/.cache/mixquant/`name`."""
    path = os.environ.get(env)
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".cache", "mixquant", name)
    return path or None


def load_decisions(path: str | None, key: str) -> dict:
    """The decisions recorded under `key` (this machine) in `path`; {} when there are none or the file is unreadable."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            got = json.load(f).get(key, {})
        return dict(got) if isinstance(got, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def save_decisions(path: str | None, key: str, decisions: dict) -> None:
    """Record `decisions` under `key` in `path` (atomically; other machines' entries kept)."""
    if not path:
        return
    try:
        data = {}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        data[key] = decisions
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except (OSError, ValueError, TypeError):
        pass  # a read-only home only costs re-measuring next time
