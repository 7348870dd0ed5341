"""Bit allocation as an integer program (MixDQ §5) over a menu of formats, solved with scipy's `milp`.

Binary c[i, j]: layer i takes option j of its menu; sum_j c[i, j] = 1. Minimise the summed sensitivity loss
(relative output-noise power for quality layers, 1 - SSIM for content layers: per-layer losses add up, which is
what makes the predicted curve below meaningful) subject to a budget on a cost (exact bytes, or bits x weights for
an average-bits target) and optional extra linear constraints (e.g. the share of activations kept in 16 bits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .errors import MixQuantError
from .formats import LayerFormat


@dataclass
class Option:
    fmt: LayerFormat
    loss: float  # sensitivity loss (>= 0, lower is better)
    cost: float  # what the budget counts (bytes, or bits x params)
    extra: tuple = ()  # coefficients of the extra constraints


class Infeasible(MixQuantError):
    def __init__(self, message: str, minimum: float):
        super().__init__(message)
        self.minimum = minimum


def solve(options: list[list[Option]], budget: float, extra_limits: tuple = (), time_limit: float = 10.0) -> list[int]:
    """Pick one option per layer: minimise sum(loss) with sum(cost) <= budget and, for each extra constraint k,
    sum(extra[k]) <= extra_limits[k]. Returns the chosen index per layer. Raises Infeasible (with the smallest
    feasible budget) when even the cheapest choice does not fit. Past `time_limit` seconds (large models with the
    16-bit-activation constraint) the best feasible plan found so far is returned."""
    if not options:
        return []
    min_cost = sum(min(o.cost for o in opts) for opts in options)
    if min_cost > budget * (1 + 1e-12) + 1e-9:
        raise Infeasible(f"budget {budget:.6g} is below the smallest feasible {min_cost:.6g}", min_cost)
    sizes = [len(o) for o in options]
    nvar = sum(sizes)
    c = np.array([o.loss for opts in options for o in opts], dtype=float)
    cost = np.array([o.cost for opts in options for o in opts], dtype=float)
    rows, lbs, ubs = [], [], []
    start = 0
    for n in sizes:  # exactly one option per layer
        r = np.zeros(nvar)
        r[start:start + n] = 1
        rows.append(r)
        lbs.append(1)
        ubs.append(1)
        start += n
    scale = max(abs(budget), 1.0)  # keep the budget row well conditioned
    rows.append(cost / scale)
    lbs.append(-np.inf)
    ubs.append(budget / scale)
    for k, limit in enumerate(extra_limits):
        rows.append(np.array([o.extra[k] for opts in options for o in opts], dtype=float))
        lbs.append(-np.inf)
        ubs.append(limit)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lbs, ubs), integrality=np.ones(nvar),
               bounds=Bounds(0, 1), options={"time_limit": time_limit})
    if res.x is None:
        raise Infeasible(f"no allocation satisfies the constraints (solver: {res.message})", min_cost)
    x = np.round(res.x).astype(int)
    out, start = [], 0
    for n in sizes:
        out.append(int(np.argmax(x[start:start + n])))
        start += n
    return out


def brute_force(options: list[list[Option]], budget: float, extra_limits: tuple = ()) -> tuple[float, list[int]]:
    """Exhaustive reference for small instances (tests)."""
    import itertools

    best = (float("inf"), None)
    for combo in itertools.product(*[range(len(o)) for o in options]):
        chosen = [options[i][j] for i, j in enumerate(combo)]
        if sum(o.cost for o in chosen) > budget + 1e-9:
            continue
        if any(sum(o.extra[k] for o in chosen) > lim + 1e-9 for k, lim in enumerate(extra_limits)):
            continue
        loss = sum(o.loss for o in chosen)
        if loss < best[0]:
            best = (loss, list(combo))
    return best
