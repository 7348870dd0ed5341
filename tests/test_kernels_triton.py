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
