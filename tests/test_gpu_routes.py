"""The GPU's route race (kernels/gpu_routes.py): its logic with stubbed timings, and each route's numbers against the
reference, on CPU tensors (the routes are torch code that runs on either device); what needs a GPU skips without
one."""
import json

import pytest
import torch

from mixquant.kernels import dispatch, gpu_routes
from mixquant.kernels.synthetic import conv_geometry, random_call


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    path = tmp_path / "gpu_routes.json"
    monkeypatch.setenv("MIXQUANT_GPU_CACHE", str(path))
    monkeypatch.delenv("MIXQUANT_GPU_ROUTE", raising=False)
    monkeypatch.setattr(gpu_routes, "_triton_accepts", lambda op, x, call: False)  # (no GPU, no interpreter)
    gpu_routes.plan(refresh=True)
    yield path
    gpu_routes._PLAN.clear()


def _w8a8(seed=0, m=32, k=64, n=48):
    call = random_call(n, k, bits=8, a_mode="static", seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    return x, call


def test_candidates_end_with_the_float_floor(fresh):
    x, call = _w8a8()
    assert gpu_routes.candidates("linear", x, cache={}, **call) == ["int_mm", "float"]
    assert gpu_routes.candidates("linear", x, cache=None, **call) == ["float"]  # no cache: no int8 copy to keep
    g = random_call(48, 64, bits=4, group_size=32, a_mode="static")
    assert gpu_routes.candidates("linear", x, cache={}, **g) == ["float"]  # group-wise scales: no int8 GEMM
    c = random_call(16, 8 * 9, bits=8, a_mode="dynamic")
    xc = torch.randn(1, 8, 6, 6)
    assert gpu_routes.candidates("conv2d", xc, cache={}, **c, **conv_geometry()) == ["float"]


def test_the_race_keeps_the_fastest_per_shape_and_remembers_it(fresh):
    x, call = _w8a8()
    cache = {}
    seen = []

    def measure(fns):
        seen.append(sorted(fns))
        return {"int_mm": 1.0, "float": 2.0}

    assert gpu_routes.decide("linear", x, cache, call, measure=measure) == "int_mm"
    assert seen == [["float", "int_mm"]]
    assert gpu_routes.decide("linear", x, cache, call, measure=measure) == "int_mm" and len(seen) == 1  # memo
    saved = json.loads(fresh.read_text())[gpu_routes.machine_key()]
    assert list(saved.values()) == ["int_mm"]
    gpu_routes.plan(refresh=True)  # a new process: the decision comes from the file, nothing is raced
    assert gpu_routes.choose("linear", x, cache={}, **call) == "int_mm"
    assert gpu_routes.decide("linear", x, {}, call, measure=lambda f: pytest.fail("raced again")) == "int_mm"
    # another shape: the float floor wins when it is faster, so no layer runs slower than it
    x2, call2 = _w8a8(seed=1, m=4)
    assert gpu_routes.decide("linear", x2, {}, call2, measure=lambda f: {"int_mm": 3.0, "float": 2.0}) == "float"


def test_the_race_times_each_route_as_a_layer_calls_it(fresh, monkeypatch):
    """Calls streamed back to back (an eager forward's launches overlap the GPU's work: host time counts only where
    it exceeds the GPU's), and Triton's launch bound once as a layer binds it, not planned in every timed call."""
    x, call = _w8a8()
    monkeypatch.setattr(gpu_routes, "_triton_accepts", lambda op, x, call: True)
    binds, runs = [], []
    monkeypatch.setattr(dispatch, "bind_triton", lambda op, x, cache, call: (
        binds.append(op), lambda x, codes=None: runs.append("bound"))[1])
    real_run = gpu_routes.run
    monkeypatch.setattr(gpu_routes, "run", lambda op, route, x, **kw: runs.append(route) if route == "triton"
                        else real_run(op, route, x, **kw))
    seen = {}

    def race(fns, rounds, sync, target=0.0):
        seen["target"] = target
        for f in fns.values():
            f(), f()
        return {r: (0.5 if r == "triton" else 1.0) for r in fns}

    monkeypatch.setattr(gpu_routes.timing, "race", race)
    assert gpu_routes.decide("linear", x, {}, call) == "triton"
    assert seen["target"] > 0
    assert binds == ["linear"] and runs == ["triton", "bound", "bound"]  # (one checking call, then the bound one)


class OutOfResources(Exception):  # (as Triton's: an Exception, not a RuntimeError)
    pass


@pytest.mark.parametrize("error", [RuntimeError, ValueError, OutOfResources])
def test_a_failing_candidate_is_dropped(fresh, monkeypatch, error):
    x, call = _w8a8()
    real = gpu_routes.run

    def run(op, route, x, cache=None, **kw):
        if route == "int_mm":
            raise error("cuBLASLt: this shape is not supported")
        return real(op, route, x, cache=cache, **kw)

    monkeypatch.setattr(gpu_routes, "run", run)
    assert gpu_routes.decide("linear", x, {}, call, measure=lambda f: {r: 1.0 for r in f}) == "float"
    t = next(iter(gpu_routes.plan().timings_ms.values()))
    assert "int_mm (failed)" in t and "not supported" in t["int_mm (failed)"]


def test_a_bug_in_a_route_is_raised_not_recorded_as_a_loss(fresh, monkeypatch):
    """A TypeError / AttributeError in a candidate is a bug in our code, not a route this GPU cannot run: dropping it
    would save "float" for the shape in the decisions file, for every later run."""
    x, call = _w8a8()
    real = gpu_routes.run
    monkeypatch.setattr(gpu_routes, "run", lambda op, route, x, **kw: (_ for _ in ()).throw(TypeError("bad arg"))
                        if route == "int_mm" else real(op, route, x, **kw))
    with pytest.raises(TypeError):
        gpu_routes.decide("linear", x, {}, call, measure=lambda f: {r: 1.0 for r in f})
    assert not gpu_routes.plan().decisions and not fresh.exists()


def test_nothing_is_raced_while_a_graph_is_captured(fresh, monkeypatch):
    x, call = _w8a8()
    monkeypatch.setattr(gpu_routes, "_capturing", lambda: True)
    monkeypatch.setattr(gpu_routes, "shape_key", lambda *a: pytest.fail("read a GPU value (the zero point's zone)"))
    assert gpu_routes.decide("linear", x, {}, call, measure=lambda f: pytest.fail("raced")) == "int_mm"
    assert not gpu_routes.plan().decisions and not fresh.exists()


def test_a_forced_route(fresh, monkeypatch):
    monkeypatch.setenv("MIXQUANT_GPU_ROUTE", "float")
    gpu_routes.plan(refresh=True)
    x, call = _w8a8()
    assert gpu_routes.decide("linear", x, {}, call, measure=lambda f: pytest.fail("raced")) == "float"
    monkeypatch.setenv("MIXQUANT_GPU_ROUTE", "cutlass")
    with pytest.raises(ValueError, match="MIXQUANT_GPU_ROUTE"):
        gpu_routes.plan(refresh=True)


def test_a_bound_call_runs_the_decided_route_and_nothing_is_bound_during_a_capture(fresh, monkeypatch):
    """dispatch.bind on the GPU backend (#22 item 4): the route is decided (raced) once, at binding, and the bound
    call runs it without deciding again; while a graph is captured nothing is bound (the call takes the unbound path,
    which decides nothing either); a new route plan is a new dispatch.state(), so layers bind anew."""
    x, call = _w8a8()
    cache = {}
    monkeypatch.setattr(gpu_routes, "_capturing", lambda: True)
    assert gpu_routes.bind("linear", x, cache, call) is None and not gpu_routes.plan().decisions
    monkeypatch.setattr(gpu_routes, "_capturing", lambda: False)
    monkeypatch.setattr(gpu_routes.timing, "race", lambda fns, *a, **k: {"int_mm": 1.0, "float": 2.0})
    ran, real = [], gpu_routes.run
    monkeypatch.setattr(gpu_routes, "run", lambda op, route, x, **kw: (ran.append(route), real(op, route, x, **kw))[1])
    f = gpu_routes.bind("linear", x, cache, call)
    assert list(gpu_routes.plan().decisions.values()) == ["int_mm"]
    ran.clear()
    monkeypatch.setattr(gpu_routes, "decide", lambda *a, **k: pytest.fail("decided again"))
    y = f(x)
    assert ran == ["int_mm"] and torch.equal(y, real("linear", "int_mm", x, cache=cache, **call))
    before = dispatch.state()
    gpu_routes.plan(refresh=True)
    assert dispatch.state() != before


@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
def test_each_route_gives_the_reference_result(fresh, a_mode):
    call = random_call(48, 64, bits=8, a_mode=a_mode, seed=3)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    with dispatch.use_backend("reference"):
        ref = dispatch.linear(x, **call)
    for route in ("int_mm", "float"):
        got = gpu_routes.run("linear", route, x, cache={}, **call)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    c = random_call(16, 8 * 9, bits=4, group_size=24, a_mode=a_mode, seed=4)
    xc = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(4))
    with dispatch.use_backend("reference"):
        ref = dispatch.conv2d(xc, **c, **conv_geometry())
    torch.testing.assert_close(gpu_routes.run("conv2d", "float", xc, cache={}, **c, **conv_geometry()), ref)


