"""The fused Triton layer ops (RMSNorm + residual, rotary, SiLU-and-mul) against plain torch code that rounds where
the CPU path of the layers does (the layers themselves call these kernels on CUDA, so they are no oracle here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The fused and unfused code round at the same points, so 16-bit results differ by at most an ulp or so.
REL_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope_ref(positions, x, cos_cache, sin_cache):
    cos, sin = cos_cache[positions].unsqueeze(1), sin_cache[positions].unsqueeze(1)
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 1024, 4096, 5120])
def test_rms_norm(dtype, hidden):
    from pagedllm.layers.triton_ops import rms_norm
    gen = torch.Generator().manual_seed(hidden)
    weight = (torch.randn(hidden, generator=gen) * 0.5 + 1).to("cuda", dtype)
    x = torch.randn(37, hidden, generator=gen).to("cuda", dtype) * 3
    residual = torch.randn(37, hidden, generator=gen).to("cuda", dtype)
    ref = _rms_norm_ref(x, weight, 1e-6)
    ref_res = x + residual
    ref_out = _rms_norm_ref(ref_res, weight, 1e-6)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel(out, ref) < REL_TOL[dtype]
    fused_out, fused_res = rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(fused_res, ref_res)
    assert _rel(fused_out, ref_out) < REL_TOL[dtype]
    # a 3-d input and a strided one (every other row)
    assert _rel(rms_norm(x.view(1, 37, hidden), weight, 1e-6), ref.view(1, 37, hidden)) < REL_TOL[dtype]
    assert _rel(rms_norm(x[::2], weight, 1e-6), ref[::2]) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 2, 64), (4, 1, 16), (14, 2, 64)])
def test_rotary(dtype, heads, kv_heads, head_dim):
    from pagedllm.layers.triton_ops import rotary_embedding
    gen = torch.Generator().manual_seed(heads + head_dim)
    rope = RotaryEmbedding(head_dim, max_position=4096, base=10000.0, scaling=None).to("cuda")
    tokens = 123
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to("cuda", dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).cuda()
    if heads == 14:
        positions = positions.to(torch.int32)  # the runner's buffers may be int32 or int64
    ref_q = _rope_ref(positions, q, rope.cos_cache, rope.sin_cache)
    ref_k = _rope_ref(positions, k, rope.cos_cache, rope.sin_cache)
    out_q, out_k = rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    assert _rel(out_q, ref_q) < REL_TOL[dtype] and _rel(out_k, ref_k) < REL_TOL[dtype]
    assert out_q.dtype == dtype and out_q.shape == q.shape and out_k.shape == k.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 3000, 11008])
def test_silu_and_mul(dtype, inter):
    from pagedllm.layers.triton_ops import silu_and_mul
    gen = torch.Generator().manual_seed(inter)
    x = torch.randn(2, 21, 2 * inter, generator=gen).to("cuda", dtype) * 2
    ref = F.silu(x[..., :inter]) * x[..., inter:]
    out = silu_and_mul(x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel(out, ref) < REL_TOL[dtype]


def test_ops_bad_inputs():
    from pagedllm.layers.triton_ops import rms_norm, rotary_embedding, silu_and_mul
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(64, device="cuda"), 1e-6, residual=torch.randn(4, 32, device="cuda"))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(4, 7, device="cuda"))
    cache = torch.randn(16, 16, device="cuda")
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(torch.zeros(3, dtype=torch.long, device="cuda"), torch.randn(4, 2, 16, device="cuda"),
                         torch.randn(4, 1, 16, device="cuda"), cache, cache)
