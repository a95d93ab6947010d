"""blas_choice: the rule that picks cuBLASLt over cuBLAS, and that off the GPU nothing is timed or changed."""
import torch
import torch.nn.functional as F

from pagedllm.layers import blas_choice


def test_cublaslt_only_where_faster_by_the_margin():
    assert blas_choice.choose(1.0, 0.90) == "cublaslt"
    assert blas_choice.choose(1.0, 1.0 - blas_choice.MARGIN) == "cublaslt"
    assert blas_choice.choose(1.0, 0.97) is None  # a near-tie keeps the default
    assert blas_choice.choose(1.0, 1.3) is None


def test_cpu_weights_are_not_timed_and_linear_is_f_linear():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(8, 16, generator=gen)
    assert blas_choice.tune([w, w.half()], [8, 16]) == {}
    assert not any(key[2:] == (8, 24, 16) for key in blas_choice._TIMED)
    assert torch.equal(blas_choice.linear(x, w, b), F.linear(x, w, b))
