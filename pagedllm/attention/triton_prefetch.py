"""Programmatic dependent launch (PDL, Hopper) for the kernels of small decode steps, and the L2 prefetch that
fills the time it frees.

At a step of one or two tokens every kernel is short and waits on memory latency. A kernel launched with PDL
(launch_pdl=True) starts while the one before it drains: before tl.extra.cuda.gdc_wait() it may only read what
the kernel before it does not write (weights, the KV cache of earlier tokens, the step's metadata), and it asks
the L2 for those bytes (prefetch_l2: Hopper's bulk prefetch, fire and forget); after the wait it reads them back
from the L2. Each such kernel calls gdc_launch_dependents() only after its own wait, so a kernel's early part
overlaps only the kernel right before it, never one further back.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


PDL_IN_ENGINE = os.environ.get("PAGEDLLM_PDL", "1") == "1"  # EXPERIMENT: A/B switch


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """One bulk L2 prefetch per element of ptrs: nbytes[i] bytes (16-byte aligned, a multiple of 16, under 64 KB;
    0 = none) from ptrs[i]."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs.to(tl.pointer_type(tl.uint8)), nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_supported(t: torch.Tensor) -> bool:
    """Whether kernels over t may launch with PDL and prefetch into the L2: a CUDA device of sm_90 or newer (not
    Triton's CPU interpreter)."""
    return t.is_cuda and _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= 9
