"""Does warming the L2 with the next weight speed up a batch-1 decoder layer? Qwen3-8B's shapes on one CUDA GPU.

At batch 1 the attention block (~10 us a layer) waits on memory latency while HBM idles. A kernel before it can ask
the L2 to fetch o_proj's weight (33.5 MB; Hopper's bulk prefetch, attention/triton_prefetch.py), which o_proj's
GEMV then reads from the L2. The whole layer as the engine runs it at batch 1 (the fused GEMVs of
layers/triton_gemv.py, paged_decode_qkv over a --context-token cache), --layers layers each with its own weights
and cache slice in one replayed CUDA graph, timed per layer in these ways:
  none                   no prefetch
  kernel                 a prefetch kernel of its own right before the attention block
  qkv GEMV               the qkv GEMV's programs prefetch o_proj's weight once done with their own
  qkv GEMV, half         the same, the first half of o_proj's weight only
  chain N MB             as "qkv GEMV", and each other GEMV prefetches the first N MB of the next one's weight
Every way's output is checked equal to the first's (a prefetch changes no value). Also: o_proj's GEMV alone, over
one weight (warm in the L2) against --layers weights (from HBM).

    python benchmarks/bench_l2_prefetch.py [--layers 36] [--context 512] [--chain-mb 8,16]
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench_gemm import SHAPES  # benchmarks/ is on sys.path when this file runs as a script


def head(t: torch.Tensor, mb: float) -> torch.Tensor:
    """The first rows of a weight [N, K] that make up about mb megabytes."""
    rows = max(1, min(t.shape[0], int(mb * 1e6 / (t.shape[1] * t.element_size()))))
    return t[:rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--chain-mb", default="8,16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_l2_prefetch: needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_attention import _graph_ms, copy_bandwidth
    from pagedllm.attention.triton_decode import paged_decode_qkv
    from pagedllm.attention.triton_prefetch import prefetch_tensor
    from pagedllm.layers.triton_gemv import gemv
    from tests.qkv_step_case import make_step
    bandwidth = copy_bandwidth()
    shapes, layers, dev = SHAPES["8b"], args.layers, dict(device="cuda", dtype=torch.bfloat16)
    heads, kv_heads, head_dim = 32, 8, 128
    gen = torch.Generator().manual_seed(0)
    weights = [{name: torch.randn(n, k, **dev) * k ** -0.5 for name, (k, n) in shapes.items()} for _ in range(layers)]
    norms = [(torch.rand(4096, **dev) + 0.5, torch.rand(4096, **dev) + 0.5) for _ in range(layers)]
    step = make_step([(1, args.context)] * layers, layers, heads, kv_heads, head_dim, 16, True, torch.bfloat16, "cuda",
                     gen)
    meta, cos, sin = step.batch.meta, step.rotary.cos_cache, step.rotary.sin_cache
    q_w, k_w, eps = step.norms
    attn_out = torch.empty(layers, heads, head_dim, **dev)
    x0, res0 = torch.randn(1, 4096, **dev), torch.randn(1, 4096, **dev)
    layer_bytes = 2 * sum(k * n for k, n in shapes.values())

    def forward(way: str, chain_mb: float = 0.0) -> torch.Tensor:
        x, res = x0, res0
        for i, (w, (g1, g2)) in enumerate(zip(weights, norms)):
            nxt = weights[(i + 1) % layers]
            to_o = w["o_proj"] if way in ("qkv", "chain") else head(w["o_proj"], 16.8) if way == "qkv-half" else None
            qkv, res = gemv(x, w["qkv"], norm=(g1, 1e-6), residual=res, prefetch=to_o)
            if way == "kernel":
                prefetch_tensor(w["o_proj"], 64)
            rows = slice(i, i + 1)
            paged_decode_qkv(qkv, step.positions[rows], heads, cos, sin, step.batch.kv_cache, meta.slot_mapping[rows],
                             meta.block_tables[rows], meta.seq_lens[rows], head_dim ** -0.5, attn_out[rows], q_w, k_w,
                             eps)
            chained = way == "chain"
            o = gemv(attn_out[rows].view(1, -1), w["o_proj"],
                     prefetch=head(w["gate_up"], chain_mb) if chained else None)
            h, res = gemv(o, w["gate_up"], norm=(g2, 1e-6), residual=res, silu_and_mul=True,
                          prefetch=head(w["down"], chain_mb) if chained else None)
            x = gemv(h, w["down"], prefetch=head(nxt["qkv"], chain_mb) if chained else None)
        return x

    ways = [("none", "none", 0.0), ("kernel", "kernel", 0.0), ("qkv GEMV", "qkv", 0.0),
            ("qkv GEMV, half", "qkv-half", 0.0)]
    ways += [(f"chain {mb} MB", "chain", float(mb)) for mb in args.chain_mb.split(",")]
    print(f"device {torch.cuda.get_device_name()}, copy {bandwidth / 1e9:,.0f} GB/s; Qwen3-8B batch-1 layers with "
          f"attention over {args.context} tokens, {layers} layers of {layer_bytes / 1e6:.0f} MB of weights")
    reference = None
    for name, way, mb in ways:
        got = forward(way, mb).float()
        reference = got if reference is None else reference
        same = bool(torch.equal(got, reference))
        us = 1e3 * _graph_ms(lambda i, w=way, m=mb: forward(w, m), 1) / layers
        print(f"{name:>16}: {us:7.1f} us a layer, {100 * layer_bytes / (us * 1e-6) / bandwidth:5.1f}% of the copy "
              f"bandwidth; output {'equal' if same else 'DIFFERS'}")
        if not same:
            return 1
    x = torch.randn(1, 4096, **dev)
    o_bytes = 2 * 4096 * 4096
    for name, pick in (("one weight (L2)", lambda i: weights[0]["o_proj"]), ("own weights (HBM)",
                                                                            lambda i: weights[i]["o_proj"])):
        us = 1e3 * _graph_ms(lambda i: gemv(x, pick(i)), layers)
        print(f"o_proj GEMV alone, {name:>17}: {us:6.2f} us, {o_bytes / (us * 1e-6) / 1e9:,.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
