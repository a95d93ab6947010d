"""The Triton attention backend (the GPU fast path): KV writes, decode and prefill kernels behind the one interface.

Decodes (the first meta.num_decodes sequences) go to the split-KV decode kernel, which reads no host-side lengths
and so can be captured in a CUDA graph; the remaining sequences (prefills, chunked prefills) go to the prefill
kernel, whose grid depends only on the token and sequence counts.
"""
from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.triton_decode import paged_decode
from pagedllm.attention.triton_kv_write import write_kv
from pagedllm.attention.triton_prefill import paged_prefill
from pagedllm.attention.triton_utils import check_attention_inputs


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
