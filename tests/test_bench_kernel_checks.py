"""The experimental kernels of benchmarks/ (bench_gemm.py and fused_linear.py, bench_pdl.py, bench_lean_gemv.py;
none used by the engine) stay correct: each script's --check runs them in Triton's interpreter on the CPU against
torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,min_checks", [("bench_gemm.py", 47), ("bench_pdl.py", 3),
                                               ("bench_lean_gemv.py", 3)])
def test_benchmark_kernel_check_in_interpreter(script, min_checks):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("relative error" in line for line in lines) >= min_checks and lines[-1].startswith("worst")
