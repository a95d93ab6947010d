"""Small helpers shared by the Triton attention kernels: input checks, dot precision, the device's SM count."""
from __future__ import annotations

import functools

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (the tests' oracle is fp32); 16-bit ones ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in elsewhere (Triton's CPU interpreter)."""
    return _cuda_sm_count(_index(device)) if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def supports_pdl(device: torch.device) -> bool:
    """Whether kernels on this device may use programmatic dependent launch (griddepcontrol: Hopper, sm_90, on)."""
    return device.type == "cuda" and _cuda_major(_index(device)) >= 9


def check_attention_inputs(q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Shape and dtype checks that cost nothing on the GPU (no tensor is read)."""
    if q.dim() != 3:
        raise ValueError(f"attention: q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"attention: kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"attention: q head_dim {head_dim} != kv_cache head_dim {kv_cache.shape[4]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"attention: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    if q.dtype not in SUPPORTED_DTYPES or kv_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: dtypes q={q.dtype}, kv_cache={kv_cache.dtype} are not supported "
                         "(float16, bfloat16, float32)")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("attention: the head_dim axis of q and kv_cache must be contiguous")
