"""Triton decode attention over the paged KV cache: one query token per sequence, flash-decoding style.

Grid (num_kv_heads, num_splits, num_seqs): the kv heads and splits of one sequence launch one after another, so a
batch ordered longest context first (the model runner orders decodes so) runs its longest programs first and the
short ones fill the tail of the last wave. A program serves every query head of one kv head (the GQA group is
the rows of its tl.dot, padded to 16), so K/V are read from HBM once per kv head. When the batch alone cannot fill
the GPU, each sequence's context is cut into `num_splits` chunks, each program writes a normalised partial output
and its log-sum-exp, and the last program of a (sequence, kv head) to finish merges them: it knows it is last from
an atomic counter, which it then sets back to 0 for the next launch. That spares a second kernel and its launch gap
per layer, which a small decode step (where the splits are) pays 28-36 times. `num_splits` depends only on the batch shape and the device,
never on sequence lengths, so the launch is CUDA-graph capturable; a program whose chunk starts past its
sequence's end runs no iterations (a seq_len of 0, graph padding, reads nothing and yields zeros).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import dot_precision, num_sms

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
MAX_GRID_SEQS = 65535  # CUDA's limit on a grid's third axis, which holds the sequences
MAX_SPLIT_GROUPS = 1 << 16  # (sequence, kv head) pairs one split launch may count: one int32 counter each


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    head_dim, num_heads, num_kv_heads, group,
    BLOCK_G: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D_PAD)
    heads = kv_head * group + rows
    row_mask = rows < group
    dim_mask = dims < head_dim
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D_PAD], tl.float32)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        block = tl.load(block_row + cols // BLOCK_SIZE, mask=col_mask, other=0).to(tl.int64)
        base = block * stride_cb + (cols % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k_t = tl.load(k_cache_ptr + base[None, :] + dims[:, None],
                      mask=col_mask[None, :] & dim_mask[:, None], other=0.0)  # [D, N]
        v = tl.load(v_cache_ptr + base[:, None] + dims[None, :],
                    mask=col_mask[:, None] & dim_mask[None, :], other=0.0)  # [N, D]
        qk = tl.dot(q, k_t.to(q.dtype), input_precision=PRECISION) * scale_log2
        qk = tl.where(col_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    result = acc / safe_l[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    dst = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    if NUM_SPLITS == 1:
        tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_out [num_seqs, num_heads, NUM_SPLITS, D_PAD], part_lse [num_seqs, num_heads, NUM_SPLITS]
        head_parts = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS
        tl.store(part_out_ptr + (head_parts + split)[:, None] * D_PAD + dims[None, :], result, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + head_parts + split, lse, mask=row_mask)
        # Every thread's stores come before the count (the barrier), and the count releases them to the program
        # that counts last; that one acquires them, resets the counter and merges.
        tl.debug_barrier()
        counter = counters_ptr + seq * num_kv_heads + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:
            tl.store(counter, 0)
            _merge_splits(part_out_ptr, part_lse_ptr, dst, head_parts, row_mask, dims, out_mask,
                          NUM_SPLITS, D_PAD)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, dst, head_parts, row_mask, dims, out_mask,
                  NUM_SPLITS: tl.constexpr, D_PAD: tl.constexpr):
    """Weights each split's partial output by its exp(lse) over the rows of one kv head's query heads; an empty
    split (lse = -inf) weighs 0 and its partial, never written, is not read. Loads bypass L1 (.cg): the other
    programs' partials are only in L2."""
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(part_lse_ptr + head_parts[:, None] + splits[None, :], mask=row_mask[:, None],
                  other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse - top[:, None]), 1)
    acc = tl.zeros(out_mask.shape, tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        weight = tl.exp2(tl.load(part_lse_ptr + head_parts + s, mask=row_mask, other=float("-inf"),
                                 cache_modifier=".cg") - top)
        partial = tl.load(part_out_ptr + (head_parts + s)[:, None] * D_PAD + dims[None, :],
                          mask=out_mask & (weight[:, None] > 0), other=0.0, cache_modifier=".cg")
        acc += partial * weight[:, None]
    result = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(dst, result.to(dst.dtype.element_ty), mask=out_mask)


_split_counters: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """The device's split counters: zeros, and every split launch leaves them zero. Made on the first split launch,
    which must not be inside a CUDA-graph capture (the model runner warms every graph's batch size up eagerly
    first). Two split launches must not run at the same time on two streams of one device: they would share them."""
    counters = _split_counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged_decode: the first split launch on a device must run outside CUDA-graph capture")
        counters = _split_counters[device] = torch.zeros(MAX_SPLIT_GROUPS, dtype=torch.int32, device=device)
    return counters


def choose_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Split the context when the batch alone leaves SMs idle: enough programs for about one wave over the SMs, a
    power of two, at most MAX_SPLITS. Between one and two waves, 2 splits even out the second wave's ragged tail
    (bench_attention.py --ragged on an H200: 7-8% faster at batch 32 with 8 kv heads, slower from batch 64)."""
    programs = max(1, num_seqs * num_kv_heads)
    sms = num_sms(device)
    want = triton.cdiv(sms, programs)
    if want > 1:
        return min(MAX_SPLITS, triton.next_power_of_2(want))
    return 2 if programs < 2 * sms else 1


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, out: torch.Tensor, num_splits: int | None = None, *, block_n: int | None = None,
                 num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """Attention of q [num_seqs, num_heads, head_dim] (one query per sequence, at position seq_len - 1) over the
    paged cache; writes out [num_seqs, num_heads, head_dim]. block_tables/seq_lens may have more rows than q.
    num_splits / block_n / num_warps / num_stages override the tuned defaults (tests, benchmarks)."""
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return out
    if num_seqs > MAX_GRID_SEQS:
        raise ValueError(f"paged_decode: {num_seqs} sequences in one launch; at most {MAX_GRID_SEQS} "
                         "(the grid's third axis)")
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, q.device)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"paged_decode: num_splits must be a power of two >= 1, got {num_splits}")
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    if block_n is None:  # 128 measured best on an H200 for bf16, head_dim 128 (bench_attention.py --tune); 64 is
        # 2-4% faster on bench_decode_layout.py's batch >= 128 but not on the engine's workload (docs/benchmarks.md)
        block_n = 128 if d_pad <= 128 else 64
        if q.dtype == torch.float32:  # fp32 dots run on FMA units; larger tiles spill registers
            block_n = 16
    if num_stages is None:
        num_stages = 2 if q.dtype == torch.float32 else 3
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_splits > 1:
        if num_seqs * num_kv_heads > MAX_SPLIT_GROUPS:
            raise ValueError(f"paged_decode: {num_seqs} sequences x {num_kv_heads} kv heads split in {num_splits}; "
                             f"a split launch counts at most {MAX_SPLIT_GROUPS} (sequence, kv head) pairs")
        part_out = torch.empty(num_seqs, num_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        counters = split_counters(q.device)
    else:
        part_out = part_lse = counters = out  # unused by the kernel when NUM_SPLITS == 1
    _decode_kernel[(num_kv_heads, num_splits, num_seqs)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, counters,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        head_dim, num_heads, num_kv_heads, group,
        BLOCK_G=block_g, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
