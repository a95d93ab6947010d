"""Running Triton kernels on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is
imported, so a test file runs its checks in a child process: the file, executed as a script, calls child_main with
its check functions, which print one JSON line per check through emit(); the test calls run_checks(__file__)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_CODE = 77  # the child's "interpreter unusable here" exit status


def child_main(*check_fns) -> int:
    """In the child: a smoke kernel (exit SKIP_CODE if the interpreter cannot run it), then each check_fn(emit)."""
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def _smoke(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        probe = torch.zeros(16)
        _smoke[(1,)](probe, BLOCK=16)
        if not bool((probe == 1).all()):
            raise RuntimeError("interpreter smoke kernel gave a wrong result")
    except Exception as exc:  # the interpreter itself is unusable: the parent skips
        print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"}), flush=True)
        return SKIP_CODE

    def emit(name: str, **fields) -> None:
        print(json.dumps({"name": name, **fields}), flush=True)

    for check in check_fns:
        check(emit)
    return 0


def run_checks(script: str, timeout: int = 240) -> list[dict]:
    """In the test: run the script under the interpreter and return its JSON lines (skips where it cannot run)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == SKIP_CODE:
        pytest.skip(f"Triton interpreter unavailable: {lines[0]['skip'] if lines else proc.stderr[-300:]}")
    assert proc.returncode == 0, f"interpreter checks crashed:\n{proc.stderr[-3000:]}"
    return lines
