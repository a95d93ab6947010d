"""Triton decode attention over the paged KV cache: one query token per sequence, flash-decoding style.

Grid (num_kv_heads, num_splits, num_seqs): the kv heads and splits of one sequence launch one after another, so a
batch ordered longest context first (the model runner orders decodes so) runs its longest programs first and the
short ones fill the tail of the last wave. A program serves every query head of one kv head (the GQA group is
the rows of its tl.dot, padded to 16), so K/V are read from HBM once per kv head. When the batch alone cannot fill
the GPU, each sequence's context is cut into `num_splits` chunks, each program writes a normalised partial output
and its log-sum-exp, and a second kernel merges them. `num_splits` depends only on the batch shape and the device,
never on sequence lengths, so the launch is CUDA-graph capturable; a program whose chunk starts past its
sequence's end runs no iterations (a seq_len of 0, graph padding, reads nothing and yields zeros). Merging in the
last program of a (sequence, kv head) to finish, found by an atomic counter, measured 1-4 us a layer slower at
batch 1-4 on an H200 than the second kernel (bench_decode_block.py on dcc437c's kernels); likely because its
loads wait one after another behind the slowest chunk, where the merge kernel's programs run side by side.

paged_decode_qkv starts from the qkv projection's output instead of q: each program norms and rotates its heads' q
itself, and the program whose chunk holds the new token also norms and rotates its k and writes k and v into the
cache (what triton_qkv.qkv_prepare does), for steps of a few decodes (TritonAttentionBackend.attend_qkv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import dot_precision, num_sms

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
# From this many splits (decode steps of 1-2 sequences with 8 kv heads on an H200) the key tile is 64 wide, not
# 128, and each split's chunk a whole number of pages, not of tiles (SPLIT_ALIGN), so that a short context spreads
# over every split, each a partly masked tile: bench_decode_block.py measured the attention block 0.1-0.75 us
# faster at batch 1-2 for 512-4096 tokens, and slower at batch 4 (8 splits) for 4096 (docs/benchmarks.md)
SMALL_TILE_SPLITS = 16
# From this many (batch 1 with 8 kv heads) the key tile is 32 wide: measured 0.4-1.0 us a block faster than 64 for
# 512-1024 tokens, even at 2048, and 0.6 us slower at 4096 (bench_decode_block.py, docs/benchmarks.md)
TINY_TILE_SPLITS = 32
MAX_GRID_SEQS = 65535  # CUDA's limit on a grid's third axis, which holds the sequences


@triton.jit
def _norm_rope(row_ptr, head_offsets, row_mask, dims, dim_mask, head_dim, cos, sin, norm_ptr, eps,
               HAS_NORM: tl.constexpr):
    """Heads [R, D_PAD] of one token at row_ptr + head_offsets: RMSNorm per head (if HAS_NORM), then rotate-half
    rotary, in fp32, rounded where triton_qkv.py rounds. Each element is loaded with its rotary partner (d +- half)."""
    half = head_dim // 2
    partner = tl.where(dims < half, dims + half, dims - half)
    mask = row_mask[:, None] & dim_mask[None, :]
    x = tl.load(row_ptr + head_offsets[:, None] + dims[None, :], mask=mask, other=0.0)
    xp = tl.load(row_ptr + head_offsets[:, None] + partner[None, :], mask=mask, other=0.0)
    f = x.to(tl.float32)
    fp = xp.to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(f * f, 1) / head_dim + eps)
        w = tl.load(norm_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
        wp = tl.load(norm_ptr + partner, mask=dim_mask, other=0.0).to(tl.float32)
        f = ((f * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype).to(tl.float32)
        fp = ((fp * rstd[:, None]).to(x.dtype).to(tl.float32) * wp[None, :]).to(x.dtype).to(tl.float32)
    sign = tl.where(dims < half, -1.0, 1.0)
    return f * cos[None, :] + sign[None, :] * fp * sin[None, :]


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
    scale_log2, eps,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh, stride_rope,
    head_dim, num_heads, num_kv_heads, group,
    BLOCK_G: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    FROM_QKV: tl.constexpr, HAS_NORM: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), SPLIT_ALIGN) * SPLIT_ALIGN
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D_PAD)
    heads = kv_head * group + rows
    row_mask = rows < group
    dim_mask = dims < head_dim
    q_row = q_ptr + seq.to(tl.int64) * stride_qt
    if FROM_QKV:
        # q_ptr is the qkv projection's output: every program norms and rotates its heads' q, and the one whose
        # chunk holds the new token (position seq_len - 1) takes that token's k and v from qkv as well: it stores
        # them into the cache and counts them in from registers, so no program reads their slot.
        pos = tl.load(positions_ptr + seq).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_rope + dims, mask=dim_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_rope + dims, mask=dim_mask, other=0.0).to(tl.float32)
        q = _norm_rope(q_row, heads * head_dim, row_mask, dims, dim_mask, head_dim, cos, sin, q_norm_ptr, eps,
                       HAS_NORM).to(q_ptr.dtype.element_ty)
        holds_new = (start <= seq_len - 1) & (seq_len - 1 < end)
        end = tl.minimum(end, seq_len - 1)
        # Every program loads the new k and v (a few hundred bytes from L2) ahead of its loop, where their latency
        # hides; only the one that holds the new token uses them.
        first = rows < 1
        k_offset = (num_heads + kv_head) * head_dim
        k_new = _norm_rope(q_row, k_offset + 0 * rows, first, dims, dim_mask, head_dim, cos, sin, k_norm_ptr,
                           eps, HAS_NORM)
        k_new = tl.sum(tl.where(first[:, None], k_new, 0.0), 0).to(k_cache_ptr.dtype.element_ty)  # [D_PAD]
        v_new = tl.load(q_row + k_offset + num_kv_heads * head_dim + dims, mask=dim_mask, other=0.0)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
    else:
        q = tl.load(q_row + heads[:, None] * stride_qh + dims[None, :],
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

    if FROM_QKV:
        if holds_new:
            slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
            base = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            write = dim_mask & ((tl.zeros([D_PAD], tl.int64) + slot) >= 0)  # a slot of -1 (padding): none
            tl.store(k_cache_ptr + base + dims, k_new, mask=write)
            tl.store(v_cache_ptr + base + dims, v_new, mask=write)
            # The new key and value, as the cache holds them, are one more column of the online softmax.
            k_f = k_new.to(q.dtype).to(tl.float32)
            v_f = v_new.to(q.dtype).to(tl.float32)
            s_new = tl.sum(q.to(tl.float32) * k_f[None, :], 1) * scale_log2
            m_new = tl.maximum(m_i, s_new)
            p_new = tl.exp2(s_new - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_f[None, :]
            m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    result = acc / safe_l[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_out [num_seqs, num_heads, NUM_SPLITS, D_PAD], part_lse [num_seqs, num_heads, NUM_SPLITS]
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * D_PAD + dims[None, :], result, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, head_dim, num_heads,
    NUM_SPLITS: tl.constexpr, D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, D_PAD)
    part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)  # 0 for empty splits (lse = -inf)
    partial = tl.load(part_out_ptr + part[:, None] * D_PAD + dims[None, :])
    partial = tl.where(weight[:, None] > 0, partial, 0.0)  # empty splits never wrote their rows
    total = tl.sum(weight, 0)
    result = tl.sum(partial * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    dst = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


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
    return _launch(q, q.stride(0), q.stride(1), q.shape[1], kv_cache, block_tables, seq_lens, scale, out, None,
                   num_splits, block_n, num_warps, num_stages)


def paged_decode_qkv(qkv: torch.Tensor, positions: torch.Tensor, num_heads: int, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                     num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Decode attention straight from the qkv projection's output qkv [num_seqs, (num_heads + 2 * kv_heads) *
    head_dim] (one token per sequence): what triton_qkv.qkv_prepare and paged_decode do, in one launch. q and k are
    normed (if q_norm/k_norm, Qwen3) and rotated at positions [num_seqs]; k and v are stored into kv_cache at
    slot_mapping [num_seqs] (-1 = skip); writes out [num_seqs, num_heads, head_dim]. cos_cache/sin_cache
    [max_position, head_dim] as RotaryEmbedding lays them out (cat(freqs, freqs)). num_splits / block_n override
    the defaults (benchmarks)."""
    num_kv_heads = kv_cache.shape[3]
    num_seqs, width = qkv.shape if qkv.dim() == 2 else (0, 0)
    head_dim = width // (num_heads + 2 * num_kv_heads) if qkv.dim() == 2 else 0
    if qkv.dim() != 2 or qkv.stride(1) != 1 or head_dim % 2 or head_dim * (num_heads + 2 * num_kv_heads) != width:
        raise ValueError(f"paged_decode_qkv: qkv {tuple(qkv.shape)} is not [num_seqs, (heads {num_heads} + 2 x kv "
                         f"heads {num_kv_heads}) x an even head_dim] with contiguous rows")
    if positions.shape != (num_seqs,) or slot_mapping.shape != (num_seqs,):
        raise ValueError(f"paged_decode_qkv: positions {tuple(positions.shape)} and slot_mapping "
                         f"{tuple(slot_mapping.shape)} must both be [{num_seqs}]")
    if cos_cache.shape[-1] != head_dim or sin_cache.shape != cos_cache.shape or cos_cache.stride(-1) != 1 \
            or sin_cache.stride() != cos_cache.stride():
        raise ValueError(f"paged_decode_qkv: cos/sin caches {tuple(cos_cache.shape)} do not match head_dim "
                         f"{head_dim}")
    if (q_norm is None) != (k_norm is None) or (q_norm is not None and (q_norm.shape != (head_dim,)
                                                                         or k_norm.shape != (head_dim,))):
        raise ValueError(f"paged_decode_qkv: q_norm and k_norm must both be [{head_dim}] or both None")
    if out.shape != (num_seqs, num_heads, head_dim):
        raise ValueError(f"paged_decode_qkv: out {tuple(out.shape)} is not [{num_seqs}, {num_heads}, {head_dim}]")
    fused = (positions, slot_mapping, cos_cache, sin_cache, q_norm, k_norm, eps)
    return _launch(qkv, qkv.stride(0), head_dim, num_heads, kv_cache, block_tables, seq_lens, scale, out, fused,
                   num_splits, block_n, 4, None)