@pytest.mark.parametrize("a_split", [None, 24])
def test_the_gpu_routes_read_nothing_back_from_the_device(a_split, monkeypatch):
    """The float and int_mm routes (cpu_ops' code, which the GPU race runs too) keep a static range's scale and zero
    point as tensors off the CPU: reading one would synchronize the GPU, and fail inside a CUDA graph capture. On
    meta tensors (no values to read) they run; with the CPU's Python numbers swapped for tensors they give the same
    values."""
    from mixquant.kernels import cpu_ops

    call = random_call(48, 64, bits=8, a_mode="static", seed=5)
    if a_split is not None:
        call.update(a_split=a_split, a_scale=call["a_scale"].reshape(-1).repeat(2) * torch.tensor([1.0, 2.0]),
                    a_zero=torch.tensor([100.0, 140.0]))
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5)) * 3
    c = random_call(16, 8 * 9, bits=8, a_mode="static", seed=6)
    xc = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(6))
    runs = {"linear float": lambda x, call, cache: cpu_ops.linear_float(x, **call),
            "linear int_mm": lambda x, call, cache: cpu_ops.linear_int_mm(x, cache=cache, **call)}
    host = {k: f(x, call, {}) for k, f in runs.items()}
    host["conv float"] = cpu_ops.conv2d_float(xc, **c, **conv_geometry())
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    for k, f in runs.items():
        assert f(x.to("meta"), meta, {}).shape == host[k].shape, k
    cm = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in c.items()}
    assert cpu_ops.conv2d_float(xc.to("meta"), **cm, **conv_geometry()).shape == host["conv float"].shape
    monkeypatch.setattr(cpu_ops, "_host_scalars", lambda x: False)
    for k, f in runs.items():
        torch.testing.assert_close(f(x, call, {}), host[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(cpu_ops.conv2d_float(xc, **c, **conv_geometry()), host["conv float"], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calls_take_the_gpu_backend():
    call = random_call(64, 128, bits=8, a_mode="static", device="cuda")
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    cache = {}
    y = dispatch.linear(x, cache=cache, **call)
    with dispatch.use_backend("reference"):
        ref = dispatch.linear(x, **call)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert dispatch.path("linear", x, cache=cache, **call).startswith("gpu:")
