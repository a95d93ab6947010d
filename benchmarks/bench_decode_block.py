"""The attention block of a small decode step on one CUDA GPU: from the qkv projection's output to attention's
output, the way the engine's graphs run it at batch 1-4 (Qwen3-8B's batch-1 latency spends ~10 us a layer here).

Two ways, each timed per layer as the median of a replayed CUDA graph of `copies` blocks, each over its own slice
of a cache larger than the L2, at the default split count and at each of --splits:
  apart          qkv_prepare (q/k norms, rotary, KV write), then paged_decode
  fused          paged_decode_qkv: the decode kernel does the q/k work and the KV write itself
The fused output is checked against the apart one.

    python benchmarks/bench_decode_block.py [--heads 32 --kv-heads 8] [--batches 1,2,4] [--contexts 512,4096]
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench_attention import add_head_args  # benchmarks/ is on sys.path when this file runs as a script


def make_layers(batch: int, context: int, copies: int, args, device: str, gen: torch.Generator):
    from pathlib import Path
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository's tests/, also when PYTHONPATH points
    from tests.qkv_step_case import make_step  # pagedllm at another tree (an A/B run of an older commit)
    return make_step([(1, context)] * (batch * copies), batch * copies, args.heads, args.kv_heads, args.head_dim,
                     16, True, getattr(torch, args.dtype), device, gen)


def block_call(step, out: torch.Tensor, batch: int, fused: bool, splits: int | None, block_n: int | None = None):
    """call(i): the attention block of copy i (its `batch` sequences) into out's rows of that copy."""
    from pagedllm.attention.triton_decode import paged_decode, paged_decode_qkv
    from pagedllm.attention.triton_qkv import qkv_prepare
    b, heads = step.batch, step.num_heads
    scale = b.kv_cache.shape[-1] ** -0.5
    q_w, k_w, eps = step.norms
    cos, sin = step.rotary.cos_cache, step.rotary.sin_cache

    def call(i: int) -> None:
        rows = slice(i * batch, (i + 1) * batch)
        meta = b.meta
        if fused:
            paged_decode_qkv(step.qkv[rows], step.positions[rows], heads, cos, sin, b.kv_cache,
                             meta.slot_mapping[rows], meta.block_tables[rows], meta.seq_lens[rows], scale, out[rows],
                             q_w, k_w, eps, num_splits=splits, block_n=block_n)
        else:
            q = qkv_prepare(step.qkv[rows], step.positions[rows], heads, b.kv_cache.shape[3], cos, sin, b.kv_cache,
                            meta.slot_mapping[rows], q_w, k_w, eps)
            paged_decode(q, b.kv_cache, meta.block_tables[rows], meta.seq_lens[rows], scale, out[rows],
                         num_splits=splits)
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_head_args(parser)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--contexts", default="512,4096")
    parser.add_argument("--splits", default="8,16", help="split counts to try besides the default")
    parser.add_argument("--block-n", default="", help="key tiles to try in the fused kernel besides the default")
    parser.add_argument("--copies", type=int, default=36, help="blocks a graph runs (a model's layers)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_block: needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_attention import _graph_ms
    from pagedllm.attention.triton_decode import choose_num_splits
    gen = torch.Generator().manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}  heads {args.heads}/{args.kv_heads}  head_dim {args.head_dim}  "
          f"{args.copies} blocks a graph; us a block")
    tiles = [int(t) for t in args.block_n.split(",") if t]
    print(f"{'batch':>5} {'context':>7} {'splits':>6}  {'apart':>8} {'fused':>8}  rel diff"
          + "".join(f"  {'tile ' + str(t):>8}" for t in tiles))
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            step = make_layers(batch, context, args.copies, args, "cuda", gen)
            out = torch.empty(batch * args.copies, args.heads, args.head_dim, dtype=step.qkv.dtype, device="cuda")
            default = choose_num_splits(batch, args.kv_heads, out.device)
            for splits in [default] + sorted({int(s) for s in args.splits.split(",")} - {default}):
                times, got = [], []
                for fused in (False, True):
                    call = block_call(step, out, batch, fused, splits)
                    out.fill_(float("nan"))
                    call(0)
                    got.append(out[:batch].double().clone())
                    times.append(_graph_ms(call, args.copies) * 1e3)
                diff = float((got[1] - got[0]).norm() / got[0].norm())
                for tile in tiles:  # the fused kernel with other key tiles
                    call = block_call(step, out, batch, True, splits, tile)
                    out.fill_(float("nan"))
                    call(0)
                    diff = max(diff, float((out[:batch].double() - got[0]).norm() / got[0].norm()))
                    times.append(_graph_ms(call, args.copies) * 1e3)
                mark = "*" if splits == default else " "
                print(f"{batch:>5} {context:>7} {splits:>5}{mark}  {times[0]:>8.2f} {times[1]:>8.2f}  {diff:.1e}"
                      + "".join(f"  {t:>8.2f}" for t in times[2:]))
            del step, out
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
