"""The decoder's linear layers: nn.Linear, except that a one-row call on a CUDA device in 16-bit floats (a batch-1
decode step) takes the Triton matrix-vector product of triton_gemv.py, which streams the weight closer to the
memory's bandwidth than cuBLAS does at that shape."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


# Rows up to which a call takes the GEMV: the row counts where it measured faster than cuBLAS on an H200
# (benchmarks/bench_pdl.py --rows, docs/benchmarks.md).
GEMV_MAX_ROWS = 1


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16):
            from pagedllm.layers.triton_gemv import gemv, supports
            if supports(x, self.weight):
                return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
