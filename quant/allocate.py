"""Bit allocation as an integer program (MixDQ §5) over a menu of formats, solved with scipy's `milp`.

Binary c[i, j]: layer i takes option j of its menu; sum_j c[i, j] = 1. Minimise the summed sensitivity loss
(relative output-noise power for quality layers, 1 - SSIM for content layers: per-layer losses add up, which is
what makes the predicted curve below meaningful) subject to a budget on a cost (exact bytes, or bits x weights for
an average-bits target), optionally a limit on the summed time of the chosen options (each option's measured
seconds per denoiser call on the user's device: the plan is no slower than that limit), and optional extra linear
constraints (e.g. the share of activations kept in 16 bits).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
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
    time: float = 0.0  # measured seconds per denoiser call with this option (the speed constraint)


class Infeasible(MixQuantError):
    """No plan meets the constraints. `minimum`: the smallest feasible cost (budget) at all; with a speed limit also
    `fastest`: the least time any plan within the budget takes (None if no plan fits the budget) and
    `smallest_at_speed`: the least cost of a plan within the time limit (None if no plan is that fast)."""

    def __init__(self, message: str, minimum: float, fastest: float | None = None,
                 smallest_at_speed: float | None = None):
        super().__init__(message)
        self.minimum, self.fastest, self.smallest_at_speed = minimum, fastest, smallest_at_speed


def _values(options: list[list[Option]], key: str) -> np.ndarray:
    return np.array([getattr(o, key) for opts in options for o in opts], dtype=float)


def _milp(options: list[list[Option]], objective: np.ndarray, limits: dict, extra_limits: tuple = (),
          time_limit: float = 10.0):
    """The MILP's 0/1 solution (or None): one option per layer, sum(key) <= limit for each `limits` entry ("cost",
    "time"), the extra constraints; minimising `objective`."""
    sizes = [len(o) for o in options]
    nvar = sum(sizes)
    rows, lbs, ubs, start = [], [], [], 0
    for n in sizes:  # exactly one option per layer
        r = np.zeros(nvar)
        r[start:start + n] = 1
        rows.append(r)
        lbs.append(1)
        ubs.append(1)
        start += n
    for key, limit in limits.items():
        # rows scaled to ~1 (well conditioned); a time limit gets a relative slack (sums of measured seconds)
        scale, slack = (max(abs(limit), 1.0), 1.0) if key == "cost" else (max(abs(limit), 1e-12), 1 + 1e-9)
        rows.append(_values(options, key) / scale)
        lbs.append(-np.inf)
        ubs.append(limit / scale * slack)
    for k, lim in enumerate(extra_limits):
        rows.append(np.array([o.extra[k] for opts in options for o in opts], dtype=float))
        lbs.append(-np.inf)
        ubs.append(lim)
    with _quiet_stdout():
        res = milp(objective, constraints=LinearConstraint(np.array(rows), lbs, ubs), integrality=np.ones(nvar),
                   bounds=Bounds(0, 1), options={"time_limit": time_limit})
    return res, (None if res.x is None else np.round(res.x))


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS 1.12 prints a stray debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();") to the C stdout whatever its options say (ERGO-Code/HiGHS#2783): on the main thread (the CLI,
    scripts) fd 1 goes to /dev/null while it solves. Hosts that solve on a worker thread (ComfyUI, the WebUI, Gradio)
    keep their stdout untouched: other threads' output would be lost meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _least(options: list[list[Option]], objective: str, bound: str, limit: float, extra_limits: tuple = (),
           time_limit: float = 10.0) -> float | None:
    """The least sum of `objective` ("cost" or "time") over plans with sum(`bound`) <= limit and the extra
    constraints; None when there is none."""
    values = _values(options, objective)
    _, x = _milp(options, values, {bound: limit}, extra_limits, time_limit)
    return None if x is None else float(values @ x)


def solve(options: list[list[Option]], budget: float, extra_limits: tuple = (), time_limit: float = 10.0,
          max_time: float | None = None) -> list[int]:
    """Pick one option per layer: minimise sum(loss) with sum(cost) <= budget, sum(time) <= max_time (when given)
    and, for each extra constraint k, sum(extra[k]) <= extra_limits[k]. Returns the chosen index per layer. Raises
    Infeasible when no plan fits: it carries the smallest feasible budget and, with a speed limit, the fastest plan
    within the budget and the smallest plan at that speed (what the user can have instead). Past `time_limit`
    seconds (large models with the 16-bit-activation constraint) the best feasible plan found so far is returned."""
    if not options:
        return []
    min_cost = sum(min(o.cost for o in opts) for opts in options)
    if max_time is not None:
        fastest = _least(options, "time", "cost", budget, extra_limits, time_limit) \
            if min_cost <= budget * (1 + 1e-12) + 1e-9 else None
        if fastest is None or fastest > max_time * (1 + 1e-9) + 1e-12:
            at_speed = _least(options, "cost", "time", max_time, extra_limits, time_limit)
            quickest = sum(min(o.time for o in opts) for opts in options)
            what = (f"the smallest plan at that speed costs {at_speed:.6g}" if at_speed is not None else
                    f"no plan is that fast (the fastest takes {quickest:.6g})")
            within = (f"the fastest plan within budget {budget:.6g} takes {fastest:.6g}" if fastest is not None
                      else f"budget {budget:.6g} is below the smallest feasible {min_cost:.6g}")
            raise Infeasible(f"no plan is both within budget {budget:.6g} and within time {max_time:.6g}: {within}; "
                             f"{what}", min_cost, fastest, at_speed)
    if min_cost > budget * (1 + 1e-12) + 1e-9:
        raise Infeasible(f"budget {budget:.6g} is below the smallest feasible {min_cost:.6g}", min_cost)
    limits = {"cost": budget} if max_time is None else {"cost": budget, "time": max_time}
    res, x = _milp(options, _values(options, "loss"), limits, extra_limits, time_limit)
    if x is None:
        raise Infeasible(f"no allocation satisfies the constraints (solver: {res.message})", min_cost)
    x = x.astype(int)
    out, start = [], 0
    for n in (len(o) for o in options):
        out.append(int(np.argmax(x[start:start + n])))
        start += n
    return out


def brute_force(options: list[list[Option]], budget: float, extra_limits: tuple = (),
                max_time: float | None = None) -> tuple[float, list[int]]:
    """Exhaustive reference for small instances (tests)."""
    import itertools

    best = (float("inf"), None)
    for combo in itertools.product(*[range(len(o)) for o in options]):
        chosen = [options[i][j] for i, j in enumerate(combo)]
        if sum(o.cost for o in chosen) > budget + 1e-9:
            continue
        if max_time is not None and sum(o.time for o in chosen) > max_time + 1e-9:
            continue
        if any(sum(o.extra[k] for o in chosen) > lim + 1e-9 for k, lim in enumerate(extra_limits)):
            continue
        loss = sum(o.loss for o in chosen)
        if loss < best[0]:
            best = (loss, list(combo))
    return best
