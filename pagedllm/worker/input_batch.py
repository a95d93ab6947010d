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


ALIGN = 16  # bytes


class InputBuffers:
    """All of a step's integer inputs in one pinned host buffer and one device buffer, so that a step's inputs go
    to the device in one launch (a step used to make seven copies, each costing the device microseconds).

    A step's layout depends only on its sizes (tokens T, sequences S, block-table width W): int64 input ids,
    positions and slots [T each], int32 query_start_loc [S + 1], seq_lens [S] and block tables [S, W], packed in
    that order from offset 0. A CUDA graph of batch B reads the views of (B, B, max width): every replay of it puts
    its inputs at the same addresses.

    On CUDA a kernel reads the pinned buffer and writes the device one (host_io.stage_inputs), taking the ids that
    the step in flight sampled from its output on the device: the host writes -(1 + i) for entry i of them."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.device = device
        self.max_blocks_per_seq = round_up(max_blocks_per_seq, 16)
        self.on_gpu = device.type == "cuda"
        size = self._layout(max_tokens, max_seqs, self.max_blocks_per_seq)[-1]
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=self.on_gpu)
        self.device_buffer = torch.zeros(size, dtype=torch.uint8, device=device) if self.on_gpu else self.host
        self._copied: torch.cuda.Event | None = None  # the last load's read of the host staging is done

    @staticmethod
    def _layout(tokens: int, seqs: int, width: int) -> list[int]:
        """Byte offsets of ids, positions, slots, query_start_loc, seq_lens, block tables; and the end. Each starts
        at a multiple of ALIGN bytes: Triton specialises a kernel on its pointers' 16-byte alignment, so an offset
        that moved with the step's sizes would compile new variants in the middle of a run."""
        return aligned_offsets([8 * tokens, 8 * tokens, 8 * tokens, 4 * (seqs + 1), 4 * seqs, 4 * seqs * width])

    @staticmethod
    def _views(buffer: torch.Tensor, offsets: list[int], tokens: int, seqs: int, width: int):
        def view(i: int, dtype: torch.dtype) -> torch.Tensor:
            return buffer[offsets[i]:offsets[i + 1]].view(dtype)
        int64, int32 = torch.int64, torch.int32
        return (view(0, int64)[:tokens], view(1, int64)[:tokens], view(2, int64)[:tokens], view(3, int32)[:seqs + 1],
                view(4, int32)[:seqs], view(5, int32)[:seqs * width].view(seqs, width))

    def load(self, step: StepInputs, full_width: bool = False) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Copy the step in; returns (input_ids, positions, metadata) as views of the persistent buffers."""
        if self._copied is not None:  # with a step in flight, its staging kernel may still be reading
            self._copied.synchronize()
        tokens, seqs = len(step.input_ids), len(step.block_tables)
        # the tables' row stride, an argument of the attention kernels, always a multiple of 16: Triton specialises
        # integer arguments on that (and on == 1), so a width that moved with the step would compile new variants
        width = self.max_blocks_per_seq if full_width else round_up(max([1, *map(len, step.block_tables)]), 16)
        offsets = self._layout(tokens, seqs, width)
        host = self._views(self.host, offsets, tokens, seqs, width)
        for view, values in zip(host[:5], (step.input_ids, step.positions, step.slot_mapping, step.query_start_loc,
                                           step.seq_lens)):
            view.numpy()[:] = values
        tables = host[5].numpy()
        tables[:] = 0
        for i, table in enumerate(step.block_tables):
            tables[i, :len(table)] = table
        if step.deferred_rows:
            ids = host[0].numpy()
            if self.on_gpu:  # the staging kernel reads them from the device
                ids[step.deferred_rows] = -1 - np.asarray(step.deferred_sources)
            else:
                ids[step.deferred_rows] = step.deferred_ids.numpy()[step.deferred_sources]
        if self.on_gpu:
            from pagedllm.worker.host_io import stage_inputs
            stage_inputs(self.host[:offsets[-1]].view(torch.int64), self.device_buffer.view(torch.int64), tokens,
                         step.deferred_ids if step.deferred_rows else None)
            self._copied = torch.cuda.Event()
            self._copied.record()
        input_ids, positions, slots, query_start_loc, seq_lens, block_tables = \
            self._views(self.device_buffer, offsets, tokens, seqs, width)
        meta = AttentionMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables, slot_mapping=slots,
            num_decodes=step.num_decodes, max_query_len=step.max_query_len, max_seq_len=max(step.seq_lens),
            query_start_loc_cpu=step.query_start_loc, seq_lens_cpu=step.seq_lens)
        return input_ids, positions, meta


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned_offsets(sizes: list[int]) -> list[int]:
    """Byte offsets of spans of these sizes packed one after another, each starting at a multiple of ALIGN, and the
    end: the layout of every packed buffer a step sends to the device."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + round_up(size, ALIGN))
    return offsets


def slots_of(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end) of a sequence with this block table."""
    if end - start == 1:
        return [table[start // block_size] * block_size + start % block_size]
    positions = np.arange(start, end)
    return (np.asarray(table)[positions // block_size] * block_size + positions % block_size).tolist()
