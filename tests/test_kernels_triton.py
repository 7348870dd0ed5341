"""Runs tests/test_kernels_triton_cases.py under the Triton interpreter (TRITON_INTERPRET=1) in a subprocess.

The variable has to be set before Triton is imported, and setting it in this process would also send CPU tensors
of every other test to the interpreter; a subprocess keeps both apart. Skips when Triton is not installed.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreting: the cases run here")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", MIXQUANT_CPU_CACHE="")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                        os.path.join(HERE, "test_kernels_triton_cases.py")],
                       env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail  # (5 would mean that nothing was collected)


def test_overhead_bench_runs():
    """bench/overhead.py (host-side cost of a Triton-path call, launches stubbed) runs and fills its table."""
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "bench", "overhead.py"), "--calls", "3"],
                       cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TRITON_INTERPRET="1", MIXQUANT_CPU_CACHE=""))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| linear") or ln.startswith("| conv")]
    assert len(rows) >= 4 and all(float(ln.split("|")[2]) > 0 for ln in rows), r.stdout[-2000:]
