"""bench/gpu.py, the one command of the GPU checks: its orchestration (steps in their own processes under time
limits, one table file) checked here with stand-in steps; the steps themselves need a GPU."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, "..", "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gpu():
    return _bench("gpu")


def test_steps_run_in_their_own_process_and_land_in_one_table(tmp_path):
    g = _gpu()
    out = str(tmp_path)
    ok = ("ok", "#22", 30, "writes a table", ["-c", "import sys; open(sys.argv[2], 'w').write('| a |\\n|---|\\n| 1 |')",
                                              "--out", "{out}/ok.md"])
    slow = ("slow", "#21", 30, "hangs", ["-c", "import time; time.sleep(30)"])
    bad = ("bad", "#23", 30, "fails", ["-c", "import sys; print('boom'); sys.exit(3)", "--out", "{out}/none.md"])
    results = [g.run_step(ok, out, 20), g.run_step(slow, out, 1.5), g.run_step(bad, out, 20)]
    assert [r["rc"] for r in results] == [0, "timeout", 3]
    assert results[1]["seconds"] < 10
    path = g.write(results, out, "NVIDIA Test GPU, 80 GiB, compute capability 9.0; torch x")
    assert os.path.basename(g.write(results[:1], out, "NVIDIA Test GPU", "dit")) == "gpu_nvidia_test_gpu_dit.md"
    text = open(path).read()
    assert os.path.basename(path) == "gpu_nvidia_test_gpu.md"
    assert "| ok | #22 | writes a table | 0 |" in text and "| 1 |" in text  # the step's own table, inlined
    assert "| slow | #21 | hangs | timeout |" in text and "boom" in text  # a failure shows its log


def test_a_step_gets_what_the_steps_before_it_left_unused():
    g = _gpu()
    assert g.allowance(60, 480, 420) == 60  # on time: its own limit
    assert g.allowance(60, 400, 250) == 150  # 90 s left unused before it
    assert g.allowance(60, 40, 0) == 40  # never past the budget


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    g = _gpu()
    monkeypatch.setattr(g, "device_line", lambda: "")
    assert g.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    assert g.main(["--only", "kernels,nope"]) == 2
    assert g.main(["--list"]) == 0 and sum(s[2] for s in g.STEPS) <= 480  # the steps' limits fit 8 minutes
    assert [s[1] for s in g.STEPS[:4]] == ["#22", "#22", "#23", "#21"]  # the acceptance lines first


def test_host_time_per_layer_call_is_measured_on_each_layers_own_input():
    """bench/kernels.py's host time per eager layer call (#22's 15 µs line on a GPU; on a CPU the compute counts
    too): one figure per layer of the asked types, each on the input that layer gets in the forward, hooks gone
    after. A layer that takes 2 ms per call reports about that; the others far less."""
    import time

    import torch
    import torch.nn as nn

    kb = _bench("kernels")

    class Slow(nn.Linear):
        def forward(self, x):
            time.sleep(0.002)
            return super().forward(x)

    shapes = []

    class Seen(nn.Linear):
        def forward(self, x):
            shapes.append(tuple(x.shape))
            return super().forward(x)

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Seen(16, 4), Slow(4, 4), nn.LayerNorm(4))
    us = kb.host_per_call(model, (torch.randn(3, 8),), nn.Linear, calls=3, repeats=2)
    assert len(us) == 3 and all(v > 0 for v in us)
    assert us[2] >= 1500 and max(us[:2]) < 1000, us
    assert set(shapes) == {(3, 16)}  # (the second layer ran on its own input from the forward)
    assert not any(m._forward_pre_hooks for m in model.modules())
    line = kb.host_line({"FP16": us, "W8A8": []})
    assert "FP16" in line and "over 3 layers" in line and "W8A8 –" in line


def test_route_counts_name_the_implementation_of_every_quantized_call():
    """bench/kernels.py's routes line under the UNet table: one count per packed call of one forward (a BOS split's
    two calls count twice), each named as dispatch.path names it, the class left as it was."""
    import torch
    import torch.nn as nn

    from mixquant.kernels import dispatch
    from mixquant.quant.formats import LayerFormat
    from mixquant.quant.layers import QuantLayer, QuantLinear

    kb = _bench("kernels")
    torch.manual_seed(0)
    layers = [QuantLinear.from_float(nn.Linear(64, 64), LayerFormat(8, 8, None, "dynamic")) for _ in range(3)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2], nn.Linear(64, 8))
    x = torch.randn(4, 64)
    packed_call = QuantLayer._packed_call
    counts = kb.route_counts(model, (x,))
    assert sum(counts.values()) == 3 and QuantLayer._packed_call is packed_call
    assert not any("raced" in route for route in counts)  # (the route each call took, not the candidates)
    with torch.no_grad():
        assert set(counts) == {dispatch.path("linear", x, **layers[0]._kernel_args(layers[0].weight, layers[0].bias,
                                                                                    x.device))}


def test_host_profile_names_where_a_layer_calls_time_goes():
    """The profile bench/kernels.py writes beside the host time (what #22 asks for where the figure falls short):
    a table of functions with their share, the slow layer's own function on top."""
    import time

    import torch
    import torch.nn as nn

    kb = _bench("kernels")

    def napping(x):
        time.sleep(0.001)
        return x

    class Slow(nn.Linear):
        def forward(self, x):
            return super().forward(napping(x))

    model = nn.Sequential(nn.Linear(8, 4), Slow(4, 4))
    rows = kb.host_profile(model, (torch.randn(3, 8),), nn.Linear, calls=3)
    assert rows[0].startswith("| function |") and len(rows) > 3
    assert "sleep" in rows[2] or "napping" in rows[2], rows[:4]
    assert not any(m._forward_pre_hooks for m in model.modules())
