"""The Triton attention backend (the GPU fast path): KV writes, decode and prefill kernels behind the one interface.

Decodes (the first meta.num_decodes sequences) go to the split-KV decode kernel, which reads no host-side lengths
and so can be captured in a CUDA graph; the remaining sequences (prefills, chunked prefills) go to the prefill
kernel, whose grid depends only on the token and sequence counts. attend_qkv starts from the qkv projection's
output: up to FUSED_DECODE_MAX_SEQS decodes take the decode kernel that does their q/k norms, rotary and KV write
itself; every other token goes through qkv_prepare first.
"""
from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.triton_decode import paged_decode, paged_decode_qkv
from pagedllm.attention.triton_kv_write import write_kv
from pagedllm.attention.triton_prefill import paged_prefill
from pagedllm.attention.triton_qkv import qkv_prepare
from pagedllm.attention.triton_utils import check_attention_inputs


# Decodes up to which attend_qkv runs them in one kernel from qkv. At batch 1-2 a layer's attention block measured
# 0.2-0.9 us faster with Qwen3-8B's heads and from 0.1 us slower to 0.4 us faster with Qwen3-0.6B's (of 10-19 us,
# contexts 512 and 4096); at batch 4, faster at 512 and 0.5-0.8 us slower at 4096 (bench_decode_block.py on an
# H200, docs/benchmarks.md). At batch 32 and more it was 2-12% slower (commit 8a68664): every split norms and
# rotates q again.
FUSED_DECODE_MAX_SEQS = 2


class TritonAttentionBackend:
    name = "triton"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        write_kv(k, v, kv_cache, slot_mapping)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        check_attention_inputs(q, kv_cache)
        num_decodes = meta.num_decodes
        num_seqs = meta.seq_lens.shape[0]
        if not 0 <= num_decodes <= num_seqs or num_decodes > q.shape[0]:
            raise ValueError(f"attention: num_decodes {num_decodes} does not fit {num_seqs} sequences "
                             f"and {q.shape[0]} tokens")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if num_decodes > 0:
            paged_decode(q[:num_decodes], kv_cache, meta.block_tables, meta.seq_lens, scale, out[:num_decodes])
        if num_seqs > num_decodes:
            paged_prefill(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, out,
                          first_seq=num_decodes)
        return out

    def attend_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float, num_heads: int, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                   q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
        """Attention straight from the qkv projection's output [num_tokens, (num_heads + 2 * kv_heads) * head_dim]:
        q/k RMSNorm (if q_norm/k_norm), rotary at positions, the KV write at meta.slot_mapping, then attend().
        Returns [num_tokens, num_heads, head_dim]."""
        num_decodes, num_tokens = meta.num_decodes, qkv.shape[0]
        num_kv_heads = kv_cache.shape[3]
        norms = (q_norm, k_norm, eps)
        if not 0 < num_decodes <= FUSED_DECODE_MAX_SEQS:
            q = qkv_prepare(qkv, positions, num_heads, num_kv_heads, cos_cache, sin_cache, kv_cache,
                            meta.slot_mapping, *norms)
            return self.attend(q, kv_cache, meta, scale)
        head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        check_attention_inputs(out, kv_cache)
        if num_decodes > num_tokens or num_decodes > meta.seq_lens.shape[0]:
            raise ValueError(f"attention: num_decodes {num_decodes} does not fit {meta.seq_lens.shape[0]} "
                             f"sequences and {num_tokens} tokens")
        q = None
        if num_tokens > num_decodes:  # the prefills' tokens: q made and K/V written first, as in any step
            q = torch.empty_like(out)  # its decode rows stay unused
            qkv_prepare(qkv[num_decodes:], positions[num_decodes:], num_heads, num_kv_heads, cos_cache, sin_cache,
                        kv_cache, meta.slot_mapping[num_decodes:], *norms, out=q[num_decodes:])
        paged_decode_qkv(qkv[:num_decodes], positions[:num_decodes], num_heads, cos_cache, sin_cache, kv_cache,
                         meta.slot_mapping[:num_decodes], meta.block_tables, meta.seq_lens, scale,
                         out[:num_decodes], *norms)
        if q is not None:
            paged_prefill(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, out,
                          first_seq=num_decodes)
        return out
