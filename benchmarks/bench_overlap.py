"""Would running one half-batch's decode attention beside the other half's matmuls pay? A feasibility measurement
for large-batch decode, where the matmuls are compute-bound and attention is bandwidth-bound, and the engine runs
them one after the other (docs/benchmarks.md, "Where the time goes").

One decoder layer's work at Qwen3-8B's shapes (or --hidden/--inter/--heads/--kv-heads), batch --batch, contexts
uniform in 100..1,100 tokens, times --layers layers, timed with CUDA events (medians of --repeat, by
bench/roofline.py's timer): matmuls alone; attention alone; both in sequence on one stream (what the engine does);
and split in two halves, half A's matmuls on one stream beside half B's attention on another, then the other way
round. "half-batches, one stream" separates what halving the batch costs from what the overlap gains.

    python benchmarks/bench_overlap.py [--batch 256] [--layers 36]
"""
from __future__ import annotations

import argparse
import random
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=12288)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_overlap: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pagedllm.attention.triton_decode import paged_decode
    from pagedllm.attention.triton_testing import make_paged_batch
    from pagedllm.bench.roofline import _time_cuda  # median seconds of fn() by CUDA events, after a warm-up

    dtype, dev = torch.bfloat16, "cuda"
    h, q_size, kv_size = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for n, k in
               ((q_size + 2 * kv_size, h), (h, q_size), (2 * args.inter, h), (h, args.inter))]
    x = torch.randn(args.batch, max(h, q_size, args.inter), device=dev, dtype=dtype)

    def matmuls(rows: slice) -> None:
        for w in weights:
            x[rows, :w.shape[1]] @ w.t()

    rng = random.Random(0)
    contexts = [rng.randint(100, 1100) for _ in range(args.batch)]
    batch = make_paged_batch([(1, c) for c in contexts], args.batch, args.heads, args.kv_heads, args.head_dim, 16,
                             dtype, dev, torch.Generator().manual_seed(0), fill_cache=False)
    out = torch.empty_like(batch.q)
    scale = args.head_dim ** -0.5

    def attention(rows: slice) -> None:
        paged_decode(batch.q[rows], batch.kv_cache, batch.meta.block_tables[rows], batch.meta.seq_lens[rows], scale,
                     out[rows])

    half = args.batch // 2
    a, b, every = slice(0, half), slice(half, args.batch), slice(0, args.batch)
    side = torch.cuda.Stream()

    def overlapped() -> None:
        main = torch.cuda.current_stream()
        for _ in range(args.layers):
            for mm_rows, attn_rows in ((a, b), (b, a)):
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    attention(attn_rows)
                matmuls(mm_rows)
                main.wait_stream(side)

    cases = {
        "matmuls alone": lambda: [matmuls(every) for _ in range(args.layers)],
        "attention alone": lambda: [attention(every) for _ in range(args.layers)],
        "in sequence (the engine)": lambda: [(matmuls(every), attention(every)) for _ in range(args.layers)],
        "half-batches, one stream": lambda: [(matmuls(r), attention(r)) for _ in range(args.layers) for r in (a, b)],
        "half-batches overlapped": overlapped,
    }
    print(f"batch {args.batch}, {args.layers} layers, hidden {h}, inter {args.inter}, heads {args.heads}/"
          f"{args.kv_heads}, contexts 100..1100 (mean {sum(contexts) / len(contexts):.0f})")
    results = {name: 1e3 * _time_cuda(fn, warmup=1, repeat=args.repeat) for name, fn in cases.items()}
    for name, ms in results.items():
        print(f"{name:>26}: {ms:8.2f} ms")
    saved = 1 - results["half-batches overlapped"] / results["in sequence (the engine)"]
    print(f"overlap saves {100 * saved:.1f}% of the sequential time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
