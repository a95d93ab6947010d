"""Triton prefill / chunked-prefill attention over the paged KV cache: variable query lengths in one launch.

Query i of a sequence with q_len queries and seq_len tokens of context sits at position seq_len - q_len + i and sees
keys 0..that position (a cached prefix, then the causal part over the new tokens).

Grid (query tiles, num_heads // HEADS). A program takes HEADS query heads of one kv head (GQA) at once: its tile is
BLOCK_M tokens x HEADS heads as BLOCK_M * HEADS rows, so each key and value tile it loads serves HEADS heads.
The tiles of all sequences are laid out without a host sync: sequence i owns tile slots from
`query_start_loc[i] // BLOCK_M + i` on, which always leaves room for its cdiv(q_len, BLOCK_M) tiles; a program
finds its sequence by binary search over query_start_loc, and a slot past its sequence's tiles does nothing. So
the grid depends only on the number of tokens and sequences. Keys below the tile's first position need no causal
mask and are streamed in a mask-free loop; only the tail near the diagonal is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_row, n0, kv_head, positions, seq_len,
                 scale_log2, stride_cb, stride_cs, stride_ch,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    if CAUSAL:
        col_mask = cols < seq_len
        block = tl.load(block_row + cols // BLOCK_SIZE, mask=col_mask, other=0).to(tl.int64)
    else:
        block = tl.load(block_row + cols // BLOCK_SIZE).to(tl.int64)
    base = block * stride_cb + (cols % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    k_ptrs = k_cache_ptr + base[None, :] + dims[:, None]
    v_ptrs = v_cache_ptr + base[:, None] + dims[None, :]
    if CAUSAL:
        k_t = tl.load(k_ptrs, mask=col_mask[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=col_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == D_PAD:
        k_t = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k_t = tl.load(k_ptrs, mask=dims[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    qk = tl.dot(q, k_t.to(q.dtype), input_precision=PRECISION) * scale_log2
    if CAUSAL:
        visible = (cols[None, :] <= positions[:, None]) & col_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return acc, m_new, l_i


# first_seq and num_seqs change from step to step: unspecialised, so that one compiled variant serves every step
# (Triton would otherwise compile a variant for each of ==1 / divisible by 16 / other, in the middle of a run).
@triton.jit(do_not_specialize=["first_seq", "num_seqs"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    first_seq, num_seqs, group,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, PRECISION: tl.constexpr,
):
    # Slots in reverse: a sequence's last tiles see the most keys, so they start first (shorter tail).
    slot = tl.num_programs(0) - 1 - tl.program_id(0)
    first_head = tl.program_id(1) * HEADS  # HEADS divides group: the program's heads share one kv head
    kv_head = first_head // group

    # Find the sequence whose tile slots contain this slot: the last i with first_slot(i) <= slot.
    base_slot = tl.load(query_start_loc_ptr + first_seq) // BLOCK_M
    lo = tl.full([], 0, tl.int32) + first_seq
    hi = tl.full([], 0, tl.int32) + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_slot = tl.load(query_start_loc_ptr + mid) // BLOCK_M + (mid - first_seq) - base_slot
        lo = tl.where(mid_slot <= slot, mid, lo)
        hi = tl.where(mid_slot <= slot, hi, mid)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = slot - (q_start // BLOCK_M + (seq - first_seq) - base_slot)
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    # Row r of the tile: token tile * BLOCK_M + r // HEADS of the sequence, head first_head + r % HEADS.
    r = tl.arange(0, BLOCK_M * HEADS)
    rows = tile * BLOCK_M + r // HEADS  # query index within the sequence
    heads = first_head + r % HEADS
    dims = tl.arange(0, D_PAD)
    row_mask = rows < q_len
    q_offs = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_offs[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    positions = prefix + rows

    # Keys this tile sees: [0, hi_key). A slot past the sequence's tiles sees none and stores nothing.
    first_pos = prefix + tile * BLOCK_M
    hi_key = tl.minimum(seq_len, first_pos + BLOCK_M)
    hi_key = tl.where(tile * BLOCK_M < q_len, hi_key, 0)
    full_end = tl.minimum((first_pos // BLOCK_N) * BLOCK_N, hi_key)

    m_i = tl.full([BLOCK_M * HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * HEADS], tl.float32)
    acc = tl.zeros([BLOCK_M * HEADS, D_PAD], tl.float32)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_row, n0, kv_head,
                                     positions, seq_len, scale_log2, stride_cb, stride_cs, stride_ch,
                                     HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_N, False, PRECISION)
    for n0 in range(full_end, hi_key, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_row, n0, kv_head,
                                     positions, seq_len, scale_log2, stride_cb, stride_cs, stride_ch,
                                     HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_N, True, PRECISION)

    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = out_ptr + q_offs[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (dims[None, :] < HEAD_DIM))


def _tile_config(head_dim_pad: int, dtype: torch.dtype, group: int) -> tuple[int, int, int, int]:
    """(rows, BLOCK_N, num_warps, num_stages), chosen so that no variant spills registers on sm_90. A tile's rows
    are BLOCK_M tokens x the heads a program takes (heads_per_program)."""
    if dtype == torch.float32:  # fp32 dots run on FMA units: small tiles, many warps
        return 32, 16, 8, 2
    if head_dim_pad > 128:
        return 64, 32, 8, 2
    # Measured on an H200 (benchmarks/bench_attention.py --prefill-only --tune, head_dim 128, 2026-12-01), on one
    # prefill step of the reference workload (14 prompts): with 4 heads of a GQA group a program (Qwen3-8B's
    # 32/8), tiles of 32 tokens x 4 heads and 32 keys ran at 212 TFLOP/s, against 187 for 16 tokens x 4 heads and
    # 64 keys, and less with one head a program; with 2 heads (Qwen3-0.6B's 16/8), 64 rows and 64 keys were within
    # 1% of the best.
    return (128, 32, 4, 3) if heads_per_program(group, 128) >= 4 else (64, 64, 4, 3)


def heads_per_program(group: int, rows: int) -> int:
    """The query heads a program takes at once: the largest power of two that divides the GQA group and leaves at
    least 16 tokens in a tile of `rows` rows (tl.dot's smallest M)."""
    heads = 1
    while group % (2 * heads) == 0 and rows // (2 * heads) >= 16:
        heads *= 2
    return heads


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, scale: float, out: torch.Tensor, first_seq: int = 0,
                  tile: tuple[int, int, int, int] | None = None, heads: int | None = None) -> torch.Tensor:
    """Causal attention for sequences first_seq.. of the batch (any query lengths >= 1) over the paged cache.
    q and out are [num_tokens, num_heads, head_dim] of the whole batch; only those sequences' rows are written.
    tile = (rows, BLOCK_N, num_warps, num_stages) overrides the tuned default, heads the query heads a program
    takes (a power of two that divides the GQA group; rows // heads tokens a tile); for tests and benchmarks."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_prefills = num_seqs - first_seq
    if num_prefills <= 0:
        return out
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    rows, bn, warps, stages = tile if tile is not None else _tile_config(d_pad, q.dtype, group)
    heads = heads or heads_per_program(group, rows)
    if group % heads or heads & (heads - 1) or rows % heads or rows // heads < 16:
        raise ValueError(f"paged_prefill: {heads} heads a program must be a power of two dividing the group "
                         f"({group}) and leave 16 or more of the tile's {rows} rows to each head")
    bm = rows // heads  # tokens a tile
    # Upper bound on the tile slots (see the module docstring): never more than this many are used.
    num_slots = num_tokens // bm + num_prefills
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _prefill_kernel[(num_slots, num_heads // heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        first_seq, num_seqs, group,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_M=bm, BLOCK_N=bn, HEADS=heads, PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out
