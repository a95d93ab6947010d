"""Kernels that move a step's inputs in from, and its sampled tokens out to, pinned host memory, which the device
reads and writes directly (zero-copy: pinned memory is mapped into the device's address space under unified
addressing). A copy engine's memcpy between two kernels cost the stream 4-12 us of idling on each side on an H200
(profile_step.py --gaps: copy to kernel and kernel to copy); a kernel after a kernel outside a graph, 1-3 us.

stage_inputs also resolves the input ids of decodes whose token the step in flight sampled and the host does not
know yet (async scheduling): the host writes -(1 + i) for entry i of that step's sampled ids."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

STAGE_BLOCK = 1024  # int64 words a program
OUT_BLOCK = 1024  # int32 words a program


@triton.jit(do_not_specialize=["num_words", "num_ids"], do_not_specialize_on_alignment=["sampled_ptr"])
def _stage_kernel(src_ptr, dst_ptr, num_words, num_ids, sampled_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_words
    words = tl.load(src_ptr + offs, mask=mask)
    deferred = mask & (offs < num_ids) & (words < 0)
    sampled = tl.load(sampled_ptr + (-words - 1), mask=deferred, other=0)
    tl.store(dst_ptr + offs, tl.where(deferred, sampled.to(tl.int64), words), mask=mask)


@triton.jit(do_not_specialize=["num_words"])
def _out_kernel(src_ptr, dst_ptr, num_words, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_words
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def stage_inputs(host: torch.Tensor, device: torch.Tensor, num_ids: int, sampled: torch.Tensor | None) -> None:
    """device[:n] = host[:n] (int64 words; host pinned), except that each of the first num_ids words below zero,
    -(1 + i), becomes sampled[i] (sampled: int64 or int32 ids on the device)."""
    n = host.numel()
    if device.numel() < n or host.dtype != torch.int64 or device.dtype != torch.int64:
        raise ValueError(f"stage_inputs: needs int64 words and room for {n}, got {host.dtype} {device.dtype} "
                         f"[{device.numel()}]")
    _stage_kernel[(triton.cdiv(n, STAGE_BLOCK),)](host, device, n, num_ids, sampled if sampled is not None else device,
                                                  BLOCK=STAGE_BLOCK)


def to_host(tensor: torch.Tensor, host: torch.Tensor) -> None:
    """host (pinned, same shape and dtype) <- tensor (on the device), written by a kernel: no copy engine."""
    if host.shape != tensor.shape or host.dtype != tensor.dtype or tensor.element_size() % 4:
        raise ValueError(f"to_host: {tuple(tensor.shape)} {tensor.dtype} into {tuple(host.shape)} {host.dtype}")
    n = tensor.numel() * tensor.element_size() // 4
    if n:
        _out_kernel[(triton.cdiv(n, OUT_BLOCK),)](tensor.contiguous().view(-1).view(torch.int32),
                                                  host.view(-1).view(torch.int32), n, BLOCK=OUT_BLOCK)
