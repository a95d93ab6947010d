"""The decoder's linear layers: nn.Linear, except that a call of up to GEMV_MAX_ROWS rows on a CUDA device in 16-bit
floats (a decode step of a few sequences) takes the Triton matrix-vector product of triton_gemv.py, which streams
the weight closer to the memory's bandwidth than cuBLAS does at those shapes. Linear.normed() runs the RMSNorm
before the layer (and SiLU-and-mul after it) in that same kernel up to FUSED_MAX_ROWS rows; at more rows, as
separate kernels."""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers import blas_choice
from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.norm import RMSNorm


# Rows up to which a call takes the GEMV: where it measured faster than cuBLAS on an H200 for both Qwen3-8B's and
# Qwen3-0.6B's layers (benchmarks/bench_pdl.py --rows: 3-5% and 10-14% a layer at 1-4 rows; at 8 and 16 rows still
# 3-7% for 8B's, but 10-19% slower for 0.6B's; docs/benchmarks.md).
GEMV_MAX_ROWS = 4
# Rows up to which normed() fuses the norm (and SiLU-and-mul) into the GEMV: each program reads the rows' inputs
# itself, which costs more per row than the separate norm kernel saves from 4 rows (bench_pdl.py --layer on an
# H200, us a layer apart/fused: 8B 105.4/102.9 at 1 row, 108.3/107.5 at 2, 108.0/109.1 at 4; 0.6B likewise).
FUSED_MAX_ROWS = 2


class Linear(nn.Linear):
    def _takes_gemv(self, x: torch.Tensor, max_rows: int = GEMV_MAX_ROWS) -> bool:
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= max_rows
                and x.dtype in (torch.bfloat16, torch.float16)):
            return False
        from pagedllm.layers.triton_gemv import supports
        return supports(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_gemv(x):
            from pagedllm.layers.triton_gemv import gemv
            return gemv(x, self.weight, self.bias)
        return blas_choice.linear(x, self.weight, self.bias)

    def normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
               act_silu_and_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer applied to norm(x + residual) (norm(x) when residual is None), then SiLU-and-mul over its
        [gate | up] output if asked: returns (out, the next residual: x + residual, or x without one)."""
        fusable = residual is None or residual.stride(-1) == 1
        if self._takes_gemv(x, FUSED_MAX_ROWS) and fusable and not (act_silu_and_mul and self.bias is not None):
            from pagedllm.layers.triton_gemv import gemv
            fused = gemv(x, self.weight, self.bias, norm=(norm.weight, norm.eps), residual=residual,
                         silu_and_mul=act_silu_and_mul)
            return fused if residual is not None else (fused, x)  # with a residual, gemv returns the pair
        if residual is None:
            h, residual = norm(x), x
        else:
            h, residual = norm(x, residual)
        out = self(h)
        return (silu_and_mul(out) if act_silu_and_mul else out), residual
