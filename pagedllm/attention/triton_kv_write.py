"""Triton kernel that stores the K/V of this step's new tokens into their slots of the paged KV cache.

One program per token copies all of its kv heads for K and V. A slot of -1 (CUDA-graph padding) is skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, D_PAD)
    # A negative slot turns every lane's mask off: no branch, and nothing is read or written.
    slot_ok = (tl.zeros([HEADS_PAD, 1], tl.int64) + slot) >= 0
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_dim) & slot_ok
    token64 = token.to(tl.int64)
    src_k = k_ptr + token64 * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = v_ptr + token64 * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [num_tokens, num_kv_heads, head_dim] into kv_cache [2, num_blocks, block_size, kv_heads, head_dim]
    at slot_mapping [num_tokens] (int64; -1 = skip). k and v may be strided views (e.g. slices of a fused qkv)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv: k and v must both be [num_tokens, num_kv_heads, head_dim], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != tuple(k.shape[1:]):
        raise ValueError(f"write_kv: kv_cache {tuple(kv_cache.shape)} does not match k {tuple(k.shape)} "
                         "(expected [2, num_blocks, block_size, num_kv_heads, head_dim])")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"write_kv: slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if k_cache.stride(3) != 1:
        raise ValueError("write_kv: kv_cache's head_dim axis must be contiguous")
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_SIZE=kv_cache.shape[2],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
