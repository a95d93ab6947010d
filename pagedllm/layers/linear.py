"""The decoder's linear layers: nn.Linear, except that a call of up to GEMV_MAX_ROWS rows on a CUDA device in 16-bit
floats (a decode step of a few sequences) takes the Triton matrix-vector product of triton_gemv.py, which streams
the weight closer to the memory's bandwidth than cuBLAS does at those shapes."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


# Rows up to which a call takes the GEMV: where it measured faster than cuBLAS on an H200 for both Qwen3-8B's and
# Qwen3-0.6B's layers (benchmarks/bench_pdl.py --rows: 3-5% and 10-14% a layer at 1-4 rows; at 8 and 16 rows still
# 3-7% for 8B's, but 10-19% slower for 0.6B's; docs/benchmarks.md).
GEMV_MAX_ROWS = 4


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16):
            from pagedllm.layers.triton_gemv import gemv, supports
            if supports(x, self.weight):
                return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
