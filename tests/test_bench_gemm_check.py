"""The experimental GEMM kernels of benchmarks/bench_gemm.py and benchmarks/fused_linear.py (not used by the engine)
stay correct: their --check runs them in Triton's interpreter on the CPU against torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_gemm_check_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "benchmarks/bench_gemm.py", "--check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("relative error" in line for line in lines) >= 30 and lines[-1].startswith("worst")
