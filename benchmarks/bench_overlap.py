"""Would running one half-batch's decode attention beside the other half's matmuls pay? A feasibility measurement
for large-batch decode, where the matmuls are compute-bound and attention is bandwidth-bound, and the engine runs
them one after the other (docs/benchmarks.md, "Where the time goes").

One decoder layer's work at Qwen3-8B's shapes (or --hidden/--inter/--heads/--kv-heads), batch --batch, contexts
uniform in 100..1,100 tokens, times --layers layers, timed with CUDA events (medians of --repeat, by
bench/roofline.py's timer): matmuls alone; attention alone; both in sequence on one stream (what the engine does);
and split in two halves, half A's matmuls on one stream beside half B's attention on another, then the other way
round. "half-batches, one stream" separates what halving the batch costs from what the overlap gains.
"pipelined" drops the lock-step: matmuls on one stream, attention on another, joined only by each half's own
dependencies (events), so half B's matmuls run while half A's attention does; "+ priority" gives the matmuls'
stream the higher priority, so the block scheduler places their few tiles as soon as an SM frees up instead of
after every pending attention program. With --graph each case is captured in one CUDA graph and replayed (as the
engine runs decode steps), without it launched eagerly.

    python benchmarks/bench_overlap.py [--model 8b|0.6b] [--batch 256] [--layers N] [--graph]
"""
from __future__ import annotations

import argparse
import random
import sys

import torch

# layers, hidden, intermediate, query heads, kv heads (benchmarks/configs/)
MODELS = {"8b": (36, 4096, 12288, 32, 8), "0.6b": (28, 1024, 3072, 16, 8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="8b", help="shapes of Qwen3-8B or Qwen3-0.6B")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="default: the model's")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--graph", action="store_true", help="time CUDA-graph replays instead of eager launches")
    args = parser.parse_args()
    layers, hidden, inter, heads, kv_heads = MODELS[args.model]
    args.layers = args.layers or layers
    args.hidden, args.inter, args.heads, args.kv_heads = hidden, inter, heads, kv_heads
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

    def pipelined(priority: bool) -> None:
        main = torch.cuda.current_stream()
        mm_stream = torch.cuda.Stream(priority=-1) if priority else torch.cuda.Stream()
        attn_stream = torch.cuda.Stream()
        mm_stream.wait_stream(main)
        attn_stream.wait_stream(main)
        attn_done = {a.start: None, b.start: None}
        for _ in range(args.layers):
            for rows in (a, b):
                with torch.cuda.stream(mm_stream):
                    if attn_done[rows.start] is not None:
                        mm_stream.wait_event(attn_done[rows.start])
                    matmuls(rows)
                    mm_done = torch.cuda.Event()
                    mm_done.record(mm_stream)
                with torch.cuda.stream(attn_stream):
                    attn_stream.wait_event(mm_done)
                    attention(rows)
                    attn_done[rows.start] = torch.cuda.Event()
                    attn_done[rows.start].record(attn_stream)
        main.wait_stream(mm_stream)
        main.wait_stream(attn_stream)

    cases = {
        "matmuls alone": lambda: [matmuls(every) for _ in range(args.layers)],
        "attention alone": lambda: [attention(every) for _ in range(args.layers)],
        "in sequence (the engine)": lambda: [(matmuls(every), attention(every)) for _ in range(args.layers)],
        "half-batches, one stream": lambda: [(matmuls(r), attention(r)) for _ in range(args.layers) for r in (a, b)],
        "half-batches overlapped": overlapped,
        "pipelined": lambda: pipelined(False),
        "pipelined + priority": lambda: pipelined(True),
    }
    print(f"Qwen3-{args.model} shapes, {'CUDA graph' if args.graph else 'eager'}, batch {args.batch}, "
          f"{args.layers} layers, hidden {h}, inter {args.inter}, heads {args.heads}/{args.kv_heads}, "
          f"contexts 100..1100 (mean {sum(contexts) / len(contexts):.0f})")
    if args.graph:
        from bench_attention import _graph_ms  # benchmarks/ is on sys.path when this file runs as a script
        results = {name: _graph_ms(lambda i, fn=fn: fn(), 1) for name, fn in cases.items()}
    else:
        results = {name: 1e3 * _time_cuda(fn, warmup=1, repeat=args.repeat) for name, fn in cases.items()}
    for name, ms in results.items():
        print(f"{name:>26}: {ms:8.2f} ms")
    for name in ("half-batches overlapped", "pipelined", "pipelined + priority"):
        saved = 1 - results[name] / results["in sequence (the engine)"]
        print(f"{name} saves {100 * saved:.1f}% of the sequential time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
