"""Could a Triton GEMM for decode's small M beat cuBLAS on the linear layers' shapes? An experiment, not wired into
the engine: on an H200 it did not, except where cuBLAS picks a poor kernel (docs/benchmarks.md).

Decode steps multiply a few rows (M = batch, 1..256) by each weight [N, K]. At Qwen3-0.6B's shapes cuBLAS takes
6.5-7.8 us per matmul at batch 256 against 1-3 us for the weights' bytes, and at Qwen3-8B's batch-1 shapes qkv and
o_proj run at 73-76% of the copy bandwidth (docs/benchmarks.md). The kernel below tiles N, splits K over programs
when the grid would be small (partial sums in float32, then a reduce-and-cast kernel), and takes its tile sizes
from a sweep.

For each shape and M: cuBLAS (F.linear) and the best Triton configuration of the sweep, each inside a replayed
CUDA graph, cycling over enough copies of the weight that the L2 cannot hold them (decode reads weights from HBM).

    python benchmarks/bench_gemm.py [--models 0.6b,8b] [--batches 1,32,256]
    python benchmarks/bench_gemm.py --fused --batches 1,8,16,32,64,128   # a whole layer, fused against unfused
    python benchmarks/bench_gemm.py --blas --batches 8,32,64,128,256     # torch.mm: cuBLAS against cuBLASLt
    python benchmarks/bench_gemm.py --roofline --batches 16,32,...,256 [--triton]   # each against its own bound
    python benchmarks/bench_gemm.py --variants --batches 128,144,...,256   # cuBLAS on the product split or padded
    python benchmarks/bench_gemm.py --layout --batches 64,128,192,256     # the weight [N, K] against [K, N]
    TRITON_INTERPRET=1 python benchmarks/bench_gemm.py --check     # correctness only, tiny shapes, on the CPU
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
import triton.language as tl

# (K, N) of qkv, o_proj, gate_up, down
SHAPES = {
    "0.6b": {"qkv": (1024, 4096), "o_proj": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)},
    "8b": {"qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)},
}
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_M is capped by M (at least 16, for tl.dot)
CONFIGS = [(m, n, k, s, w, st) for m in (16, 64) for n in (32, 64, 128) for k in (128, 256) for s in (1, 2, 4, 8)
           for w, st in ((4, 3), (4, 4))]


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k] over this program's share of K (all of it when SPLIT_K == 1, else a
    float32 partial at out + split * stride_split)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = split * per_split
    k_end = tl.minimum(k_start + per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < k_end), other=0.0)
        b = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < k_end), other=0.0)
        acc += tl.dot(a, tl.trans(b))
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    dst = out_ptr + split.to(tl.int64) * stride_split + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits_kernel(part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wide_tile(M, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """(M tile, K split, N tile) of this program: the M tiles of one N tile are neighbouring programs, so that each
    weight tile comes from HBM once and from the L2 for the others."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    return pid % num_m, (pid // num_m) % SPLIT_K, pid // (num_m * SPLIT_K)


