import numpy as np
import pytest

from mixquant.quant.allocate import Infeasible, Option, brute_force, solve
from mixquant.quant.formats import LayerFormat

FMTS = [LayerFormat(2, 16, 64), LayerFormat(4, 16, 64), LayerFormat(8, 16), LayerFormat(16, 16)]


def _instance(rng, n_layers):
    options = []
    for _ in range(n_layers):
        params = int(rng.integers(100, 5000))
        k = int(rng.integers(2, 5))
        fmts = FMTS[:k]
        # losses fall with bits, at a random per-layer sensitivity
        sens = float(rng.lognormal(0, 1.5))
        opts = [Option(f, sens * 2.0 ** (-f.w_bits) * float(rng.uniform(0.5, 1.5)), f.weight_bytes(params, 1),
                       (float(rng.uniform(0, 1)) if f.w_bits == 16 else 0.0,)) for f in fmts]
        options.append(opts)
    return options


@pytest.mark.parametrize("seed", range(12))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = _instance(rng, int(rng.integers(2, 7)))
    lo = sum(min(o.cost for o in opts) for opts in options)
    hi = sum(max(o.cost for o in opts) for opts in options)
    budget = lo + float(rng.uniform(0.1, 0.9)) * (hi - lo)
    extra = (float(rng.uniform(0.2, 1.5)),) if seed % 2 else ()
    best_loss, best = brute_force(options, budget, extra)
    if best is None:
        with pytest.raises(Infeasible):
            solve(options, budget, extra)
        return
    got = solve(options, budget, extra)
    loss = sum(options[i][j].loss for i, j in enumerate(got))
    assert loss == pytest.approx(best_loss, rel=1e-6, abs=1e-12)
    assert sum(options[i][j].cost for i, j in enumerate(got)) <= budget + 1e-6


def test_infeasible_names_the_minimum():
    rng = np.random.default_rng(0)
    options = _instance(rng, 4)
    lo = sum(min(o.cost for o in opts) for opts in options)
    with pytest.raises(Infeasible) as ei:
        solve(options, lo * 0.9)
    assert ei.value.minimum == pytest.approx(lo)
    assert f"{lo:.6g}" in str(ei.value)


def test_prefers_bits_where_they_matter():
    """Two layers of equal size, one sensitive: with room for one 8-bit layer it goes to the sensitive one."""
    f4, f8 = LayerFormat(4, 16), LayerFormat(8, 16)
    mk = lambda s: [Option(f4, s * 1.0, 4.0), Option(f8, s * 0.01, 8.0)]  # noqa: E731
    assert solve([mk(0.01), mk(10.0)], budget=12.0) == [0, 1]
    assert solve([mk(10.0), mk(0.01)], budget=12.0) == [1, 0]


def test_large_instance_solves_within_budget():
    rng = np.random.default_rng(1)
    options = _instance(rng, 300)  # ~1,000 binaries, the size of an SD1.5 plan
    lo = sum(min(o.cost for o in opts) for opts in options)
    hi = sum(max(o.cost for o in opts) for opts in options)
    got = solve(options, (lo + hi) / 2)
    assert sum(options[i][j].cost for i, j in enumerate(got)) <= (lo + hi) / 2 + 1e-6
    # and it beats the greedy "everyone at the cheapest option" by a wide margin
    assert sum(options[i][j].loss for i, j in enumerate(got)) < 0.5 * sum(min(o.loss for o in opts) * 0 + opts[0].loss
                                                                           for opts in options)


def _timed(rng, n_layers):
    """Options with a measured time each: on a CPU an integer route may be slower than the float one, so the time
    is random per option, not monotone in the bits."""
    options = _instance(rng, n_layers)
    return [[Option(o.fmt, o.loss, o.cost, o.extra, float(rng.uniform(0.2, 1.5))) for o in opts] for opts in options]


def _plans(options):
    import itertools
    for combo in itertools.product(*[range(len(o)) for o in options]):
        yield [options[i][j] for i, j in enumerate(combo)]


@pytest.mark.parametrize("seed", range(16))
def test_milp_with_a_speed_limit_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    options = _timed(rng, int(rng.integers(2, 6)))
    lo = sum(min(o.cost for o in opts) for opts in options)
    hi = sum(max(o.cost for o in opts) for opts in options)
    budget = lo + float(rng.uniform(0.05, 0.95)) * (hi - lo)
    t_lo = sum(min(o.time for o in opts) for opts in options)
    t_hi = sum(max(o.time for o in opts) for opts in options)
    max_time = t_lo + float(rng.uniform(0.0, 0.8)) * (t_hi - t_lo)
    extra = (float(rng.uniform(0.2, 1.5)),) if seed % 3 == 0 else ()
    best_loss, best = brute_force(options, budget, extra, max_time)
    if best is None:
        with pytest.raises(Infeasible) as ei:
            solve(options, budget, extra, max_time=max_time)

        def ok(p):
            return all(sum(o.extra[k] for o in p) <= lim + 1e-9 for k, lim in enumerate(extra))
        within_budget = [sum(o.time for o in p) for p in _plans(options)
                         if ok(p) and sum(o.cost for o in p) <= budget + 1e-9]
        at_speed = [sum(o.cost for o in p) for p in _plans(options)
                    if ok(p) and sum(o.time for o in p) <= max_time + 1e-9]
        if within_budget:
            assert ei.value.fastest == pytest.approx(min(within_budget), rel=1e-6)
        else:
            assert ei.value.fastest is None
        if at_speed:
            assert ei.value.smallest_at_speed == pytest.approx(min(at_speed), rel=1e-6)
            assert f"{min(at_speed):.6g}" in str(ei.value)
        else:
            assert ei.value.smallest_at_speed is None and "no plan is that fast" in str(ei.value)
        return
    got = solve(options, budget, extra, max_time=max_time)
    chosen = [options[i][j] for i, j in enumerate(got)]
    assert sum(o.loss for o in chosen) == pytest.approx(best_loss, rel=1e-6, abs=1e-12)
    assert sum(o.cost for o in chosen) <= budget + 1e-6 and sum(o.time for o in chosen) <= max_time * (1 + 1e-6)


def test_a_speed_limit_changes_the_plan_where_the_small_format_is_slow():
    """Two layers; 4-bit is smaller but (on this device) slower than 8-bit: without a time limit the budget takes the
    4-bit option where it costs least quality; with a limit the plan takes the faster option instead."""
    f4, f8 = LayerFormat(4, 16, 64), LayerFormat(8, 16)
    layer = lambda s: [Option(f4, s, 4.0, (), 3.0), Option(f8, s * 0.1, 8.0, (), 1.0)]  # noqa: E731
    options = [layer(1.0), layer(5.0)]
    assert solve(options, budget=16.0) == [1, 1]
    assert solve(options, budget=12.0) == [0, 1]
    assert solve(options, budget=16.0, max_time=2.0) == [1, 1]
    with pytest.raises(Infeasible) as ei:
        solve(options, budget=12.0, max_time=2.0)
    assert ei.value.fastest == pytest.approx(4.0) and ei.value.smallest_at_speed == pytest.approx(16.0)
