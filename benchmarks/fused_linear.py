"""An experiment, not wired into the engine: a Triton linear layer for decode's few rows with the op before it fused
in, RMSNorm (+ residual add) before the qkv and gate_up projections and SiLU-and-mul before the down projection, so
that a decoder layer runs four kernels instead of seven. bench_gemm.py --fused measures it against what the engine
runs (cuBLAS with the separate norm and SiLU kernels); on an H200 it lost at every batch size but one
(docs/benchmarks.md, "A fused linear layer for small batches"). The engine's fusion for steps of one or two
tokens is now the GEMV's (pagedllm/layers/triton_gemv.py: the rms applied after the loop, SiLU-and-mul in gate_up's
epilogue); this file stays as the record of the first attempt, which bench_gemm.py --fused still runs.

Each program computes a [BLOCK_M, BLOCK_N] tile of the output over its share of K:
- RMSNorm prologue: a first pass over the whole row (M x K, a few KiB, from L2) gives each row's rms; the tiles of
  the main loop are normalised as they are loaded. With a residual, h = x + residual is the normalised input and
  the program of output tile 0 writes it out as the next residual.
- SiLU-and-mul prologue: x holds [gate | up]; the loaded tiles are silu(gate) * up.
- K is split over programs when N alone gives too few of them (float32 partial sums, then a reduce kernel).

It rounds where the engine's kernels round (pagedllm/layers/triton_ops.py): the residual sum, the normalised value
and the SiLU output to the activation dtype. The sum of squares is taken in another order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import dot_precision, num_sms

NONE, RMS_NORM, SILU_MUL = 0, 1, 2


@triton.jit
def _raw_tiles(x_rows, r_rows, K, ks, mask, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The loaded tiles a prologue starts from: (x, residual) for RMSNorm (x twice without a residual), (gate, up)
    for SiLU-and-mul."""
    t1 = tl.load(x_rows + ks[None, :], mask=mask, other=0.0)
    if PROLOGUE == 2:
        t2 = tl.load(x_rows + K + ks[None, :], mask=mask, other=0.0)
    elif HAS_RESIDUAL:
        t2 = tl.load(r_rows + ks[None, :], mask=mask, other=0.0)
    else:
        t2 = t1
    return t1, t2


