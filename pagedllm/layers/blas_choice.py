"""cuBLAS or cuBLASLt for a linear layer, by weight shape and rows. torch's two BLAS back-ends pick their kernels
by their own heuristics, and at some decode shapes one is much faster than the other: on an H200, Qwen3-8B's
o_proj at 96 rows took 12.8 us under cuBLASLt against 17.0 under cuBLAS, its down projection 43.0 against 51.2
at 192 rows, while elsewhere cuBLAS won (benchmarks/bench_gemm.py --layout, docs/benchmarks.md).

So at start-up the engine times both back-ends on each of the model's weight shapes at each batch size that its
decode steps are padded to (tune), and linear() then runs the faster one. A back-end is taken only if it is faster
by MARGIN, so that near-ties keep the default. The choices are kept for the process: every engine in it runs the
same kernels for the same shapes (CUDA graphs and eager mode compute the same thing)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MARGIN = 0.05  # cuBLASLt must take at most 95% of cuBLAS's time to be chosen
_CHOICE: dict[tuple, str] = {}  # (device index, dtype, rows, N, K) -> the back-end to run, where not the default
_TIMED: set[tuple] = set()  # the keys tune() has decided, whichever way


def _key(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    return (x.device.index, x.dtype, x.shape[0], *weight.shape)


@contextlib.contextmanager
def _backend(name: str):
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) under the back-end tune() chose for this shape (the default where it chose none)."""
    choice = _CHOICE.get(_key(x, weight)) if x.is_cuda and x.dim() == 2 else None
    if choice is None:
        return F.linear(x, weight, bias)
    with _backend(choice):
        return F.linear(x, weight, bias)


def _device_ms(x: torch.Tensor, weights: list[torch.Tensor], name: str, repeats: int = 3) -> float:
    """Device milliseconds of x @ w.T over all the weights (each in turn, so that the L2 holds none of them), under
    the back-end `name`: the best of `repeats` passes, each queued behind a sleeping kernel so that the host's
    launches do not count."""
    with _backend(name):
        for w in weights:  # warm-up: the back-end's heuristics and workspace
            F.linear(x, w)
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(2_000_000)  # about a millisecond: the launches below queue up behind it
            start.record()
            for w in weights:
                F.linear(x, w)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
    return best


def choose(cublas_ms: float, cublaslt_ms: float) -> str | None:
    """The back-end to run instead of the default, if any."""
    return "cublaslt" if cublaslt_ms <= (1 - MARGIN) * cublas_ms else None


def tune(weights: Iterable[torch.Tensor], rows: Iterable[int]) -> dict[tuple, str]:
    """Time cuBLAS against cuBLASLt for every distinct weight shape among `weights` (16-bit floats on a CUDA device)
    at each of `rows`, and keep the faster where it wins by MARGIN. Shapes and rows timed before in this process
    keep their choice. Returns the choices made by this call."""
    rows = list(rows)
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for w in weights:
        if w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) and w.dim() == 2:
            by_shape.setdefault((w.device.index, w.dtype, *w.shape), []).append(w)
    made = {}
    for (device, dtype, n, k), group in by_shape.items():
        for m in rows:
            key = (device, dtype, m, n, k)
            if key in _TIMED:
                continue
            x = torch.randn(m, k, device=group[0].device, dtype=dtype)
            times = [_device_ms(x, group, name) for name in ("cublas", "cublaslt")]
            choice = choose(*times)
            _TIMED.add(key)
            if choice is not None:
                _CHOICE[key] = made[key] = choice
            logger.debug("blas choice: rows %d, weight [%d, %d] x%d: cuBLAS %.3f ms, cuBLASLt %.3f ms: %s", m, n, k,
                         len(group), *times, choice or "cublas")
    if made:
        logger.info("cuBLASLt chosen for %d of %d (rows, weight shape) pairs: %s", len(made),
                    len(by_shape) * len(rows), ", ".join(f"{m}x[{n},{k}]" for _, _, m, n, k in made))
    return made
