"""Would another KV-cache layout or page size bring decode attention closer to the memory's limit? An experiment.

The engine's cache is [2, num_blocks, block_size, num_kv_heads, head_dim] ("NHD"): one program, which serves one kv
head, reads 256-byte pieces (head_dim 128, bf16) spaced num_kv_heads * 256 bytes apart. "HND",
[2, num_blocks, num_kv_heads, block_size, head_dim], gives it block_size * 256 contiguous bytes a page instead. The
decode kernel takes the cache's strides, so it runs on an HND cache as it is (the same values, permuted: the
outputs are checked equal). Ragged contexts as the reference workload's decode phase (uniform in 100..1100 tokens),
longest first as the model runner orders them; each case in a replayed CUDA graph (bench_attention._graph_ms), as
a share of the copy bandwidth and of the read ceiling (a large tensor summed by torch).

    python benchmarks/bench_decode_layout.py [--heads 16 --kv-heads 8] [--batches 64,256]
"""
from __future__ import annotations

import argparse
import itertools
import random
import sys

import torch

from bench_attention import _graph_ms, copy_bandwidth  # benchmarks/ is on sys.path when this file runs as a script

# (block_n, num_warps, num_stages); the first is the engine's default for bf16, head_dim 128
CONFIGS = ((128, 4, 3), (128, 4, 2), (128, 8, 3), (64, 4, 3), (64, 4, 4), (64, 8, 4), (32, 4, 4))


def read_bandwidth() -> float:
    """Bytes per second read by torch's sum of a 2 GiB bf16 tensor (a read-only ceiling, beside the copy's)."""
    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda").normal_()
    ms = _graph_ms(lambda i: torch.sum(x, dtype=torch.float32), 1)
    return x.numel() * 2 / (ms * 1e-3)


def hnd_copy(kv_cache: torch.Tensor) -> torch.Tensor:
    """The same values in HND storage, returned as an NHD-shaped view (what the kernel indexes)."""
    two, blocks, bs, kv_heads, d = kv_cache.shape
    storage = torch.empty(two, blocks, kv_heads, bs, d, dtype=kv_cache.dtype, device=kv_cache.device)
    storage.copy_(kv_cache.permute(0, 1, 3, 2, 4))
    return storage.permute(0, 1, 3, 2, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--block-sizes", default="16,32")
    parser.add_argument("--layouts", default="NHD,HND")
    parser.add_argument("--configs", default=";".join(",".join(map(str, c)) for c in CONFIGS),
                        help="block_n,num_warps,num_stages;... (default: the sweep above)")
    parser.add_argument("--splits", default="", help="split counts to try, e.g. 1,2 (default: the engine's rule)")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    split_counts = [int(x) for x in args.splits.split(",")] if args.splits else [None]
    if not torch.cuda.is_available():
        print("bench_decode_layout: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pagedllm.attention.triton_decode import paged_decode
    from pagedllm.attention.triton_testing import make_paged_batch

    dtype = torch.bfloat16
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"device {torch.cuda.get_device_name()}: copy {copy_bw / 1e9:,.0f} GB/s, read (torch.sum) "
          f"{read_bw / 1e9:,.0f} GB/s; heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}")
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    rng = random.Random(0)
    print(f"{'batch':>5} {'page':>4} {'layout':>6} {'splits':>6} {'config (block_n, warps, stages)':>32} "
          f"{'us':>8} {'GB/s':>7} "
          f"{'% copy':>7} {'% read':>7}")
    for batch in (int(x) for x in args.batches.split(",")):
        contexts = sorted((rng.randint(100, 1100) for _ in range(batch)), reverse=True)
        nbytes = 2 * sum(contexts) * args.kv_heads * args.head_dim * 2 + 2 * batch * args.heads * args.head_dim * 2
        copies = min(64, max(1, -(-3 * l2_bytes // nbytes)))
        for block_size in (int(x) for x in args.block_sizes.split(",")):
            b = make_paged_batch([(1, c) for c in contexts] * copies, batch * copies, args.heads, args.kv_heads,
                                 args.head_dim, block_size, dtype, "cuda", torch.Generator().manual_seed(0),
                                 fill_cache=False)
            caches = {layout: b.kv_cache if layout == "NHD" else hnd_copy(b.kv_cache)
                      for layout in args.layouts.split(",")}
            out = torch.empty_like(b.q)
            scale = args.head_dim ** -0.5
            reference = None
            for layout, cache in caches.items():
                for (block_n, warps, stages), splits in itertools.product(configs, split_counts):
                    def call(i: int, cache=cache, block_n=block_n, warps=warps, stages=stages,
                             splits=splits) -> None:
                        rows = slice(i * batch, (i + 1) * batch)
                        paged_decode(b.q[rows], cache, b.meta.block_tables[rows], b.meta.seq_lens[rows], scale,
                                     out[rows], splits, block_n=block_n, num_warps=warps, num_stages=stages)
                    call(0)
                    if reference is None:
                        reference = out[:batch].clone()
                    elif not torch.allclose(out[:batch].float(), reference.float(), atol=2e-2, rtol=2e-2):
                        print(f"MISMATCH: {layout} {(block_n, warps, stages)} differs from the first case")
                        return 1
                    ms = _graph_ms(call, copies)
                    rate = nbytes / (ms * 1e-3)
                    print(f"{batch:>5} {block_size:>4} {layout:>6} {splits or 'rule':>6} "
                          f"{str((block_n, warps, stages)):>32} "
                          f"{ms * 1e3:>8.1f} {rate / 1e9:>7,.0f} {100 * rate / copy_bw:>6.1f}% "
                          f"{100 * rate / read_bw:>6.1f}%")
            del b, caches, out
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
