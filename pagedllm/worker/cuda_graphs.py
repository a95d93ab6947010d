"""CUDA graphs for decode steps: the model's forward and logits captured once per batch size at startup (all sharing
one memory pool, all reading the persistent input buffers), replayed with the batch padded to the next captured
size."""
from __future__ import annotations

import logging
import time

import torch

from pagedllm.worker.input_batch import InputBuffers, StepInputs

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, buffers: InputBuffers, max_num_seqs: int) -> None:
        self.model = model
        self.buffers = buffers
        self.sizes = capture_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so the smaller ones reuse its memory
            step = StepInputs([], [], [], [0], [], [], 0, 1)
            step.pad_decode_batch(size)
            step.seq_lens = [1] * size  # something valid to attend over while capturing
            input_ids, positions, meta = self.buffers.load(step, full_width=True)
            meta.query_start_loc_cpu = meta.seq_lens_cpu = None
            meta.max_seq_len = 0  # not known at capture: the kernels must not depend on it
            # warm-up: Triton compiles, the allocator settles
            self.model.compute_logits(self.model(input_ids, positions, meta))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model.compute_logits(self.model(input_ids, positions, meta))
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [padded batch, vocab] of a decode-only step already padded to a captured batch size."""
        size = len(step.seq_lens)
        self.buffers.load(step, full_width=True)
        self.graphs[size].replay()
        return self.outputs[size]
