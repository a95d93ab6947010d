"""Random paged-attention batches for the kernel tests and the attention micro-benchmark.

A batch is a list of (query_len, seq_len) per sequence, decodes first. Every physical block of the cache (used or
not) is filled with random values, block tables are a random permutation of blocks, and unused table entries are
0, so a kernel that reads past a sequence's end or ignores its block table gives a wrong answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.attention.backend import AttentionMetadata


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_new: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]: this step's keys, not yet in the cache
    v_new: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata


def make_paged_batch(lens: list[tuple[int, int]], num_decodes: int, num_heads: int, num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
                     generator: torch.Generator | None = None, spare_blocks: int = 3,
                     fill_cache: bool = True) -> PagedBatch:
    """lens[i] = (query_len, seq_len) with 1 <= query_len <= seq_len (seq_len 0 with query_len 1 is allowed for
    decodes: graph padding, whose slot is -1). The first num_decodes sequences must have query_len 1."""
    device = torch.device(device)
    for i, (q_len, seq_len) in enumerate(lens):
        if i < num_decodes and q_len != 1:
            raise ValueError(f"sequence {i} is a decode but has query_len {q_len}")
        if q_len < 1 or (seq_len < q_len and not (i < num_decodes and seq_len == 0)):
            raise ValueError(f"sequence {i}: bad (query_len, seq_len) = {(q_len, seq_len)}")
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in lens]
    max_blocks = max(1, max(blocks_per_seq))
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    starts = [0]
    taken = 0
    for i, (q_len, seq_len) in enumerate(lens):
        table = perm[taken:taken + blocks_per_seq[i]]
        taken += blocks_per_seq[i]
        block_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        if seq_len == 0:
            slots.append(-1)
        else:
            slots.extend(table[pos // block_size] * block_size + pos % block_size
                         for pos in range(seq_len - q_len, seq_len))
        starts.append(starts[-1] + q_len)
    num_tokens = starts[-1]
    shape_cache = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if fill_cache:
        kv_cache = torch.randn(shape_cache, generator=generator).to(dtype).to(device)
    else:
        kv_cache = torch.empty(shape_cache, dtype=dtype, device=device).normal_()
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(dtype).to(device)
    k_new = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype).to(device)
    v_new = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype).to(device)
    seq_lens = [seq_len for _, seq_len in lens]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decodes=num_decodes,
        max_query_len=max(q_len for q_len, _ in lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return PagedBatch(q=q, k_new=k_new, v_new=v_new, kv_cache=kv_cache, meta=meta)
