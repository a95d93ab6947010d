"""SiLU-and-mul, the gated MLP's activation: silu(gate) * up over x = [gate | up]; one Triton kernel on the GPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from pagedllm.layers.triton_ops import silu_and_mul as fused
        return fused(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
