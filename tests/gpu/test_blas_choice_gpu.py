"""blas_choice on the GPU: tune() times each (rows, weight shape) once per process, linear() under its choice
computes the same product, and the process's BLAS back-end setting is left as it was."""
import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers import blas_choice

pytestmark = pytest.mark.gpu


def test_tune_once_then_linear_under_the_choice():
    gen = torch.Generator(device="cuda").manual_seed(5)
    # Qwen3-8B's o_proj and down shapes, where the two back-ends differ most (docs/benchmarks.md), 8 copies each
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
               for n, k in [(4096, 4096)] * 8 + [(4096, 12288)] * 8]
    rows = [8, 96, 192]
    default = torch.backends.cuda.preferred_blas_library()
    blas_choice.tune(weights, rows)
    for m in rows:
        for n, k in ((4096, 4096), (4096, 12288)):
            assert (0, torch.bfloat16, m, n, k) in blas_choice._TIMED
    assert blas_choice.tune(weights, rows) == {}  # decided once per process
    assert torch.backends.cuda.preferred_blas_library() == default
    for w in (weights[0], weights[-1]):
        for m in rows:
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = F.linear(x.double(), w.double())
            err = (blas_choice.linear(x, w).double() - ref).norm() / ref.norm()
            assert err < 1e-2, (m, tuple(w.shape), blas_choice._CHOICE.get((0, torch.bfloat16, m, *w.shape)))
    assert torch.backends.cuda.preferred_blas_library() == default
