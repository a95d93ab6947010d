"""Would a dot-free GEMV stream batch-1 weights faster than the engine's (layers/triton_gemv.py)? Qwen3-8B's layer
shapes on one CUDA GPU, each alone, at one row. An experiment, not used by the engine.

The engine's GEMV pads the row to 16 for tl.dot. The motive for this kernel was an offline compile for sm_90 in
which the engine's variants took up to 255 registers a thread and the fused ones spilled; that compile lacked the
divisibility marks Triton's launcher gives the arguments, and with them (benchmarks/kernel_resources.py) they take
64-184 registers and no stack, their weight tiles pipelined through shared memory. The kernel below multiplies the weight tile by the row in registers and sums once after
the loop, with no padding. Each config is timed over enough weight copies (one CUDA graph) that the L2 holds none.
On an H200 it was 0.3-1.2 us faster per layer shape alone, but a dot-free kernel with the engine's fusions (the
norm, SiLU-and-mul) was slower than the engine's inside Qwen3-8B's whole layer (docs/benchmarks.md).

    python benchmarks/bench_lean_gemv.py
    TRITON_INTERPRET=1 python benchmarks/bench_lean_gemv.py --check     # the kernel on the CPU
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from bench_gemm import SHAPES  # benchmarks/ is on sys.path when this file runs as a script


@triton.jit
def _lean_gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        w = tl.load(w_rows + kk[None, :], mask=(cols[:, None] < N) & (kk[None, :] < K), other=0.0)
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(out_ptr + cols, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=cols < N)


def lean_gemv(x, w, out, config):
    block_n, block_k, warps, stages = config
    n, k = w.shape
    _lean_gemv_kernel[(triton.cdiv(n, block_n),)](x, w, out, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                                  num_warps=warps, num_stages=stages)
    return out


def check() -> int:
    """The kernel against torch at tiny float32 shapes (one row)."""
    from bench_pdl import check_matvec
    return check_matvec(lean_gemv, ((1, 40, 24, (16, 16, 4, 2)), (1, 100, 70, (32, 32, 4, 2)),
                                    (1, 300, 33, (8, 128, 4, 2))))


def bench_lean(bandwidth) -> None:
    from bench_attention import _graph_ms
    from pagedllm.layers.triton_gemv import gemv, gemv_config
    dev = dict(device="cuda", dtype=torch.bfloat16)
    configs = [(n, k, w, st) for n in (16, 32, 64) for k in (256, 512) for w in (4, 8) for st in (2, 3, 4)
               if n * k // (32 * w) <= 128]
    for name, (k, n) in SHAPES["8b"].items():
        copies = max(2, -(-150_000_000 // (2 * n * k)))
        ws = [torch.randn(n, k, **dev) * k ** -0.5 for _ in range(copies)]
        x = torch.randn(1, k, **dev)
        out = torch.empty(1, n, **dev)
        ref = (x.float() @ ws[0].float().t())
        engine_us = 1e3 * _graph_ms(lambda i: gemv(x, ws[i]), copies)
        results = []
        for cfg in configs:
            try:
                err = float((lean_gemv(x, ws[0], out, cfg).float() - ref).norm() / ref.norm())
                if err > 1e-2:
                    print(f"  {name} {cfg}: relative difference {err:.1e}")
                    continue
                results.append((1e3 * _graph_ms(lambda i, c=cfg: lean_gemv(x, ws[i], out, c), copies), cfg))
            except Exception as exc:  # noqa: BLE001 - out of resources: skipped
                print(f"  {name} {cfg}: {type(exc).__name__}")
        results.sort()
        gb = lambda us: 2 * n * k / (us * 1e-6) / 1e9
        print(f"{name:>8} [{n}, {k}]: engine GEMV {gemv_config(n, k)} {engine_us:6.2f} us ({gb(engine_us):,.0f} GB/s); "
              "lean best " + ", ".join(f"{c} {u:.2f} us ({gb(u):,.0f} GB/s)" for u, c in results[:4]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness at tiny float32 shapes only")
    if parser.parse_args().check:
        return check()
    if not torch.cuda.is_available():
        print("bench_lean_gemv: needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_attention import copy_bandwidth
    bandwidth = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy {bandwidth / 1e9:,.0f} GB/s")
    bench_lean(bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
