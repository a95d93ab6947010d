"""A step as the qkv projection leaves it, for the kernels that start from qkv (triton_decode.paged_decode_qkv,
TritonAttentionBackend.attend_qkv), and what the layers' own torch code makes of it: q/k RMSNorm (layers/norm.py),
rotary (layers/rotary.py), the reference KV write and paged attention. Shared by the interpreter test (CPU) and the
GPU tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.attention.torch_ref import paged_attention_ref, write_kv_ref
from pagedllm.attention.triton_testing import PagedBatch, make_paged_batch
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding


@dataclass
class QkvStep:
    batch: PagedBatch
    qkv: torch.Tensor  # [num_tokens, (heads + 2 * kv_heads) * head_dim], rows strided
    positions: torch.Tensor
    rotary: RotaryEmbedding
    norms: tuple  # (q_norm weight, k_norm weight, eps), or () without q/k norms
    num_heads: int


def make_step(lens: list[tuple[int, int]], num_decodes: int, heads: int, kv_heads: int, head_dim: int,
              block_size: int, qk_norm: bool, dtype: torch.dtype, device: str, gen: torch.Generator) -> QkvStep:
    """lens as make_paged_batch takes them ((query_len, seq_len), decodes first, (1, 0) = graph padding), over a
    random cache."""
    batch = make_paged_batch(lens, num_decodes, heads, kv_heads, head_dim, block_size, dtype, device, gen)
    width = (heads + 2 * kv_heads) * head_dim
    num_tokens = sum(q for q, _ in lens)
    qkv = torch.randn(num_tokens, width + 8, generator=gen).to(dtype).to(device)[:, :width]
    positions = torch.tensor([p for q, s in lens for p in range(max(s - q, 0), max(s, 1))], device=device)
    rotary = RotaryEmbedding(head_dim, max(s for _, s in lens) + 1, 10000.0, None).to(device)
    norms = ()
    if qk_norm:
        norms = tuple((torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device) for _ in range(2)) + (1e-6,)
    return QkvStep(batch, qkv, positions, rotary, norms, heads)


def reference(step: QkvStep, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output in float64, the KV cache after the write), by the layers' torch code."""
    b, heads = step.batch, step.num_heads
    kv_heads, head_dim = b.kv_cache.shape[3], b.kv_cache.shape[4]
    q, k, v = step.qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(-1, heads, head_dim)
    k = k.reshape(-1, kv_heads, head_dim)
    v = v.reshape(-1, kv_heads, head_dim)
    if step.norms:
        q_w, k_w, eps = step.norms
        q_norm, k_norm = (RMSNorm(head_dim, eps).to(q.device, q.dtype) for _ in range(2))
        with torch.no_grad():
            q_norm.weight.copy_(q_w)
            k_norm.weight.copy_(k_w)
            q, k = q_norm._norm(q), k_norm._norm(k)  # the CPU path's rounding, on any device
    q, k = step.rotary(step.positions, q, k)
    cache = b.kv_cache.clone()
    write_kv_ref(k, v, cache, b.meta.slot_mapping)
    return paged_attention_ref(q.double(), cache, b.meta, scale), cache
