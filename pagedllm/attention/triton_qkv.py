"""One Triton kernel for everything between the qkv projection and attention on the GPU: per-head RMSNorm of q and
k (Qwen3), rotary embedding of both, q written out contiguous, and k and v stored into their slots of the paged KV
cache. It replaces up to six launches per layer (two copies of strided q/k, two norms, rotary, the KV write), each
a few microseconds, which a small decode step pays 28-36 times.

It rounds where the unfused path rounds (the norm's output to the activation dtype, then the rotated values), so
its results match pagedllm/layers/norm.py + rotary.py + the KV write up to the order of a float32 sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope(src, num_heads, w_ptr, cos, sin, eps,
               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
               HAS_NORM: tl.constexpr):
    """Heads [HEADS_PAD, HALF_PAD] x 2 halves of one token: optional RMSNorm per head, then rotate-half rotary."""
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    ptrs = src + heads[:, None] * HEAD_DIM + dims[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / HEAD_DIM + eps)
        w1 = tl.load(w_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        f1 = ((f1 * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]).to(x1.dtype).to(tl.float32)
        f2 = ((f2 * rstd[:, None]).to(x2.dtype).to(tl.float32) * w2[None, :]).to(x2.dtype).to(tl.float32)
    o1 = f1 * cos[None, :] - f2 * sin[None, :]
    o2 = f2 * cos[None, :] + f1 * sin[None, :]
    return o1, o2, heads, dims, mask


# positions and slots come at an offset of one int64 when a mixed step's single decode goes to the decode kernel and
# the rest here: their alignment must not pick a kernel variant (one compiled mid-run otherwise; its loads are scalar)
@triton.jit(do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])
def _qkv_prepare_kernel(qkv_ptr, positions_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, q_out_ptr,
                        k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                        stride_t, stride_qo, stride_rope, stride_cb, stride_cs, stride_ch, eps,
                        NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                        HALF_PAD: tl.constexpr,
                        Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, HAS_NORM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    half_dims = tl.arange(0, HALF_PAD)
    # The cache rows are cat(freqs, freqs): the first half holds every distinct angle.
    cos = tl.load(cos_ptr + pos * stride_rope + half_dims, mask=half_dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_rope + half_dims, mask=half_dims < HALF, other=0.0).to(tl.float32)
    row = qkv_ptr + token * stride_t

    q1, q2, heads, dims, mask = _norm_rope(row, NUM_Q, q_norm_ptr, cos, sin, eps,
                                           HEAD_DIM, HALF, Q_PAD, HALF_PAD, HAS_NORM)
    dst = q_out_ptr + token * stride_qo + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dst, q1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=mask)

    # K and V go straight to the cache; a negative slot (CUDA-graph padding) writes nothing.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    k_row = row + NUM_Q * HEAD_DIM
    k1, k2, heads, dims, mask = _norm_rope(k_row, NUM_KV, k_norm_ptr, cos, sin, eps,
                                           HEAD_DIM, HALF, KV_PAD, HALF_PAD, HAS_NORM)
    slot_ok = (tl.zeros([KV_PAD, 1], tl.int64) + slot) >= 0
    base = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    k_dst = k_cache_ptr + base + heads[:, None] * stride_ch + dims[None, :]
    tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask & slot_ok)
    tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask & slot_ok)
    full_dims = tl.arange(0, D_PAD)
    v_mask = (heads[:, None] < NUM_KV) & (full_dims[None, :] < HEAD_DIM) & slot_ok
    v = tl.load(k_row + NUM_KV * HEAD_DIM + heads[:, None] * HEAD_DIM + full_dims[None, :], mask=v_mask)
    tl.store(v_cache_ptr + base + heads[:, None] * stride_ch + full_dims[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def qkv_prepare(qkv: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int,
                cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                eps: float = 1e-6, out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (num_heads + 2 * num_kv_heads) * head_dim] (the projection's output, rows may be strided):
    returns q [T, num_heads, head_dim] normed (if q_norm) and rotated; stores k (normed if k_norm, rotated) and v
    into kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping [T] (-1 = skip).
    cos_cache/sin_cache [max_position, head_dim] as RotaryEmbedding lays them out (cat(freqs, freqs)).
    out: where q goes, [T, num_heads, head_dim] with contiguous heads (rows may be strided)."""
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError(f"qkv_prepare: qkv must be [num_tokens, width] with contiguous rows, got {tuple(qkv.shape)}")
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if head_dim * (num_heads + 2 * num_kv_heads) != qkv.shape[1] or head_dim % 2:
        raise ValueError(f"qkv_prepare: width {qkv.shape[1]} is not (heads {num_heads} + 2 x kv heads "
                         f"{num_kv_heads}) x an even head_dim")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != (num_kv_heads, head_dim) \
            or kv_cache.stride(4) != 1:
        raise ValueError(f"qkv_prepare: kv_cache {tuple(kv_cache.shape)} is not [2, num_blocks, block_size, "
                         f"{num_kv_heads}, {head_dim}] with a contiguous head_dim")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"qkv_prepare: positions {tuple(positions.shape)} and slot_mapping "
                         f"{tuple(slot_mapping.shape)} must both be [{num_tokens}]")
    if cos_cache.shape[-1] != head_dim or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"qkv_prepare: cos/sin caches {tuple(cos_cache.shape)} do not match head_dim {head_dim}")
    if (q_norm is None) != (k_norm is None) or (q_norm is not None and (q_norm.shape != (head_dim,)
                                                                         or k_norm.shape != (head_dim,))):
        raise ValueError(f"qkv_prepare: q_norm and k_norm must both be [{head_dim}] or both None")
    if out is None:
        q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (num_tokens, num_heads, head_dim) or out.stride(2) != 1 or out.stride(1) != head_dim:
        raise ValueError(f"qkv_prepare: out {tuple(out.shape)} is not [{num_tokens}, {num_heads}, {head_dim}] "
                         "with contiguous heads")
    else:
        q_out = out
    if num_tokens == 0:
        return q_out
    cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    has_norm = q_norm is not None
    _qkv_prepare_kernel[(num_tokens,)](
        qkv, positions, q_norm if has_norm else cos_cache, k_norm if has_norm else cos_cache, cos_cache, sin_cache,
        q_out, k_cache, v_cache, slot_mapping,
        qkv.stride(0), q_out.stride(0), cos_cache.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), eps,
        NUM_Q=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        Q_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=kv_cache.shape[2], HAS_NORM=has_norm,
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )
    return q_out
