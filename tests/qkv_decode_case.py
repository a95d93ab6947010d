"""A decode step as the qkv projection leaves it, for the fused decode kernel (triton_decode.paged_decode_qkv), and
what the layers' own torch code makes of it: q/k RMSNorm (layers/norm.py), rotary (layers/rotary.py), the
reference KV write and paged attention. Shared by the interpreter test (CPU) and the GPU tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.attention.torch_ref import paged_attention_ref, write_kv_ref
from pagedllm.attention.triton_testing import PagedBatch, make_paged_batch
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding


@dataclass
class QkvDecodeCase:
    batch: PagedBatch
    qkv: torch.Tensor  # [num_seqs, (heads + 2 * kv_heads) * head_dim], rows strided
    positions: torch.Tensor
    rotary: RotaryEmbedding
    norms: tuple  # (q_norm weight, k_norm weight, eps), or () without q/k norms
    num_heads: int


def make_case(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, qk_norm: bool,
              dtype: torch.dtype, device: str, gen: torch.Generator) -> QkvDecodeCase:
    """Decodes of the given context lengths (0 = graph padding) over a random cache."""
    batch = make_paged_batch([(1, n) for n in seq_lens], len(seq_lens), heads, kv_heads, head_dim, block_size,
                             dtype, device, gen)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(len(seq_lens), width + 8, generator=gen).to(dtype).to(device)[:, :width]
    positions = torch.tensor([max(n - 1, 0) for n in seq_lens], device=device)
    rotary = RotaryEmbedding(head_dim, max(seq_lens) + 1, 10000.0, None).to(device)
    norms = ()
    if qk_norm:
        norms = tuple((torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device) for _ in range(2)) + (1e-6,)
    return QkvDecodeCase(batch, qkv, positions, rotary, norms, heads)


def reference(case: QkvDecodeCase, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output in float64, the KV cache after the write), by the layers' torch code."""
    b, heads = case.batch, case.num_heads
    kv_heads, head_dim = b.kv_cache.shape[3], b.kv_cache.shape[4]
    q, k, v = case.qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, heads, head_dim)
    k = k.reshape(-1, kv_heads, head_dim)
    v = v.reshape(-1, kv_heads, head_dim)
    if case.norms:
        q_w, k_w, eps = case.norms
        q_norm, k_norm = (RMSNorm(head_dim, eps).to(q.device, q.dtype) for _ in range(2))
        with torch.no_grad():
            q_norm.weight.copy_(q_w)
            k_norm.weight.copy_(k_w)
            q, k = q_norm._norm(q), k_norm._norm(k)  # the CPU path's rounding, on any device
    q, k = case.rotary(case.positions, q, k)
    cache = b.kv_cache.clone()
    write_kv_ref(k, v, cache, b.meta.slot_mapping)
    return paged_attention_ref(q.double(), cache, b.meta, scale), cache
