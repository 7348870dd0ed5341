"""A plan that knows speed: per-layer times measured on the device (quant/speed.py), the speed target in the
integer program (quant/engine.py), and what the user is told when the budget cannot meet it. No assertion here is
about how fast anything runs (timings only feed the plan; bench/speed.py prints the ratios)."""
import itertools
import types

import pytest
import torch
import torch.nn as nn

from mixquant.quant import engine
from mixquant.quant.calibration import collect_act_ranges
from mixquant.quant.errors import MixQuantError
from mixquant.quant.formats import LayerFormat, as_format
from mixquant.quant.roles import discover_layers
from mixquant.quant.runner import DenoiserCall
from mixquant.quant.sensitivity import Sensitivity
from mixquant.quant.speed import SpeedTable, measure_speed, speed_text, timing_call

FLOAT = LayerFormat(16, 16)


def test_speed_table_arithmetic():
    sp = SpeedTable("cpu", "float32", 2, fp_call=10.0, layer_fp={"a": 2.0, "b": 3.0},
                    layer={"a": {"W8A8": 1.0}, "b": {"W8A8": 4.0}})
    assert sp.rest == pytest.approx(5.0)
    plan = {"a": as_format("W8A8"), "b": FLOAT}
    assert sp.predicted(plan) == pytest.approx(5.0 + 1.0 + 3.0)
    assert sp.predicted({"a": as_format("W8A8")}) == pytest.approx(9.0)  # a layer not in the plan stays float
    # the bound on summed layer times for "at least this speed"
    assert sp.limit(1.0) == pytest.approx(5.0)
    assert sp.limit(2.0) == pytest.approx(0.0)
    assert sp.speed_of(4.0) == pytest.approx(10.0 / 9.0)


