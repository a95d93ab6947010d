"""Persistent input buffers of a step: host staging (pinned on the GPU) and device tensors, filled in place, so that
a step allocates nothing and a CUDA graph can replay over the same memory."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata


@dataclass
class StepInputs:
    """One step's inputs as host lists (decodes first)."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    num_decodes: int
    max_query_len: int
    # async scheduling: input rows whose token the step in flight sampled; deferred_ids[deferred_sources[i]] goes
    # to input row deferred_rows[i], on the device
    deferred_rows: list[int] = field(default_factory=list)
    deferred_sources: list[int] = field(default_factory=list)
    deferred_ids: torch.Tensor | None = None

    def pad_decode_batch(self, size: int) -> None:
        """Pad a decode-only batch with empty sequences (seq_len 0, nothing written) to a graph's batch size."""
        pad = size - len(self.seq_lens)
        self.input_ids += [0] * pad
        self.positions += [0] * pad
        self.slot_mapping += [-1] * pad
        self.seq_lens += [0] * pad
        self.block_tables += [[]] * pad
        self.query_start_loc = list(range(size + 1))
        self.num_decodes = size


class InputBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.device = device
        self.max_blocks_per_seq = max_blocks_per_seq
        self.on_gpu = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=self.on_gpu)
            return host, (torch.zeros(shape, dtype=dtype, device=device) if self.on_gpu else host)

        self.input_ids = pair(max_tokens, torch.int64)
        self.positions = pair(max_tokens, torch.int64)
        self.slot_mapping = pair(max_tokens, torch.int64)
        self.query_start_loc = pair(max_seqs + 1, torch.int32)
        self.seq_lens = pair(max_seqs, torch.int32)
        self.block_tables = pair((max_seqs, max_blocks_per_seq), torch.int32)
        self.deferred = pair((2, max_tokens), torch.int64)
        self._copied: torch.cuda.Event | None = None  # the last load's copies out of the host staging are done

    def _put(self, pair, values) -> torch.Tensor:
        host, device = pair
        n = len(values)
        host.numpy()[:n] = values
        if self.on_gpu:
            device[:n].copy_(host[:n], non_blocking=True)
        return device[:n]

    def load(self, step: StepInputs, full_width: bool = False) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Copy the step in; returns (input_ids, positions, metadata) as views of the persistent buffers."""
        if self._copied is not None:  # with a step in flight, its copies may still be reading the staging
            self._copied.synchronize()
        rows = len(step.block_tables)
        width = self.max_blocks_per_seq if full_width else max(1, max(len(t) for t in step.block_tables))
        host, device = self.block_tables
        tables = host.numpy()
        tables[:rows, :width] = 0
        for i, table in enumerate(step.block_tables):
            tables[i, :len(table)] = table
        if self.on_gpu:
            device[:rows].copy_(host[:rows], non_blocking=True)
        meta = AttentionMetadata(
            query_start_loc=self._put(self.query_start_loc, step.query_start_loc),
            seq_lens=self._put(self.seq_lens, step.seq_lens), block_tables=device[:rows, :width],
            slot_mapping=self._put(self.slot_mapping, step.slot_mapping), num_decodes=step.num_decodes,
            max_query_len=step.max_query_len, max_seq_len=max(step.seq_lens),
            query_start_loc_cpu=step.query_start_loc, seq_lens_cpu=step.seq_lens)
        input_ids, positions = self._put(self.input_ids, step.input_ids), self._put(self.positions, step.positions)
        if step.deferred_rows:
            n = len(step.deferred_rows)
            host, device = self.deferred
            host.numpy()[0, :n], host.numpy()[1, :n] = step.deferred_rows, step.deferred_sources
            if self.on_gpu:
                device[:, :n].copy_(host[:, :n], non_blocking=True)
            input_ids.index_copy_(0, device[0, :n], step.deferred_ids.index_select(0, device[1, :n]))
        if self.on_gpu:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return input_ids, positions, meta


def slots_of(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end) of a sequence with this block table."""
    if end - start == 1:
        return [table[start // block_size] * block_size + start % block_size]
    positions = np.arange(start, end)
    return (np.asarray(table)[positions // block_size] * block_size + positions % block_size).tolist()
