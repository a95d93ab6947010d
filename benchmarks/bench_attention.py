"""Micro-benchmark of the Triton attention kernels on one CUDA GPU.

Decode: achieved bandwidth (K/V bytes read + q/out over the median time per call inside a replayed CUDA graph,
as the engine runs decodes; each call reads its own slice of a cache larger than the L2) for batch 1/32/256 at
context 512/4096, against the device's measured copy bandwidth; the eager time (Python launches) beside it.
Prefill: TFLOP/s (4 * visible (query, key) pairs * head_dim * heads) for long prompts, a ragged batch and a
chunked prefill over a cached prefix, with torch's own SDPA (dense, contiguous K/V: not paged) on the same shape
as a peer. --tune sweeps kernel configurations.

    python benchmarks/bench_attention.py [--tune] [--dtype bfloat16] [--heads 32 --kv-heads 8 --head-dim 128]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch


def _bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds per call, timed with CUDA events by Triton (the L2 is flushed between calls)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (the practical ceiling)."""
    src = torch.empty(2 ** 29, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate(dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = _bench(lambda: a @ b)
    return 2 * 8192 ** 3 / (ms * 1e-3)


def _graph_ms(fn, copies: int) -> float:
    """Median milliseconds per call of fn(i), i in range(copies), captured in one CUDA graph and replayed: no
    Python launch cost, and each call reads a different slice of the cache, so the L2 does not hold it."""
    for i in range(copies):
        fn(i)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / copies)
    return statistics.median(times)


def _decode_call(b, out: torch.Tensor, batch: int, variant: dict):
    """call(i): decode attention of the i-th slice of `batch` sequences of the paged batch b into out."""
    from pagedllm.attention.triton_decode import paged_decode
    scale = b.q.shape[-1] ** -0.5

    def call(i: int) -> None:
        rows = slice(i * batch, (i + 1) * batch)
        paged_decode(b.q[rows], b.kv_cache, b.meta.block_tables[rows], b.meta.seq_lens[rows], scale, out[rows],
                     **variant)
    return call


def bench_decode(args, dtype, bandwidth: float, rows: list[dict]) -> None:
    from pagedllm.attention.triton_decode import choose_num_splits
    from pagedllm.attention.triton_testing import make_paged_batch
    gen = torch.Generator().manual_seed(0)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    elem = torch.empty((), dtype=dtype).element_size()
    for batch in (1, 32, 256):
        for context in (512, 4096):
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elem
            nbytes = kv_bytes + 2 * batch * args.heads * args.head_dim * elem  # + q read, out written
            copies = min(64, max(1, -(-3 * l2_bytes // nbytes)))
            b = make_paged_batch([(1, context)] * (batch * copies), batch * copies, args.heads, args.kv_heads,
                                 args.head_dim, args.block_size, dtype, "cuda", gen, fill_cache=False)
            out = torch.empty_like(b.q)
            default_splits = choose_num_splits(batch, args.kv_heads, b.q.device)
            variants = [dict()]
            if args.tune:
                splits = sorted({default_splits, max(1, default_splits // 2), min(32, default_splits * 2)})
                variants += [dict(num_splits=s, block_n=bn, num_stages=st)
                             for s in splits for bn in (32, 64, 128) for st in (2, 3)]
                variants.append(dict(num_splits=default_splits, block_n=128, num_stages=3, num_warps=8))
            for v in variants:
                call = _decode_call(b, out, batch, v)
                ms = _graph_ms(call, copies)
                eager_ms = _bench(lambda: call(0)) if not v else float("nan")
                rows.append(dict(kind="decode", batch=batch, context=context, config=v or "default",
                                 splits=v.get("num_splits", default_splits), us=ms * 1e3, eager_us=eager_ms * 1e3,
                                 gbps=nbytes / (ms * 1e-3) / 1e9, pct_bw=100 * nbytes / (ms * 1e-3) / bandwidth))
            del b, out
            torch.cuda.empty_cache()


def bench_decode_ragged(args, dtype, bandwidth: float, rows: list[dict]) -> None:
    """Decode over ragged contexts, as in the reference workload's decode phase (uniform in 100..1100 tokens), for
    each split count, with the batch in the order drawn and longest context first (as the model runner orders
    decodes): where one long sequence's program ends last, splitting or ordering evens the programs out."""
    import random

    from pagedllm.attention.triton_decode import choose_num_splits
    from pagedllm.attention.triton_testing import make_paged_batch
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    elem = torch.empty((), dtype=dtype).element_size()
    for batch, order in itertools.product((16, 32, 64, 128, 256), ("drawn", "longest first")):
        if order == "drawn":
            contexts = [rng.randint(100, 1100) for _ in range(batch)]
        else:  # as the model runner orders a step's decodes
            contexts = sorted(contexts, reverse=True)
        kv_bytes = 2 * sum(contexts) * args.kv_heads * args.head_dim * elem
        nbytes = kv_bytes + 2 * batch * args.heads * args.head_dim * elem
        copies = min(64, max(1, -(-3 * l2_bytes // nbytes)))
        b = make_paged_batch([(1, c) for c in contexts] * copies, batch * copies, args.heads, args.kv_heads,
                             args.head_dim, args.block_size, dtype, "cuda", gen, fill_cache=False)
        out = torch.empty_like(b.q)
        default_splits = choose_num_splits(batch, args.kv_heads, b.q.device)
        variants = [dict(num_splits=s) for s in sorted({1, 2, 4, 8, default_splits})]
        if args.tune:  # tile sweeps: (block_n, num_stages, num_warps) at 1 and 2 splits
            variants = [dict()] + [dict(num_splits=s, block_n=bn, num_stages=st, num_warps=w)
                                   for s in (1, 2) for bn, st, w in ((128, 2, 4), (128, 3, 8), (64, 2, 4),
                                                                    (64, 3, 4), (64, 4, 4), (64, 3, 8), (32, 2, 4),
                                                                    (32, 3, 4), (32, 4, 4))]
        for v in variants:
            ms = _graph_ms(_decode_call(b, out, batch, v), copies)
            splits = v.get("num_splits", default_splits)
            rows.append(dict(kind="decode ragged", batch=batch, context="100-1100", order=order, splits=splits,
                             config={k: x for k, x in v.items() if k != "num_splits"} or "default",
                             default=not v or v == dict(num_splits=default_splits), us=ms * 1e3,
                             gbps=nbytes / (ms * 1e-3) / 1e9, pct_bw=100 * nbytes / (ms * 1e-3) / bandwidth))
        del b, out
        torch.cuda.empty_cache()


def _visible_pairs(lens: list[tuple[int, int]]) -> int:
    return sum(q * (s - q) + q * (q + 1) // 2 for q, s in lens)


def bench_prefill(args, dtype, rows: list[dict]) -> None:
    import torch.nn.functional as F

    from pagedllm.attention.triton_prefill import paged_prefill
    from pagedllm.attention.triton_testing import make_paged_batch
    gen = torch.Generator().manual_seed(1)
    cases = {
        "prompt 8192": [(8192, 8192)],
        "prompt 2048": [(2048, 2048)],
        "8 x 1024": [(1024, 1024)] * 8,
        "chunk 512 on 3584": [(512, 4096)] * 4,
        "ragged 16 prompts": [(n, n) for n in (100, 1000, 37, 512, 2000, 300, 64, 800, 1500, 5, 250, 700, 128,
                                               999, 1200, 40)],
        # one prefill step of the reference workload: prompts of 100-1,024 tokens filling 8,192
        "workload step": [(n, n) for n in (907, 214, 633, 1020, 388, 745, 129, 556, 871, 302, 990, 467, 688, 282)],
    }
    # (rows, BLOCK_N, num_warps, num_stages), and the query heads a program takes (None: the kernel's choice)
    tiles = [(None, None)]
    if args.tune:
        shapes = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2),
                  (128, 128, 8, 2), (128, 64, 8, 2)]
        group = args.heads // args.kv_heads
        tiles += [(shape, h) for shape in shapes for h in (1, 2, 4, 8)
                  if group % h == 0 and shape[0] // h >= 16]
    for name, lens in cases.items():
        b = make_paged_batch(lens, 0, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, "cuda",
                             gen, fill_cache=False)
        m = b.meta
        out = torch.empty_like(b.q)
        flops = 4 * _visible_pairs(lens) * args.head_dim * args.heads
        scale = args.head_dim ** -0.5
        for tile, heads in tiles:
            ms = _bench(lambda: paged_prefill(b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                                              scale, out, tile=tile, heads=heads))
            rows.append(dict(kind="prefill", case=name, config=f"{tile} x{heads}" if tile else "default", ms=ms,
                             tflops=flops / (ms * 1e-3) / 1e12))
        if all(q == s for q, s in lens) and len(set(lens)) == 1:
            # Peer: torch SDPA (flash) on dense [batch, heads, len, dim] tensors of the same shape, causal.
            n = lens[0][0]
            qd = torch.randn(len(lens), args.heads, n, args.head_dim, device="cuda", dtype=dtype)
            kd = torch.randn(len(lens), args.kv_heads, n, args.head_dim, device="cuda", dtype=dtype)
            vd = torch.randn_like(kd)
            ms = _bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
            rows.append(dict(kind="prefill", case=name, config="torch sdpa (dense)", ms=ms,
                             tflops=flops / (ms * 1e-3) / 1e12))
        del b, out
        torch.cuda.empty_cache()


def add_head_args(parser: argparse.ArgumentParser) -> None:
    """The attention benchmarks' shared options: dtype and head shape (Qwen3-8B's by default)."""
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_head_args(parser)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tune", action="store_true", help="sweep kernel configurations")
    parser.add_argument("--ragged", action="store_true", help="only decode over ragged contexts, by split count")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill kernel")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth()
    rate = matmul_rate(dtype)
    print(f"device {torch.cuda.get_device_name()}  copy {bandwidth / 1e12:.2f} TB/s  "
          f"matmul {rate / 1e12:.0f} TFLOP/s ({args.dtype})  heads {args.heads}/{args.kv_heads}  "
          f"head_dim {args.head_dim}  block_size {args.block_size}")
    rows: list[dict] = []
    if args.ragged:
        bench_decode_ragged(args, dtype, bandwidth, rows)
        print(f"{'batch':>6} {'order':>13} {'splits':>6} {'graph us':>9} {'GB/s':>8} {'% copy bw':>10}  config")
        for batch, order in sorted({(r["batch"], r["order"]) for r in rows}):  # the default (*), then the fastest
            mine = [r for r in rows if r["batch"] == batch and r["order"] == order]
            shown = [r for r in mine if r["default"]][:1]
            shown += [r for r in sorted(mine, key=lambda r: r["us"]) if r not in shown][:3 if args.tune else 4]
            for r in shown:
                print(f"{r['batch']:>6} {r['order']:>13} {r['splits']:>6}{'*' if r['default'] else ' '}"
                      f"{r['us']:>8.1f} {r['gbps']:>8.0f} {r['pct_bw']:>9.0f}%  {r['config']}")
        return 0
    if not args.prefill_only:
        bench_decode(args, dtype, bandwidth, rows)
    bench_prefill(args, dtype, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bandwidth, matmul=rate, args=vars(args), rows=rows), f, indent=1, default=str)
    if args.tune:
        print("\nbest configuration per case:")
        best: dict = {}
        for r in rows:
            key = (r["kind"], r.get("batch"), r.get("context"), r.get("case"))
            score = r.get("gbps", r.get("tflops"))
            if r["config"] != "torch sdpa (dense)" and (key not in best or score > best[key][0]):
                best[key] = (score, r["config"])
        for key, (score, config) in best.items():
            print(f"  {key}: {score:.1f} with {config}")
        for case in dict.fromkeys(r["case"] for r in rows if r["kind"] == "prefill"):
            ranked = sorted((r for r in rows if r.get("case") == case), key=lambda r: -r["tflops"])
            print(f"  prefill {case}: " + ", ".join(f"{r['config']} {r['tflops']:.0f}" for r in ranked[:6]))
    print("\ndecode (default config)")
    print(f"{'batch':>6} {'context':>8} {'splits':>6} {'graph us':>9} {'GB/s':>8} {'% copy bw':>10} {'eager us':>9}")
    for r in rows:
        if r["kind"] == "decode" and r["config"] == "default":
            print(f"{r['batch']:>6} {r['context']:>8} {r['splits']:>6} {r['us']:>9.1f} {r['gbps']:>8.0f} "
                  f"{r['pct_bw']:>9.0f}% {r['eager_us']:>9.1f}")
    print("\nprefill")
    print(f"{'case':>20} {'config':>20} {'time ms':>9} {'TFLOP/s':>8}")
    for r in rows:
        if r["kind"] == "prefill" and r["config"] in ("default", "torch sdpa (dense)"):
            print(f"{r['case']:>20} {str(r['config']):>20} {r['ms']:>9.3f} {r['tflops']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