def _launch(q_src: torch.Tensor, stride_qt: int, stride_qh: int, num_heads: int, kv_cache: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor, fused: tuple | None,
            num_splits: int | None, block_n: int | None, num_warps: int, num_stages: int | None) -> torch.Tensor:
    """The decode kernel over q (fused is None) or qkv (fused = (positions, slot_mapping, cos, sin, q_norm, k_norm,
    eps)), whose q rows start every stride_qt elements and whose heads every stride_qh."""
    num_seqs, head_dim = out.shape[0], out.shape[2]
    if num_seqs == 0:
        return out
    if num_seqs > MAX_GRID_SEQS:
        raise ValueError(f"paged_decode: {num_seqs} sequences in one launch; at most {MAX_GRID_SEQS} "
                         "(the grid's third axis)")
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, q_src.device)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"paged_decode: num_splits must be a power of two >= 1, got {num_splits}")
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    if block_n is None:  # 128 measured best on an H200 for bf16, head_dim 128 (bench_attention.py --tune); 64 is
        # 2-4% faster on bench_decode_layout.py's batch >= 128 but not on the engine's workload (docs/benchmarks.md)
        block_n = 128 if d_pad <= 128 and num_splits < SMALL_TILE_SPLITS else \
            64 if num_splits < TINY_TILE_SPLITS else 32
        if q_src.dtype == torch.float32:  # fp32 dots run on FMA units; larger tiles spill registers
            block_n = 16
    if num_stages is None:
        num_stages = 2 if q_src.dtype == torch.float32 else 3
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, d_pad, dtype=torch.float32, device=out.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=out.device)
    else:
        part_out = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    positions, slot_mapping, cos_cache, sin_cache, q_norm, k_norm, eps = fused or (out, out, out, out, None, None, 0.0)
    has_norm = q_norm is not None
    _decode_kernel[(num_kv_heads, num_splits, num_seqs)](
        q_src, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        positions, slot_mapping, cos_cache, sin_cache, q_norm if has_norm else out, k_norm if has_norm else out,
        scale * LOG2E, eps,
        stride_qt, stride_qh, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), cos_cache.stride(0) if fused else 0,
        head_dim, num_heads, num_kv_heads, group,
        BLOCK_G=block_g, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        SPLIT_ALIGN=block_size if num_splits >= SMALL_TILE_SPLITS else block_n,
        PRECISION=dot_precision(q_src.dtype), FROM_QKV=fused is not None, HAS_NORM=has_norm,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), head_dim, num_heads,
            NUM_SPLITS=num_splits, D_PAD=d_pad, num_warps=4,
        )
    return out
