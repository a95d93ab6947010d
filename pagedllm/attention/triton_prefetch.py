"""Warming the L2 cache with a tensor that a later kernel will read: Hopper's bulk prefetch
(cp.async.bulk.prefetch.L2), fire and forget: no registers, no shared memory, nothing to wait for.

At batch 1 the attention block of a decoder layer waits on memory latency for ~10 us while HBM idles; a kernel
that runs then can ask the L2 to fetch the next weight (o_proj's), which the next kernel then reads from the L2.
prefetch_l2 is the device-side helper that a kernel calls (program `part` of `parts` takes its share, one bulk
request per thread); can_prefetch_l2 says whether a tensor and its device allow it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PREFETCH_THREADS = tl.constexpr(128)  # requests a program issues: one per thread at 4 warps
MAX_REQUEST_BYTES = 1 << 16  # kept well under the instruction's size field


@triton.jit
def prefetch_l2(ptr, nbytes, part, parts, THREADS: tl.constexpr):
    """Program `part` of `parts` asks the L2 for its share of the nbytes at ptr (16-byte aligned, nbytes a multiple
    of 16), in THREADS requests of at most MAX_REQUEST_BYTES (the caller sizes `parts` so)."""
    base = ptr.to(tl.pointer_type(tl.uint8))
    share = tl.cdiv(tl.cdiv(nbytes, parts * THREADS), 16) * 16
    offs = (part * THREADS + tl.arange(0, THREADS)).to(tl.int64) * share
    size = tl.minimum(tl.maximum(nbytes - offs, 0), share).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def can_prefetch_l2(t: torch.Tensor, parts: int) -> bool:
    """Whether `parts` programs may prefetch t: a contiguous tensor on an sm_90+ GPU (not Triton's interpreter),
    16-byte aligned and sized, in requests of at most MAX_REQUEST_BYTES."""
    nbytes = t.numel() * t.element_size()
    return (t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0 and nbytes % 16 == 0
            and nbytes <= parts * PREFETCH_THREADS.value * MAX_REQUEST_BYTES
            and _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def _prefetch_kernel(ptr, nbytes, THREADS: tl.constexpr):
    prefetch_l2(ptr, nbytes, tl.program_id(0), tl.num_programs(0), THREADS)


def prefetch_tensor(t: torch.Tensor, parts: int = 16) -> None:
    """Launch `parts` programs that ask the L2 for t (its own kernel, for when no kernel before the reader can)."""
    if not can_prefetch_l2(t, parts):
        raise ValueError(f"prefetch_tensor: needs a contiguous, 16-byte aligned tensor on an sm_90+ GPU of at most "
                         f"{parts * PREFETCH_THREADS.value * MAX_REQUEST_BYTES} bytes, got {tuple(t.shape)} on {t.device}")
    _prefetch_kernel[(parts,)](t, t.numel() * t.element_size(), THREADS=PREFETCH_THREADS, num_warps=4)