@triton.jit
def _gemm_tc_kernel(x_ptr, w_ptr, out_ptr, M, K, stride_x, stride_w, stride_o, stride_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out = x @ w.T for K a multiple of SPLIT_K * BLOCK_K and N of BLOCK_N, so that only the rows past M are
    masked; tiles up to 128 x 256 (gemm's sweep stops at 64 x 128). SPLIT_K > 1 writes float32 partials at out +
    split * stride_split."""
    pid_m, split, pid_n = _wide_tile(M, BLOCK_M, SPLIT_K)
    k_per = K // SPLIT_K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = split * k_per + tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
    b_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    row_mask = rows[:, None] < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_per, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_mask, other=0.0)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dst = out_ptr + split.to(tl.int64) * stride_split + rows[:, None] * stride_o + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemm_tma_kernel(x_desc, w_desc, out_ptr, M, K, stride_o, stride_split, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """_gemm_tc_kernel with both operands loaded by the Tensor Memory Accelerator (rows past M read as zeros)."""
    pid_m, split, pid_n = _wide_tile(M, BLOCK_M, SPLIT_K)
    k_per = K // SPLIT_K
    k_start = split * k_per
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, k_per, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k_start + k])
        b = w_desc.load([pid_n * BLOCK_N, k_start + k])
        acc = tl.dot(a, b.T, acc)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dst = out_ptr + split.to(tl.int64) * stride_split + rows[:, None] * stride_o + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < M)


def gemm_wide(x: torch.Tensor, w: torch.Tensor, config: tuple, out: torch.Tensor | None = None,
              partial: torch.Tensor | None = None, tma: bool = False) -> torch.Tensor:
    """x @ w.T by _gemm_tc_kernel, or with tma by _gemm_tma_kernel (host-side tensor descriptors); config as gemm's.
    Raises ValueError where K or N do not divide by the tiles."""
    block_m, block_n, block_k, split_k, warps, stages = config
    (m, k), n = x.shape, w.shape[0]
    if k % (split_k * block_k) or n % block_n:
        raise ValueError(f"gemm_wide: K {k} / N {n} do not divide by {split_k * block_k} / {block_n}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    dst, stride_o = out, out.stride(0)
    if split_k > 1:
        dst = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if partial is None else partial
        stride_o = n
    grid = (triton.cdiv(m, block_m) * split_k * (n // block_n),)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps,
                 num_stages=stages)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        _gemm_tma_kernel[grid](TensorDescriptor.from_tensor(x, [block_m, block_k]),
                               TensorDescriptor.from_tensor(w, [block_n, block_k]), dst, m, k, stride_o, m * n,
                               **tiles)
    else:
        _gemm_tc_kernel[grid](x, w, dst, m, k, x.stride(0), w.stride(0), stride_o, m * n, **tiles)
    if split_k > 1:
        _reduce_splits_kernel[(triton.cdiv(m * n, 1024),)](dst, out, m * n, SPLIT_K=split_k, BLOCK=1024)
    return out


def gemm(x: torch.Tensor, w: torch.Tensor, config: tuple, out: torch.Tensor | None = None,
         partial: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T -> [M, N] in x's dtype. partial: a float32 [SPLIT_K, M, N] workspace (allocated when
    not given)."""
    block_m, block_n, block_k, split_k, warps, stages = config
    (m, k), n = x.shape, w.shape[0]
    block_m = max(16, min(block_m, triton.next_power_of_2(m)))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    if split_k == 1:
        _gemm_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), 0,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=1,
                           num_warps=warps, num_stages=stages)
        return out
    if partial is None:
        partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    _gemm_kernel[grid](x, w, partial, m, n, k, x.stride(0), w.stride(0), n, m * n,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                       num_warps=warps, num_stages=stages)
    _reduce_splits_kernel[(triton.cdiv(m * n, 1024),)](partial, out, m * n, SPLIT_K=split_k, BLOCK=1024)
    return out


def check() -> int:
    """The kernel against torch at tiny float32 shapes (Triton's interpreter on the CPU, or a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for m, k, n in ((1, 40, 24), (5, 96, 70), (17, 64, 33)):
        x = torch.randn(m, k, generator=gen).to(device)
        w = torch.randn(n, k, generator=gen).to(device)
        ref = x.double() @ w.double().t()
        for config in ((16, 32, 32, 1, 4, 2), (16, 16, 16, 2, 4, 2), (16, 32, 16, 4, 4, 2)):
            out = gemm(x, w, config)
            err = float((out.double() - ref).norm() / ref.norm())
            worst = max(worst, err)
            print(f"M {m} K {k} N {n} config {config}: relative error {err:.1e}")
    for m, k, n in ((5, 64, 32), (17, 128, 64)):  # gemm_wide needs K and N that divide by its tiles
        x = torch.randn(m, k, generator=gen).to(device)
        w = torch.randn(n, k, generator=gen).to(device)
        ref = x.double() @ w.double().t()
        for config, tma in itertools.product(((16, 32, 16, 1, 4, 2), (16, 32, 16, 2, 4, 2)), (False, True)):
            err = float((gemm_wide(x, w, config, tma=tma).double() - ref).norm() / ref.norm())
            worst = max(worst, err)
            print(f"wide{' tma' if tma else ''} M {m} K {k} N {n} config {config}: relative error {err:.1e}")
    worst = max(worst, check_fused(device, gen))
    print(f"worst {worst:.1e}")
    return 0 if worst < 1e-5 else 1


@torch.no_grad()
def check_fused(device: str, gen: torch.Generator) -> float:
    """fused_linear.py's prologues, bias and split-K, with and without prefetch, against the unfused torch code."""
    import torch.nn.functional as F

    from fused_linear import fused_linear
    from pagedllm.layers.norm import RMSNorm
    worst = 0.0
    for (m, k, n, config), prefetch in itertools.product(
            ((1, 40, 24, None), (5, 96, 70, (16, 32, 32, 2)), (17, 64, 33, (16, 16, 16, 4))), (True, False)):
        x, r = torch.randn(m, k, generator=gen), torch.randn(m, k, generator=gen)
        w, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        gate_up = torch.randn(m, 2 * k, generator=gen)
        norm = RMSNorm(k, 1e-6)
        norm.weight.data = torch.rand(k, generator=gen) + 0.5
        normed, summed = norm(x, r)
        kw = dict(config=config, prefetch=prefetch)
        on = [t.to(device) for t in (x, r, w, bias, gate_up, norm.weight.data)]
        out, new_res = fused_linear(on[0], on[2], norm_weight=on[5], eps=1e-6, residual=on[1], **kw)
        pairs = {
            "bias": (fused_linear(on[0], on[2], on[3], **kw), F.linear(x, w, bias)),
            "norm": (fused_linear(on[0], on[2], norm_weight=on[5], eps=1e-6, **kw), F.linear(norm(x), w)),
            "norm+residual": (out, F.linear(normed, w)),
            "new residual": (new_res, summed),
            "silu*up": (fused_linear(on[4], on[2], silu_mul=True, **kw),
                        F.linear(F.silu(gate_up[:, :k]) * gate_up[:, k:], w)),
        }
        for name, (got, ref) in pairs.items():
            err = float((got.cpu().double() - ref.double()).norm() / ref.double().norm())
            worst = max(worst, err)
            print(f"fused M {m} K {k} N {n} config {config} prefetch {prefetch} {name}: relative error {err:.1e}")
    return worst


