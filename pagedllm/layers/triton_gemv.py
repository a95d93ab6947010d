"""A Triton matrix-vector product for steps of a few tokens: out = x @ w.T (+ bias) for x [M, K], M <= 16 (the
model's Linear calls it up to linear.GEMV_MAX_ROWS rows, where it measured faster than cuBLAS).

At a few rows, a linear layer only streams its weight from HBM. On a chain of Qwen3-8B's four layer matmuls at
batch 1, cuBLAS reached 86% of the copy bandwidth and this kernel 91% (benchmarks/bench_pdl.py on an H200: 107.9
against 102.1 us a layer; Qwen3-0.6B's 29.6 against 25.5). Each program owns BLOCK_N output columns and walks K in
BLOCK_K steps, Triton's pipeliner keeping several weight tiles in flight; the rows are padded to 16 for tl.dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import dot_precision

MAX_ROWS = 16  # the rows of tl.dot's A tile: calls of up to 16 rows


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    row_mask = rows[:, None] < M
    col_mask = cols[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(x_rows + kk[None, :], mask=row_mask & (kk[None, :] < K), other=0.0)
        b = tl.load(w_rows + kk[None, :], mask=col_mask & (kk[None, :] < K), other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask & (cols[None, :] < N))


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the fastest of bench_gemm.py's sweep at M = 1 on an H200 for each
    of Qwen3-8B's and Qwen3-0.6B's layers, as a rule of the shape: 64 columns a program where the layer widens (qkv,
    gate_up), 32 where it narrows (o_proj, down); 128-wide K steps for the widest (gate_up), 256 elsewhere."""
    block_n = 64 if n > k else 32
    block_k = 128 if n > 4 * k else 256
    return block_n, block_k, 4, 3 if block_k == 128 else 4


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv() serves this call: 1-16 rows on a CUDA device (or Triton's interpreter on the CPU), 16- or
    32-bit floats of one dtype, contiguous rows."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype and x.stride(-1) == 1
            and weight.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.stride(1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N] in x's dtype, accumulated in fp32; 1 <= M <= 16."""
    if not supports(x, weight):
        raise ValueError(f"gemv: needs x [M <= {MAX_ROWS}, K] and weight [N, K] of one float dtype with contiguous "
                         f"rows, got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"gemv: x has {x.shape[1]} columns, weight {k}")
    block_n, block_k, warps, stages = config or gemv_config(n, k)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else out, out, x.shape[0], n, k, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    return out
