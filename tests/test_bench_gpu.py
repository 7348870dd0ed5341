"""bench/gpu.py, the one command of the GPU checks: its orchestration (steps in their own processes under time
limits, one table file) checked here with stand-in steps; the steps themselves need a GPU."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(HERE, "..", "bench", "gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    g = _gpu()
    monkeypatch.setattr(g, "device_line", lambda: "")
    assert g.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    assert g.main(["--only", "kernels,nope"]) == 2
    assert g.main(["--list"]) == 0 and sum(s[2] for s in g.STEPS) <= 480  # the steps' limits fit 8 minutes
    assert all(s[2] <= 570 for s in g.EXTRA)  # each extra step fits one device call (10 minutes)