@triton.jit
def _linear_kernel(x_ptr, res_ptr, new_res_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr,
                   M, N, K, stride_x, stride_r, stride_nr, stride_w, stride_o, stride_split, eps,
                   PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   PREFETCH: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    r_rows = res_ptr + rows[:, None].to(tl.int64) * stride_r
    dtype = x_ptr.dtype.element_ty

    # A prologue's tiles feed elementwise code before the dot, and Triton's pipeliner does not prefetch such loads:
    # with PREFETCH they are loaded one iteration ahead, so that an iteration need not wait a memory latency.
    if PROLOGUE == 1:  # the rms of each whole row, before this program's share of K
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        written_rows = M * ((pid_n + split) == 0).to(tl.int32)  # the next residual: output tile 0's program
        ks = tl.arange(0, BLOCK_K)
        if PREFETCH:
            t1, t2 = _raw_tiles(x_rows, r_rows, K, ks, row_mask[:, None] & (ks[None, :] < K), 1, HAS_RESIDUAL)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (ks[None, :] < K)
            if PREFETCH:
                nks = ks + BLOCK_K
                n1, n2 = _raw_tiles(x_rows, r_rows, K, nks, row_mask[:, None] & (nks[None, :] < K), 1, HAS_RESIDUAL)
            else:
                t1, t2 = _raw_tiles(x_rows, r_rows, K, ks, mask, 1, HAS_RESIDUAL)
            h = t1
            if HAS_RESIDUAL:
                h = (t1 + t2).to(dtype)
                tl.store(new_res_ptr + rows[:, None].to(tl.int64) * stride_nr + ks[None, :], h,
                         mask=(rows[:, None] < written_rows) & (ks[None, :] < K))
            hf = h.to(tl.float32)
            sum_sq += tl.sum(hf * hf, 1)
            if PREFETCH:
                t1, t2 = n1, n2
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)

    per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = split * per_split
    k_end = tl.minimum(k_start + per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PROLOGUE != 0 and PREFETCH:
        ks = k_start + tl.arange(0, BLOCK_K)
        t1, t2 = _raw_tiles(x_rows, r_rows, K, ks, row_mask[:, None] & (ks[None, :] < k_end), PROLOGUE,
                            HAS_RESIDUAL)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        mask = row_mask[:, None] & k_mask[None, :]
        if PROLOGUE != 0:
            if PREFETCH:
                nks = ks + BLOCK_K
                n1, n2 = _raw_tiles(x_rows, r_rows, K, nks, row_mask[:, None] & (nks[None, :] < k_end), PROLOGUE,
                                    HAS_RESIDUAL)
            else:
                t1, t2 = _raw_tiles(x_rows, r_rows, K, ks, mask, PROLOGUE, HAS_RESIDUAL)
        if PROLOGUE == 1:
            h = t1
            if HAS_RESIDUAL:
                h = (t1 + t2).to(dtype)
            normed = (h.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
            nw = tl.load(norm_w_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            a = (normed * nw[None, :]).to(dtype)
        elif PROLOGUE == 2:  # x is [gate | up], K columns each
            gate = t1.to(tl.float32)
            a = ((gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * t2.to(tl.float32)).to(dtype)
        else:
            a = tl.load(x_rows + ks[None, :], mask=mask, other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :],
                    mask=(cols[:, None] < N) & k_mask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b).to(dtype), input_precision=PRECISION)
        if PROLOGUE != 0 and PREFETCH:
            t1, t2 = n1, n2

    mask = row_mask[:, None] & (cols[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partial sums [SPLIT_K, M, N]
        dst = out_ptr + split.to(tl.int64) * stride_split + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(dst, acc, mask=mask)


@triton.jit
def _reduce_splits_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_o,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


def choose_config(m: int, n: int, k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K): tiles of N narrow enough, and K split often enough, that the programs
    fill at least half the SMs; each split keeps at least 512 columns of K. From bench_gemm.py's sweep on an H200,
    where these were the fastest or within a few percent of it for Qwen3-0.6B's and Qwen3-8B's shapes."""
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    target = max(1, num_sms(device) // 2)
    block_n = 64 if triton.cdiv(n, 64) >= target else 32
    split = 1
    while triton.cdiv(n, block_n) * split < target and k // (split * 2) >= 512:
        split *= 2
    block_k = 256 if k // split > 1024 else 128
    return block_m, block_n, block_k, split


def _num_stages(block_m: int, block_n: int, block_k: int, elem: int) -> int:
    """Up to 4 stages of the K loop in flight, as many as about 160 KiB of shared memory holds."""
    return max(1, min(4, (160 << 10) // ((block_m + block_n) * block_k * elem)))


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
                 silu_mul: bool = False, config: tuple[int, int, int, int] | None = None,
                 num_warps: int = 4, prefetch: bool = True):
    """y = prologue(x) @ weight.T (+ bias), for x [M, K'] with contiguous rows and weight [N, K].
    - norm_weight: prologue RMSNorm(x) with eps; with residual, RMSNorm(x + residual), and returns (y, x + residual)
      as RMSNorm.forward(x, residual) followed by the linear layer would.
    - silu_mul: x is [gate | up] (K' = 2K) and the prologue is silu(gate) * up.
    config, num_warps and prefetch override the defaults (tests, benchmarks)."""
    if x.dim() != 2 or weight.dim() != 2 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"fused_linear: expected x [M, K] and weight [N, K] with contiguous rows, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if norm_weight is not None and silu_mul:
        raise ValueError("fused_linear: RMSNorm and SiLU-and-mul prologues are exclusive")
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    if x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"fused_linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}"
                         + (" (x must be [gate | up])" if silu_mul else ""))
    if weight.dtype != x.dtype:
        raise ValueError(f"fused_linear: weight {weight.dtype} and x {x.dtype} must share a dtype")
    if residual is not None and (norm_weight is None or residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError("fused_linear: a residual needs norm_weight and x's shape")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(m, k, dtype=x.dtype, device=x.device) if residual is not None else None
    if m > 0:
        block_m, block_n, block_k, split = config or choose_config(m, n, k, x.device)
        if config is None and x.dtype == torch.float32:  # 4-byte tiles: smaller K steps fit shared memory
            block_k = 64
        grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
        target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        prologue = RMS_NORM if norm_weight is not None else SILU_MUL if silu_mul else NONE
        res = residual if residual is not None else x
        _linear_kernel[grid](
            x, res, new_residual if new_residual is not None else x, norm_weight if norm_weight is not None else x,
            weight, bias if bias is not None else weight, target,
            m, n, k, x.stride(0), res.stride(0), k, weight.stride(0), out.stride(0), m * n, eps,
            PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None and split == 1,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, PREFETCH=prefetch,
            PRECISION=dot_precision(x.dtype), num_warps=num_warps,
            num_stages=_num_stages(block_m, block_n, block_k, x.element_size()),
        )
        if split > 1:
            block = min(1024, triton.next_power_of_2(n))
            _reduce_splits_kernel[(triton.cdiv(n, block), m)](
                target, bias if bias is not None else target, out, m, n, out.stride(0),
                SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
            )
    if residual is not None:
        return out, new_residual
    return out
