"""Pure-torch paged attention: runs anywhere, is what the CPU uses, and is the oracle for the Triton kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionMetadata


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [seq_len, num_kv_heads, head_dim] of one sequence, gathered from its blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, nb, bs, h, d]
    blocks = blocks.reshape(2, num_blocks * block_size, *kv_cache.shape[3:])[:, :seq_len]
    return blocks[0], blocks[1]


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
    starts = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd > 0:
        out[:nd] = _decode_batched(q[:nd], kv_cache, meta.block_tables[:nd], seq_lens[:nd], scale)
    for i in range(nd, len(seq_lens)):
        q_i = q[starts[i]:starts[i + 1]]
        k_i, v_i = gather_kv(kv_cache, meta.block_tables[i], seq_lens[i])
        out[starts[i]:starts[i + 1]] = _causal_attention(q_i, k_i, v_i, scale, num_heads // num_kv_heads)
    return out


def _causal_attention(q, k, v, scale, group):
    # q [n, h, d]; k, v [s, kvh, d]; the n queries are the last n positions of the s.
    n, s = q.shape[0], k.shape[0]
    q, k, v = q.transpose(0, 1), k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1)
    if n == s:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
    else:  # a cached prefix: query i sees keys up to s - n + i
        mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - n, s, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    return o.transpose(0, 1)


def _decode_batched(q, kv_cache, block_tables, seq_lens, scale):
    # One query per sequence: gather every sequence's K/V padded to the longest, mask the padding.
    b, num_heads, d = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    max_len = max(seq_lens)
    nb = (max_len + block_size - 1) // block_size
    blocks = kv_cache[:, block_tables[:, :nb].long()]  # [2, b, nb, bs, kvh, d]
    kv = blocks.reshape(2, b, nb * block_size, num_kv_heads, d)[:, :, :max_len]
    k = kv[0].to(q.dtype).transpose(1, 2)  # [b, kvh, L, d]
    v = kv[1].to(q.dtype).transpose(1, 2)
    lens = torch.tensor(seq_lens, device=q.device)
    mask = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [b, L]
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=num_heads != num_kv_heads)
    return o[:, :, 0, :]


class TorchReferenceBackend:
    name = "torch_ref"

    def write_kv(self, k, v, kv_cache, slot_mapping):
        write_kv_ref(k, v, kv_cache, slot_mapping)

    def attend(self, q, kv_cache, meta, scale):
        return paged_attention_ref(q, kv_cache, meta, scale)
