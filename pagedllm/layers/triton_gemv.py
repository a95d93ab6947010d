"""A Triton matrix-vector product for steps of a few tokens: out = x @ w.T (+ bias) for x [M, K], M <= 16 (the
model's Linear calls it up to linear.GEMV_MAX_ROWS rows, where it measured faster than cuBLAS).

At a few rows, a linear layer only streams its weight from HBM. On a chain of Qwen3-8B's four layer matmuls at
batch 1, cuBLAS reached 86% of the copy bandwidth and this kernel 91% (benchmarks/bench_pdl.py on an H200: 107.9
against 102.1 us a layer; Qwen3-0.6B's 29.6 against 25.5). Each program owns BLOCK_N output columns and walks K in
BLOCK_K steps, Triton's pipeliner keeping several weight tiles in flight; the rows are padded to 16 for tl.dot.

Two fusions spare a decoder layer three small kernels a step:
- RMSNorm (+ residual add) before the product (qkv and gate_up): the loop multiplies each loaded x tile by the norm
  weight and sums its squares; the rms scales the accumulator after the loop, so there is no first pass over the
  row. The x tiles feed elementwise code, which Triton's pipeliner does not prefetch, so the loop loads them one
  step ahead itself. With a residual, x + residual is normalised and program 0 writes it out as the next residual.
- SiLU-and-mul after it (gate_up, weight [gate; up]): a program computes BLOCK_N gate columns and the matching up
  columns and writes silu(gate) * up.
They round where the unfused kernels round (triton_ops.py) except for the norm: the unfused code rounds x * rstd
to the activation dtype, the fused one x * weight, and applies rstd in fp32.

On Hopper the GEMV is launched with programmatic dependent launch: its programs may start while the kernel before
finishes, wait for it (gdc_wait) before reading anything, and let the next kernel launch once their main loop is
done. Batch-1 decode of Qwen3-8B measured 4.34 ms against 4.36 without, twice each, alternating in one call on an
H200 (docs/benchmarks.md, stop 19).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import dot_precision, supports_pdl

MAX_ROWS = 16  # the rows of tl.dot's A tile: calls of up to 16 rows


@triton.jit
def _x_tiles(x_rows, r_rows, norm_ptr, kk, row_mask, K, HAS_RESIDUAL: tl.constexpr):
    """One K step's loads of the normalised input: x, the residual (x again without one) and the norm weight."""
    mask = row_mask & (kk[None, :] < K)
    x = tl.load(x_rows + kk[None, :], mask=mask, other=0.0)
    r = x
    if HAS_RESIDUAL:
        r = tl.load(r_rows + kk[None, :], mask=mask, other=0.0)
    g = tl.load(norm_ptr + kk, mask=kk < K, other=0.0)
    return x, r, g


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, new_res_ptr, norm_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, up_offset,
                 stride_x, stride_r, stride_nr, stride_w, stride_o, eps,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 USE_GDC: tl.constexpr):
    if USE_GDC:  # launched early (programmatic dependent launch): wait for the kernel before, whose output is x
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    r_rows = res_ptr + rows[:, None] * stride_r
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    up_rows = w_rows + up_offset  # SILU_MUL: the up half of the weight, N rows further
    row_mask = rows[:, None] < M
    col_mask = cols[:, None] < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    if NORM:  # the first step's input tiles; each step then loads the next one's ahead of its own work
        x_next, r_next, g_next = _x_tiles(x_rows, r_rows, norm_ptr, ks, row_mask, K, HAS_RESIDUAL)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_mask = kk[None, :] < K
        if NORM:
            x, r, g = x_next, r_next, g_next
            x_next, r_next, g_next = _x_tiles(x_rows, r_rows, norm_ptr, kk + BLOCK_K, row_mask, K, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                x = (x + r).to(dtype)  # rounded to the activation dtype, as the unfused add is
                if pid == 0:
                    tl.store(new_res_ptr + rows[:, None] * stride_nr + kk[None, :], x, mask=row_mask & k_mask)
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, 1)
            a = (xf * g.to(tl.float32)[None, :]).to(dtype)
        else:
            a = tl.load(x_rows + kk[None, :], mask=row_mask & k_mask, other=0.0)
        b = tl.load(w_rows + kk[None, :], mask=col_mask & k_mask, other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        if SILU_MUL:
            b_up = tl.load(up_rows + kk[None, :], mask=col_mask & k_mask, other=0.0)
            acc_up += tl.dot(a, tl.trans(b_up), input_precision=PRECISION)
    if USE_GDC:  # the next kernel may launch now; it waits for this one to finish before it reads
        tl.extra.cuda.gdc_launch_dependents()
    if NORM:
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
        acc *= rstd[:, None]
        acc_up *= rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:  # rounded as F.silu(gate) * up rounds: the gate, the up, then silu(gate), then the product
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
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
         config: tuple[int, int, int, int] | None = None, norm: tuple[torch.Tensor, float] | None = None,
         residual: torch.Tensor | None = None, silu_and_mul: bool = False):
    """x [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N] in x's dtype, accumulated in fp32; 1 <= M <= 16.

    norm=(norm_weight [K], eps): RMSNorm(x) is the input; with residual [M, K], RMSNorm(x + residual) is, and the
    call returns (out, x + residual). silu_and_mul: weight is [gate; up] ([2I, K]) and out is silu(gate) * up
    [M, I]. The config is that of the unfused product ([2I, K] for silu_and_mul, split into two halves)."""
    if not supports(x, weight):
        raise ValueError(f"gemv: needs x [M <= {MAX_ROWS}, K] and weight [N, K] of one float dtype with contiguous "
                         f"rows, got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"gemv: x has {x.shape[1]} columns, weight {k}")
    if residual is not None and (norm is None or residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1):
        raise ValueError(f"gemv: a residual needs a norm and x's shape and dtype, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    if norm is not None and norm[0].shape != (k,):
        raise ValueError(f"gemv: norm weight {tuple(norm[0].shape)} does not match K = {k}")
    if silu_and_mul and (n % 2 or bias is not None):
        raise ValueError(f"gemv: silu_and_mul needs a weight [gate; up] of even rows and no bias, got {n} rows")
    block_n, block_k, warps, stages = config or gemv_config(n, k)
    if silu_and_mul:  # each program takes block_n weight rows in all: half from gate, half from up
        n, block_n = n // 2, max(16, block_n // 2)
    pdl = supports_pdl(x.device)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    norm_weight, eps = norm if norm is not None else (out, 0.0)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, new_residual, norm_weight, weight,
        bias if bias is not None else out, out, x.shape[0], n, k, n * weight.stride(0), x.stride(0),
        residual.stride(0) if residual is not None else 0, new_residual.stride(0), weight.stride(0),
        out.stride(0), eps,
        HAS_BIAS=bias is not None, NORM=norm is not None, HAS_RESIDUAL=residual is not None,
        SILU_MUL=silu_and_mul, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(x.dtype), USE_GDC=pdl, num_warps=warps, num_stages=stages,
        **({"launch_pdl": True} if pdl else {}))
    return (out, new_residual) if residual is not None else out