class Tiny(nn.Module):
    """Two convs, three linears of which two share one shape (one timing serves both)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.l1 = nn.Linear(32, 64)
        self.l2 = nn.Linear(64, 64)
        self.l3 = nn.Linear(64, 64)
        self.proj_out = nn.Linear(64, 4)

    def forward(self, x):
        h = self.conv(torch.relu(self.conv_in(x)))
        h = h.flatten(2).transpose(1, 2)
        h = self.l3(torch.relu(self.l2(torch.relu(self.l1(h)))))
        return self.proj_out(h).transpose(1, 2).reshape(x.shape)


def _recorded(model, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x)
    return DenoiserCall((x,), {}, 500.0, 0, y)


def test_measure_speed_times_every_layer_in_every_format_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = Tiny().eval()
    call = _recorded(model)
    layers = discover_layers(model)
    ranges = collect_act_ranges(model, lambda: model(*call.args))
    fmts = [as_format(f) for f in ("W8A8", "W8A8d", "W4g32A16", "W8A16")]
    formats = {li.name: ([FLOAT] if li.protected else fmts + [FLOAT]) for li in layers}
    before = {n: id(m) for n, m in model.named_modules()}
    sp = measure_speed(model, call, layers, formats, ranges, {}, rounds=2)
    assert {n: id(m) for n, m in model.named_modules()} == before  # every swap undone
    with torch.no_grad():
        assert torch.equal(model(*call.args), call.output)
    assert sp.fp_call > 0 and sp.batch == 2 and sp.dtype == "float32"
    assert sp.shapes == len(layers) - 1  # l2 and l3: one shape, timed once
    assert set(sp.layer_fp) == {li.name for li in layers} and all(t > 0 for t in sp.layer_fp.values())
    for li in layers:
        assert set(sp.layer[li.name]) == (set() if li.protected else {f.name for f in fmts})
        assert all(t > 0 for t in sp.layer[li.name].values())
    assert sp.layer["l2"] == sp.layer["l3"] and sp.layer_fp["l2"] == sp.layer_fp["l3"]
    assert set(sp.in_place) == {f.name for f in fmts} | {"float"}
    assert all(0.25 <= v <= 4 for v in sp.in_place.values())
    # the float layers and the rest add up to the float call
    assert sp.rest >= 0 and sp.rest + sum(sp.layer_fp.values()) == pytest.approx(sp.fp_call)
    plan = {li.name: FLOAT if li.protected else fmts[0] for li in layers}
    assert sp.predicted(plan) > 0


def test_timing_call_cuts_a_calibration_batch_to_one_guided_image():
    model = Tiny().eval()
    call = _recorded(model, batch=6)
    c = timing_call([call])
    assert c.args[0].shape[0] == 2 and c.output.shape[0] == 2
    assert timing_call([_recorded(model, batch=2)]).args[0].shape[0] == 2
    # a transformer's call passes its inputs by keyword (diffusers' Flux: hidden_states=..., timestep=...)
    kw = DenoiserCall((), {"x": call.args[0]}, 500.0, 0, call.output)
    c = timing_call([kw], batch=1)
    ref = timing_call([call], batch=1)
    assert c.kwargs["x"].shape[0] == 1 and torch.equal(c.kwargs["x"], ref.args[0]) and torch.equal(c.output, ref.output)


# --- the speed target in the plan, on stubbed times ---------------------------------------------------------------

class Five(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 64) for _ in range(5)])


def _cfg(**kw):
    """(the toy model is Linear layers only, which `a_mode` auto would take for a diffusion transformer's; these
    tables are of static 8-bit activations)"""
    return engine.QuantizeConfig(a_mode="static", **kw)


QUANT = {"W8A8": 0.5, "W8A16": 1.5, "W4g64A8": 2.0, "W4g64A16": 2.5}  # seconds; the float layer takes 1


def _prepared(quant_times=QUANT, fp_call=10.0):
    model = Five()
    layers = discover_layers(model, protect=())  # no layer protected: 5 x 64 x 64 weights
    g = torch.Generator().manual_seed(1)
    loss = {li.name: {"W4g64A16": float(torch.rand((), generator=g)) * 0.1, "W8A16": 0.001,
                      "W16A8": float(torch.rand((), generator=g)) * 0.02} for li in layers if not li.protected}
    sens = Sensitivity(loss, {li.name: li.role for li in layers})
    sp = SpeedTable("stub", "float32", 2, fp_call, {li.name: 1.0 for li in layers},
                    {li.name: dict(quant_times) for li in layers if not li.protected})
    calib = types.SimpleNamespace(act_elements={li.name: 100 for li in layers})
    return model, layers, sens, sp, calib


def _brute(prob, opts, budget, max_time):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in opts]):
        chosen = [opts[i][j] for i, j in enumerate(combo)]
        if sum(o.cost for o in chosen) > budget + 1e-9 or sum(o.time for o in chosen) > max_time + 1e-9:
            continue
        loss = sum(o.loss for o in chosen)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, combo)
    return best


# float layers take 1 s each and the rest of the call 5 s: W8A8 saves 0.5 s a layer, a W4A8 layer costs 1 s more, so
# at 1x at most one layer can be W4 (the smallest plan at 1x: one W4A8 and four W8A8, 7.2 bits on average)
@pytest.mark.parametrize("bits", [7.5, 8.0, 10.0])
def test_plan_at_the_speed_target_equals_brute_force(bits):
    model, layers, sens, sp, calib = _prepared()
    cfg = _cfg(avg_w_bits=bits)
    prob = engine.problem(layers, cfg, calib, sens, model, sp)
    assert prob.a16_limit is None  # measured times replace the 16-bit activation share
    assert all(FLOAT in fmts for fmts in prob.options)  # every layer may stay float
    plan = prob.solve(sens, 0.5)
    opts = prob.build(sens, 0.5)
    loss, combo = _brute(prob, opts, prob.budget_cost, sp.limit(1.0))
    got = [[o.fmt for o in opts[i]].index(plan[li.name]) for i, li in enumerate(layers)]
    assert sum(opts[i][j].loss for i, j in enumerate(got)) == pytest.approx(loss, abs=1e-12)
    assert sp.predicted(plan) <= sp.fp_call * (1 + 1e-9)
    assert prob.shortfall is None
    summary = prob.speed_summary(plan)
    assert summary["met"] and summary["predicted_speed"] >= 1 - 1e-9


def test_the_speed_target_changes_the_plan():
    """W8A16 is slower than float here: untimed (with no cap on 16-bit activations) the least-loss plan is W8A16
    everywhere; timed, the plan keeps to formats that make the whole no slower than float."""
    model, layers, sens, sp, calib = _prepared()
    untimed = engine.problem(layers, _cfg(avg_w_bits=8, speed="off", a16_share=1.0), calib, sens,
                             model, sp)
    plain = untimed.solve(sens, 0.5)  # W8A16 everywhere (least loss), 1.5x the float layers' time
    assert sp.predicted(plain) > sp.fp_call
    timed = engine.problem(layers, _cfg(avg_w_bits=8), calib, sens, model, sp).solve(sens, 0.5)
    assert sp.predicted(timed) <= sp.fp_call * (1 + 1e-9) and timed != plain


def test_budget_that_cannot_meet_the_speed_is_planned_near_the_fastest_and_says_what_can():
    model, layers, sens, sp, calib = _prepared()
    cfg = _cfg(avg_w_bits=4.2)  # W4 somewhere is needed, and every W4 is slower than float
    prob = engine.problem(layers, cfg, calib, sens, model, sp)
    plan = prob.solve(sens, 0.5)
    opts = prob.build(sens, 0.5)
    fastest = _brute(prob, [[o.__class__(o.fmt, o.time, o.cost) for o in op] for op in opts], prob.budget_cost,
                     float("inf"))[0]  # least summed time within the budget (time as the loss)
    layer_time = sum(sp.time(n, f) for n, f in plan.items())
    assert layer_time <= fastest * engine.SPEED_SLACK * (1 + 1e-9)
    assert prob.shortfall is not None
    summary = prob.speed_summary(plan)
    assert not summary["met"] and summary["predicted_speed"] < 1
    # the smallest plan at 1x, by brute force over sizes: W8A8 where it is not protected (W8A16 and W4 are slower)
    params = sum(li.params for li in layers)
    sizes = []
    for combo in itertools.product(*[range(len(o)) for o in opts]):
        chosen = [opts[i][j] for i, j in enumerate(combo)]
        if sum(o.time for o in chosen) <= sp.limit(1.0) + 1e-9:
            sizes.append(sum(o.cost for o in chosen))
    assert min(sizes) / params == pytest.approx(7.2)
    want = f"an average of {min(sizes) / params:.2f} weight bits"
    assert summary["smallest_at_speed"] == want and want in summary["note"]
    assert "fastest within the budget runs at" in summary["note"]
    # the same budget with the speed required: one clear error naming both
    req = engine.problem(layers, _cfg(avg_w_bits=4.2, speed="require"), calib, sens, model, sp)
    with pytest.raises(MixQuantError, match="smallest plan at 1x is an average of") as e:
        req.solve(sens, 0.5)
    assert "Lower the minimum speed" in str(e.value)


def test_when_no_layer_is_faster_quantized_only_the_float_model_is_named():
    slow = {k: 3.0 for k in QUANT}
    model, layers, sens, sp, calib = _prepared(slow)
    prob = engine.problem(layers, _cfg(avg_w_bits=8), calib, sens, model, sp)
    plan = prob.solve(sens, 0.5)
    assert "only the float model itself runs that fast" in prob.speed_summary(plan)["note"]


def test_speed_off_plans_as_before():
    model, layers, sens, sp, calib = _prepared()
    cfg = _cfg(avg_w_bits=6, speed="off")
    prob = engine.problem(layers, cfg, calib, sens, model, sp)
    assert prob.speed is None and prob.a16_limit is not None
    assert not any(FLOAT in fmts for fmts in prob.options)
    assert prob.speed_summary(prob.solve(sens, 0.5)) is None


def test_speed_settings_are_checked():
    for bad in (dict(speed="fast"), dict(min_speed=0), dict(min_speed=float("inf")), dict(min_speed=-1)):
        with pytest.raises(MixQuantError):
            _cfg(avg_w_bits=4, **bad).check()


def test_speed_text():
    sp = {"device": "cpu X", "dtype": "float32", "batch": 2, "predicted_speed": 1.234, "min_speed": 1.0, "met": True}
    assert speed_text(sp) == "speed vs float on cpu X (float32, batch 2): predicted 1.23x; target 1x met"
    sp.update(met=False, note="At this budget ...", measured_speed=0.5, measured_ms=20.0, measured_fp_ms=10.0)
    assert speed_text(sp).endswith("measured 0.50x (20.0 ms vs 10.0 ms); target 1x not met\nAt this budget ...")
