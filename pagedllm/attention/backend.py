"""The one attention interface: per-step metadata, the paged KV cache layout, and backend selection.

KV cache of one layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (index 0 = K, 1 = V).
Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size; its "slot" is
block_id * block_size + offset.

A step's batch is a flat list of tokens from several sequences. Sequences are ordered decodes first: the first
`num_decodes` sequences have exactly one query token each (so they own the first `num_decodes` tokens); the rest
have one or more (prefill, chunked prefill, or a one-token tail of a prefill, which behaves the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: token offsets of each sequence's queries
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq] (unused entries are 0)
    slot_mapping: torch.Tensor  # int64 [num_tokens]: slot of each new token's K/V; -1 means do not write
    num_decodes: int  # the first num_decodes sequences have query length 1
    max_query_len: int
    max_seq_len: int
    # Host copies for the CPU reference path (python lists); None when graphs are in use.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store k, v [num_tokens, num_kv_heads, head_dim] into their slots of kv_cache."""

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Causal attention of q [num_tokens, num_heads, head_dim] over each sequence's cached K/V
        (the new tokens included, already written). Returns [num_tokens, num_heads, head_dim]."""


def get_attention_backend(device: torch.device) -> AttentionBackend:
    if device.type == "cuda":
        from pagedllm.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    from pagedllm.attention.torch_ref import TorchReferenceBackend
    return TorchReferenceBackend()
