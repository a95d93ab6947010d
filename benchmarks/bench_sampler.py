"""The fused Gumbel-max sampler (pagedllm/sampling/triton_sample.py) on one CUDA GPU: microseconds per call over
bf16 logits of Qwen3's vocabulary, temperature 0.6 as in the reference workload, and the all-greedy argmax, each
in a replayed CUDA graph (each call reads its own copy of the logits, so the L2 does not hold them). For an A/B of
two commits, run it with PYTHONPATH pointing pagedllm at each tree.

    python benchmarks/bench_sampler.py [--vocab 151936] [--batches 1,16,64,256]
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench_attention import _graph_ms  # benchmarks/ is on sys.path when this file runs as a script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batches", default="1,16,64,256")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_sampler: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pagedllm.sampling.seeds import mix_seed
    from pagedllm.sampling.triton_sample import argmax_rows, gumbel_sample

    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    print(f"device {torch.cuda.get_device_name()}, vocab {args.vocab}, bf16 logits")
    print(f"{'batch':>6} {'T=0.6 us':>9} {'greedy us':>10} {'columns/s (T=0.6)':>18}")
    for batch in (int(b) for b in args.batches.split(",")):
        copies = max(1, -(-3 * l2_bytes // (batch * args.vocab * 2)))
        logits = torch.randn(copies * batch, args.vocab, device="cuda").mul_(3).to(torch.bfloat16)
        temperature = torch.full((batch,), 0.6, device="cuda")
        greedy = torch.zeros(batch, dtype=torch.bool, device="cuda")
        seeds = torch.tensor([mix_seed(7, i) for i in range(batch)], device="cuda")
        sampled = 1e3 * _graph_ms(lambda i: gumbel_sample(logits[i * batch:(i + 1) * batch], temperature, greedy,
                                                          seeds), copies)
        argmax = 1e3 * _graph_ms(lambda i: argmax_rows(logits[i * batch:(i + 1) * batch]), copies)
        print(f"{batch:>6} {sampled:>9.1f} {argmax:>10.1f} {batch * args.vocab / (sampled * 1e-6) / 1e9:>16.0f} G")
        del logits
    return 0


if __name__ == "__main__":
    sys.exit(main())