def _graph_us(fn, copies: int) -> float:
    """Median microseconds per call of fn(i), i in range(copies), replayed in one CUDA graph."""
    from bench_attention import _graph_ms  # benchmarks/ is on sys.path when this file runs as a script
    return 1e3 * _graph_ms(fn, copies)


def _layer_cases(models: list[str], batches: list[int], lm_head: bool = True):
    """(model, layer, M, x [M, K], out [M, N], weights, copies) for each layer shape (and the lm_head's) and M, with
    enough bf16 copies of the weight that the L2 cannot hold them (decode reads weights from HBM)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    for model in models:
        shapes = dict(SHAPES[model], **({"lm_head": (SHAPES[model]["qkv"][0], 151936)} if lm_head else {}))
        for layer, (k, n) in shapes.items():
            copies = max(1, min(32, -(-3 * l2 // (n * k * 2))))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            for m in batches:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                yield model, layer, m, x, torch.empty(m, n, device="cuda", dtype=torch.bfloat16), weights, copies
            del weights
            torch.cuda.empty_cache()


def bench(models: list[str], batches: list[int]) -> int:
    import torch.nn.functional as F
    src = torch.empty(2 ** 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_us = _graph_us(lambda i: dst.copy_(src), 1)
    bandwidth = 2 * src.numel() / (copy_us * 1e-6)
    del src, dst
    print(f"device {torch.cuda.get_device_name()}, copy {bandwidth / 1e12:.2f} TB/s; times per call, us")
    print(f"{'model':>5} {'layer':>8} {'M':>4} {'cuBLAS':>8} {'% bw':>5} {'Triton':>8} {'% bw':>5} {'speed-up':>8}"
          "  config")
    for model, layer, m, x, out, weights, copies in _layer_cases(models, batches, lm_head=False):
        n, k = weights[0].shape
        nbytes = 2 * (n * k + m * (k + n))
        cublas = _graph_us(lambda i: torch.mm(x, weights[i].t(), out=out), copies)
        ref = F.linear(x, weights[0]).float()
        best = (float("inf"), None)
        for config in CONFIGS:
            if (config[0] > 16 and m <= 16) or config[2] * config[3] > k:  # same as BLOCK_M 16; empty splits
                continue
            partial = torch.empty(config[3], m, n, dtype=torch.float32, device="cuda")
            try:
                got = gemm(x, weights[0], config, partial=partial).float()
                if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2):
                    continue
                us = _graph_us(lambda i, c=config: gemm(x, weights[i], c, out=out, partial=partial), copies)
            except Exception:  # noqa: BLE001 - a configuration that does not compile is skipped
                continue
            best = min(best, (us, config), key=lambda t: t[0])
        triton_us, config = best
        pct = [100 * nbytes / (us * 1e-6) / bandwidth for us in (cublas, triton_us)]
        print(f"{model:>5} {layer:>8} {m:>4} {cublas:>8.1f} {pct[0]:>4.0f}% {triton_us:>8.1f} {pct[1]:>4.0f}% "
              f"{cublas / triton_us:>7.2f}x  {config}")
    return 0


def bench_blas(models: list[str], batches: list[int]) -> int:
    """torch.mm under each of torch's BLAS back-ends (cuBLAS, what the engine gets by default, and cuBLASLt), per
    layer shape (and the lm_head's) and M, in replayed graphs over L2-defeating weight copies: us a call."""
    print(f"device {torch.cuda.get_device_name()}; torch.mm, us a call")
    print(f"{'model':>5} {'layer':>8} {'M':>4} {'cublas':>8} {'cublaslt':>8}")
    default = torch.backends.cuda.preferred_blas_library()
    try:
        for model, layer, m, x, out, weights, copies in _layer_cases(models, batches):
            times = []
            for library in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(library)
                times.append(_graph_us(lambda i: torch.mm(x, weights[i].t(), out=out), copies))
            print(f"{model:>5} {layer:>8} {m:>4} {times[0]:>8.1f} {times[1]:>8.1f}")
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    return 0


def bench_layout(models: list[str], batches: list[int]) -> int:
    """The weight as nn.Linear stores it ([N, K], the engine's: x @ W.T) against the same weight stored transposed
    ([K, N]: x @ W), under cuBLAS and cuBLASLt: does another layout get cuBLAS a better kernel at some M? Us a call,
    in replayed graphs over L2-defeating weight copies."""
    print(f"device {torch.cuda.get_device_name()}; torch.mm, us a call")
    print(f"{'model':>5} {'layer':>8} {'M':>4} {'[N,K] blas':>10} {'[K,N] blas':>10} {'[N,K] lt':>9} {'[K,N] lt':>9}")
    default = torch.backends.cuda.preferred_blas_library()
    source, transposed = None, []
    try:
        for model, layer, m, x, out, weights, copies in _layer_cases(models, batches):
            if weights is not source:  # a new layer's weights (the same list for each of its M)
                source, transposed = weights, [w.t().contiguous() for w in weights]
            times = []
            for library in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(library)
                times.append(_graph_us(lambda i: torch.mm(x, weights[i].t(), out=out), copies))
                times.append(_graph_us(lambda i: torch.mm(x, transposed[i], out=out), copies))
            print(f"{model:>5} {layer:>8} {m:>4} {times[0]:>10.1f} {times[1]:>10.1f} {times[2]:>9.1f} "
                  f"{times[3]:>9.1f}", flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    return 0


WIDE_CONFIGS = [(m, n, 64, s, w, st) for m in (64, 128) for n in (64, 128, 256) for s in (1, 2, 4)
                for w, st in ((4, 4), (4, 5), (8, 3), (8, 4))]
TMA_CONFIGS = WIDE_CONFIGS + [(256, n, 64, s, 8, st) for n in (64, 128) for s in (1, 2, 4) for st in (3, 4)]


def bench_roofline(models: list[str], batches: list[int], with_triton: bool) -> int:
    """cuBLAS (torch.mm, the engine's path above 4 rows) per layer shape and M against that call's own bound,
    max(bytes / copy bandwidth, flops / matmul rate), both ceilings measured here as `bench throughput` does; with
    with_triton, also the best of WIDE_CONFIGS for gemm_wide without TMA (no masks along K and N) and of
    TMA_CONFIGS with it."""
    from pagedllm.bench.roofline import measure_ceilings
    ceil = measure_ceilings(torch.device("cuda"))
    print(f"device {torch.cuda.get_device_name()}, copy {ceil.bandwidth / 1e12:.2f} TB/s, matmul "
          f"{ceil.matmul_flops / 1e12:.0f} TFLOP/s; us a call")
    print(f"{'model':>5} {'layer':>8} {'M':>4} {'bound':>7} {'cuBLAS':>8} {'eff':>5}"
          + ("  Triton (tc, tma): us, eff, config" if with_triton else ""))
    for model, layer, m, x, out, weights, copies in _layer_cases(models, batches):
        n, k = weights[0].shape
        bound = 1e6 * max((n * k + m * (k + n)) * 2 / ceil.bandwidth, 2 * m * n * k / ceil.matmul_flops)
        cublas = _graph_us(lambda i: torch.mm(x, weights[i].t(), out=out), copies)
        line = f"{model:>5} {layer:>8} {m:>4} {bound:>7.1f} {cublas:>8.1f} {100 * bound / cublas:>4.0f}%"
        if with_triton and layer != "lm_head":
            line += _best_wide(x, weights, out, copies, bound)
        print(line, flush=True)
    return 0


def _best_wide(x: torch.Tensor, weights: list, out: torch.Tensor, copies: int, bound: float) -> str:
    """' tc US EFF CONFIG tma US EFF CONFIG': the fastest correct config of gemm_wide without and with TMA."""
    (m, n), ref = out.shape, torch.mm(x, weights[0].t()).float()
    line = ""
    for name, tma, configs in (("tc", False, WIDE_CONFIGS), ("tma", True, TMA_CONFIGS)):
        best, error = (float("inf"), None), None
        for config in configs:
            partial = torch.empty(config[3], m, n, dtype=torch.float32, device="cuda")
            try:
                got = gemm_wide(x, weights[0], config, partial=partial, tma=tma)
                if not torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2):
                    continue
                us = _graph_us(lambda i, c=config, t=tma: gemm_wide(x, weights[i], c, out=out, partial=partial,
                                                                    tma=t), copies)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
                error = error or f"{type(e).__name__}: {str(e)[:200]}"
                continue
            best = min(best, (us, config), key=lambda t: t[0])
        line += f" {name}: none ran ({error})" if best[1] is None else \
            f" {name} {best[0]:>6.1f} {100 * bound / best[0]:>4.0f}% {best[1]}"
    return line


def bench_variants(models: list[str], batches: list[int]) -> int:
    """cuBLAS picks its kernel by shape, and at some M it picks a slow one (--roofline). The same product issued
    differently: whole, as two halves of N (two outputs), as two halves of K (mm then addmm into the same output),
    or at a padded M (the next multiple of 64, and 256; the padding's copy not counted): us a call."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    print(f"device {torch.cuda.get_device_name()}; cuBLAS, us a call")
    print(f"{'model':>5} {'layer':>8} {'M':>4} {'whole':>7} {'N/2 x2':>7} {'K/2 x2':>7} {'M->64k':>7} {'M->256':>7}")
    for model in models:
        for layer, (k, n) in SHAPES[model].items():
            copies = max(1, min(32, -(-3 * l2 // (n * k * 2))))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            halves_n = [(w[: n // 2], w[n // 2:]) for w in weights]
            halves_k = [(w[:, : k // 2], w[:, k // 2:]) for w in weights]
            x_big = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
            out_big = torch.empty(256, n, device="cuda", dtype=torch.bfloat16)
            for m in batches:
                x, out = x_big[:m], out_big[:m]
                o1, o2 = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16), torch.empty_like(out[:, : n // 2])
                xk1, xk2 = x[:, : k // 2], x[:, k // 2:]

                def split_k(i):
                    torch.mm(xk1, halves_k[i][0].t(), out=out)
                    torch.addmm(out, xk2, halves_k[i][1].t(), out=out)
                times = [_graph_us(lambda i: torch.mm(x, weights[i].t(), out=out), copies),
                         _graph_us(lambda i: (torch.mm(x, halves_n[i][0].t(), out=o1),
                                              torch.mm(x, halves_n[i][1].t(), out=o2)), copies),
                         _graph_us(split_k, copies)]
                for padded in (-(-m // 64) * 64, 256):
                    times.append(_graph_us(lambda i, p=padded: torch.mm(x_big[:p], weights[i].t(), out=out_big[:p]),
                                           copies))
                print(f"{model:>5} {layer:>8} {m:>4} " + " ".join(f"{t:>7.1f}" for t in times), flush=True)
            del weights, halves_n, halves_k
            torch.cuda.empty_cache()
    return 0


def bench_fused(models: list[str], batches: list[int]) -> int:
    """One decoder layer's linear work as the engine runs it: cuBLAS with the separate RMSNorm (+ residual) and
    SiLU-and-mul kernels, against fused_linear.py's four fused matmuls, in a replayed CUDA graph. Several
    variants of the fused kernel: prologue tiles loaded one iteration ahead or not, warps, BLOCK_K."""
    import torch.nn.functional as F

    from fused_linear import choose_config, fused_linear  # benchmarks/ is on sys.path when run as a script
    from pagedllm.layers.triton_ops import rms_norm, silu_and_mul
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    print(f"device {torch.cuda.get_device_name()}; one layer's matmuls, norms and SiLU, us per layer")
    print(f"{'model':>5} {'M':>4} {'unfused':>8} {'fused':>8} {'speed-up':>8}  variant")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for model in models:
        shapes = SHAPES[model]
        hidden, q_size = shapes["qkv"][0], shapes["o_proj"][0]
        layer_bytes = 2 * sum(k * n for k, n in shapes.values())
        copies = max(1, min(32, -(-3 * l2 // layer_bytes)))
        layers = [{name: torch.randn(n, k, **bf16) * k ** -0.5 for name, (k, n) in shapes.items()}
                  for _ in range(copies)]
        norm_w = torch.ones(hidden, **bf16)
        for m in batches:
            x, res = torch.randn(m, hidden, **bf16), torch.randn(m, hidden, **bf16)
            attn_out = torch.randn(m, q_size, **bf16)

            def unfused(i: int) -> None:
                w = layers[i]
                h, r = rms_norm(x, norm_w, 1e-6, res)
                F.linear(h, w["qkv"])
                o = F.linear(attn_out, w["o_proj"])
                h, r = rms_norm(o, norm_w, 1e-6, r)
                F.linear(silu_and_mul(F.linear(h, w["gate_up"])), w["down"])

            def fused(i: int, opts: dict) -> None:
                w = layers[i]

                def cfg(name: str) -> tuple | None:
                    if "block_k" not in opts:
                        return None
                    k, n = shapes[name]
                    bm, bn, _, split = choose_config(m, n, k, x.device)
                    return bm, bn, opts["block_k"], split
                kw = dict(num_warps=opts.get("num_warps", 4), prefetch=opts.get("prefetch", True))
                _, r = fused_linear(x, w["qkv"], norm_weight=norm_w, eps=1e-6, residual=res, config=cfg("qkv"), **kw)
                o = fused_linear(attn_out, w["o_proj"], config=cfg("o_proj"), **kw)
                gate_up, r = fused_linear(o, w["gate_up"], norm_weight=norm_w, eps=1e-6, residual=r,
                                          config=cfg("gate_up"), **kw)
                fused_linear(gate_up, w["down"], silu_mul=True, config=cfg("down"), **kw)

            base = _graph_us(unfused, copies)
            variants = [dict()] + [dict(prefetch=p, num_warps=nw, block_k=bk) for p in (False, True)
                                   for nw in (4, 8) for bk in (128, 256)]
            for opts in variants:
                us = _graph_us(lambda i, o=opts: fused(i, o), copies)
                print(f"{model:>5} {m:>4} {base:>8.1f} {us:>8.1f} {base / us:>7.2f}x  {opts or 'default'}")
        del layers
        torch.cuda.empty_cache()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness at tiny float32 shapes only")
    parser.add_argument("--models", default="0.6b,8b")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--fused", action="store_true",
                        help="a whole layer: cuBLAS + separate norm/SiLU kernels against fused_linear.py")
    parser.add_argument("--blas", action="store_true", help="torch.mm under cuBLAS against cuBLASLt")
    parser.add_argument("--roofline", action="store_true", help="cuBLAS against each call's own bound")
    parser.add_argument("--triton", action="store_true", help="with --roofline: also a wide-tile Triton sweep")
    parser.add_argument("--variants", action="store_true", help="cuBLAS on the same product split or padded")
    parser.add_argument("--layout", action="store_true", help="the weight as stored ([N, K]) against transposed")
    args = parser.parse_args()
    if args.check:
        return check()
    if not torch.cuda.is_available():
        print("bench_gemm: needs a CUDA GPU (or --check under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    if args.variants:
        return bench_variants(args.models.split(","), batches)
    if args.layout:
        return bench_layout(args.models.split(","), batches)
    if args.roofline:
        return bench_roofline(args.models.split(","), batches, args.triton)
    return (bench_fused if args.fused else bench_blas if args.blas else bench)(args.models.split(","), batches)


if __name__ == "__main__":
    sys.exit(main())
