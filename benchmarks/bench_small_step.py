"""Batch-1 decode on one CUDA GPU, Qwen3-8B's shapes: (1) the whole decoder layer as the engine runs it (the
fused GEMVs of layers/triton_gemv.py, paged_decode_qkv over a --context-token cache), with and without
programmatic dependent launch (attention/triton_prefetch.py) and by how many weights of each row a GEMV asks the
L2 for before its wait; (2) a dot-free GEMV (products summed in registers, no rows padded to 16) against the
engine's, each layer shape alone. Each: --layers copies with their own weights in one replayed CUDA graph.

    python benchmarks/bench_small_step.py [--layers 36] [--context 512]
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


def bench_layer(args, bandwidth) -> None:
    from bench_attention import _graph_ms
    from pagedllm.attention.triton_decode import paged_decode_qkv
    from pagedllm.layers.triton_gemv import gemv
    from tests.qkv_step_case import make_step
    shapes, layers, dev = SHAPES["8b"], args.layers, dict(device="cuda", dtype=torch.bfloat16)
    heads, kv_heads, head_dim = 32, 8, 128
    gen = torch.Generator().manual_seed(0)
    weights = [{name: torch.randn(n, k, **dev) * k ** -0.5 for name, (k, n) in shapes.items()} for _ in range(layers)]
    norms = [(torch.rand(4096, **dev) + 0.5, torch.rand(4096, **dev) + 0.5) for _ in range(layers)]
    layer_bytes = 2 * sum(k * n for k, n in shapes.values())
    for context in map(int, args.context.split(",")):
        step = make_step([(1, context)] * layers, layers, heads, kv_heads, head_dim, 16, True, torch.bfloat16,
                         "cuda", gen)
        meta, cos, sin = step.batch.meta, step.rotary.cos_cache, step.rotary.sin_cache
        q_w, k_w, eps = step.norms
        attn_out = torch.empty(layers, heads, head_dim, **dev)
        x0, res0 = torch.randn(1, 4096, **dev), torch.randn(1, 4096, **dev)

        def forward(gemv_pdl: bool, attn_pdl: bool, cols: int) -> torch.Tensor:
            x, res = x0, res0
            kw = dict(pdl=gemv_pdl, prefetch_cols=cols)
            for i, (w, (g1, g2)) in enumerate(zip(weights, norms)):
                qkv, res = gemv(x, w["qkv"], norm=(g1, 1e-6), residual=res, **kw)
                rows = slice(i, i + 1)
                paged_decode_qkv(qkv, step.positions[rows], heads, cos, sin, step.batch.kv_cache,
                                 meta.slot_mapping[rows], meta.block_tables[rows], meta.seq_lens[rows],
                                 head_dim ** -0.5, attn_out[rows], q_w, k_w, eps, pdl=attn_pdl)
                o = gemv(attn_out[rows].view(1, -1), w["o_proj"], **kw)
                h, res = gemv(o, w["gate_up"], norm=(g2, 1e-6), residual=res, silu_and_mul=True, **kw)
                x = gemv(h, w["down"], **kw)
            return x

        ways = [("no PDL", False, False, 0), ("PDL attention only", False, True, 0), ("PDL, no prefetch", True, True, 0)]
        ways += [(f"PDL, prefetch {c} cols", True, True, c) for c in (256, 512, 1024, 2048)]
        print(f"Qwen3-8B batch-1 layers with attention over {context} tokens, {layers} layers of "
              f"{layer_bytes / 1e6:.0f} MB of weights")
        reference = None
        for name, gp, ap, cols in ways:
            got = forward(gp, ap, cols).float()
            reference = got if reference is None else reference
            same = bool(torch.equal(got, reference))
            us = 1e3 * _graph_ms(lambda i, a=(gp, ap, cols): forward(*a), 1) / layers
            print(f"{name:>24}: {us:7.1f} us a layer, {100 * layer_bytes / (us * 1e-6) / bandwidth:5.1f}% of the "
                  f"copy bandwidth; output {'equal' if same else 'DIFFERS'}")
        del step


def bench_lean(args, bandwidth) -> None:
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
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--context", default="512")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-lean", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_small_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_attention import copy_bandwidth
    bandwidth = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy {bandwidth / 1e9:,.0f} GB/s")
    if not args.skip_layer:
        bench_layer(args, bandwidth)
    if not args.skip_lean:
        bench_lean(args, bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
