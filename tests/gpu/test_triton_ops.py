"""The fused Triton layer ops (RMSNorm + residual, q/k norm + rotary + KV write, SiLU-and-mul) against plain torch code that rounds where
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
@pytest.mark.parametrize("heads,kv_heads,head_dim,qk_norm", [(32, 8, 128, True), (16, 8, 128, True),
                                                            (32, 8, 128, False), (16, 2, 64, False),
                                                            (4, 1, 16, True), (14, 2, 64, False), (8, 8, 256, True)])
def test_qkv_prepare(dtype, heads, kv_heads, head_dim, qk_norm):
    """The fused q/k norm + rotary + KV write against the unfused torch code, on strided qkv rows, with padding
    slots (-1) that must write nothing."""
    from pagedllm.attention.torch_ref import write_kv_ref
    from pagedllm.attention.triton_qkv import qkv_prepare
    gen = torch.Generator().manual_seed(heads + head_dim + qk_norm)
    rope = RotaryEmbedding(head_dim, max_position=4096, base=1e6, scaling=None).to("cuda")
    tokens, block_size, num_blocks = 123, 16, 20
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width + 8, generator=gen).to("cuda", dtype)[:, :width] * 2  # rows with a stride
    positions = torch.randint(0, 4096, (tokens,), generator=gen).cuda()
    if heads == 14:
        positions = positions.to(torch.int32)  # the runner's buffers may be int32 or int64
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].cuda()
    slots[::7] = -1
    q_w = (torch.randn(head_dim, generator=gen) * 0.5 + 1).to("cuda", dtype) if qk_norm else None
    k_w = (torch.randn(head_dim, generator=gen) * 0.5 + 1).to("cuda", dtype) if qk_norm else None
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to("cuda", dtype)
    expected = cache.clone()

    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)
    if qk_norm:
        q, k = _rms_norm_ref(q, q_w, 1e-6), _rms_norm_ref(k, k_w, 1e-6)
    ref_q = _rope_ref(positions, q, rope.cos_cache, rope.sin_cache)
    live = slots >= 0
    write_kv_ref(_rope_ref(positions, k, rope.cos_cache, rope.sin_cache)[live],
                 v.reshape(tokens, kv_heads, head_dim)[live], expected, slots[live])

    norms = (q_w, k_w, 1e-6) if qk_norm else ()
    out_q = qkv_prepare(qkv, positions, heads, kv_heads, rope.cos_cache, rope.sin_cache, cache, slots, *norms)
    assert out_q.dtype == dtype and out_q.shape == (tokens, heads, head_dim) and out_q.is_contiguous()
    assert _rel(out_q, ref_q) < REL_TOL[dtype]
    flat, flat_expected = cache.view(2, -1, kv_heads, head_dim), expected.view(2, -1, kv_heads, head_dim)
    written = torch.zeros(flat.shape[1], dtype=torch.bool, device="cuda")
    written[slots[live]] = True
    assert torch.equal(flat[:, ~written], flat_expected[:, ~written]), "a slot outside slot_mapping changed"
    assert torch.equal(flat[1, written], flat_expected[1, written]), "V is a copy"
    assert _rel(flat[0, written], flat_expected[0, written]) < REL_TOL[dtype]


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
    from pagedllm.layers.triton_ops import rms_norm, silu_and_mul
    from pagedllm.attention.triton_qkv import qkv_prepare
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(64, device="cuda"), 1e-6, residual=torch.randn(4, 32, device="cuda"))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(4, 7, device="cuda"))
    rope = torch.randn(16, 16, device="cuda")
    qkv = torch.randn(4, 4 * 16, device="cuda")  # 2 heads + 2 x 1 kv head of 16
    kv_cache = torch.zeros(2, 3, 16, 1, 16, device="cuda")
    slots, positions = torch.zeros(4, dtype=torch.long, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="positions"):
        qkv_prepare(qkv, positions[:3], 2, 1, rope, rope, kv_cache, slots)
    with pytest.raises(ValueError, match="width"):
        qkv_prepare(qkv, positions, 3, 1, rope, rope, kv_cache, slots)
    with pytest.raises(ValueError, match="kv_cache"):
        qkv_prepare(qkv, positions, 2, 1, rope, rope, kv_cache[:, :, :, :, :8], slots)
    with pytest.raises(ValueError, match="q_norm"):
        qkv_prepare(qkv, positions, 2, 1, rope, rope, kv_cache, slots, torch.ones(16, device="cuda"), None)


# (K, N, bias): Qwen3-8B's four layers, Qwen3-0.6B's o_proj, ragged tails, a Qwen2-like qkv bias
GEMV_SHAPES = [(4096, 6144, False), (4096, 4096, False), (4096, 24576, False), (12288, 4096, False),
               (2048, 1024, False), (1000, 333, True), (896, 1152, True)]


@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}{'b' if s[2] else ''}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_gemv_matches_fp32_matmul(shape, dtype, rows):
    from pagedllm.layers.triton_gemv import gemv
    k, n, with_bias = shape
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(dtype)
    bias = torch.randn(n, device="cuda", generator=gen).to(dtype) if with_bias else None
    out = gemv(x, w, bias)
    ref = x.float() @ w.float().t() + (bias.float() if with_bias else 0)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert _rel(out, ref) < REL_TOL[dtype]


def test_linear_takes_gemv_up_to_its_row_limit():
    """The model's Linear: up to GEMV_MAX_ROWS bf16 rows go through the Triton GEMV (bit-identical to calling it),
    more rows and fp32 through F.linear."""
    from pagedllm.layers.linear import GEMV_MAX_ROWS, Linear
    from pagedllm.layers.triton_gemv import gemv
    layer = Linear(512, 384, bias=True).to("cuda", torch.bfloat16)
    x = torch.randn(GEMV_MAX_ROWS + 1, 512, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(layer(x[:GEMV_MAX_ROWS]), gemv(x[:GEMV_MAX_ROWS], layer.weight, layer.bias))
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer32 = Linear(512, 384).to("cuda")
    assert torch.equal(layer32(x[:1].float()), F.linear(x[:1].float(), layer32.weight, layer32.bias))


# (K, N): Qwen3-8B's qkv and gate_up ([gate; up], 2 x 12288), Qwen3-0.6B's, a ragged K (the loads one step ahead)
FUSED_GEMV_SHAPES = [(4096, 6144), (4096, 24576), (1024, 4096), (1024, 6144), (1000, 334)]


@pytest.mark.parametrize("shape", FUSED_GEMV_SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_gemv_with_norm_and_silu_matches_fp32(shape, dtype, rows):
    """RMSNorm(x + residual) @ w.T, and its SiLU-and-mul, against the same in fp32; the next residual is exactly
    the rounded sum."""
    from pagedllm.layers.triton_gemv import gemv
    k, n = shape
    gen = torch.Generator(device="cuda").manual_seed(k * n)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    res = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    g = (torch.rand(k, device="cuda", generator=gen) + 0.5).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(dtype)
    s = (x + res).float()
    h = g.float() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    out, new_res = gemv(x, w, norm=(g, 1e-6), residual=res)
    assert torch.equal(new_res, x + res)
    assert out.shape == (rows, n) and _rel(out, h @ w.float().t()) < REL_TOL[dtype]
    gate_up = h @ w.float().t()
    act, _ = gemv(x, w, norm=(g, 1e-6), residual=res, silu_and_mul=True)
    expect = F.silu(gate_up[:, :n // 2]) * gate_up[:, n // 2:]
    assert act.shape == (rows, n // 2) and _rel(act, expect) < 2 * REL_TOL[dtype]


def test_linear_normed_fuses_up_to_its_row_limit():
    """Linear.normed: up to FUSED_MAX_ROWS rows the fused GEMV (bit-identical to calling it), above it RMSNorm,
    the layer and SiLU-and-mul apart (bit-identical to calling them); the two agree to bf16 rounding."""
    from pagedllm.layers.linear import FUSED_MAX_ROWS, Linear
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.layers.triton_gemv import gemv
    from pagedllm.layers.triton_ops import silu_and_mul
    layer = Linear(512, 768, bias=False).to("cuda", torch.bfloat16)
    norm = RMSNorm(512, 1e-6).to("cuda", torch.bfloat16)
    x = torch.randn(FUSED_MAX_ROWS + 1, 512, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    few, few_res = x[:FUSED_MAX_ROWS], res[:FUSED_MAX_ROWS]
    for act in (False, True):
        fused, fused_res = layer.normed(few, few_res, norm, act_silu_and_mul=act)
        expect, _ = gemv(few, layer.weight, norm=(norm.weight, norm.eps), residual=few_res, silu_and_mul=act)
        assert torch.equal(fused, expect) and torch.equal(fused_res, few + few_res)
        apart, apart_res = layer.normed(x, res, norm, act_silu_and_mul=act)
        h, _ = norm(x, res)
        expect = layer(h)
        assert torch.equal(apart, silu_and_mul(expect) if act else expect) and torch.equal(apart_res, x + res)
        assert _rel(fused, apart[:FUSED_MAX_ROWS]) < 2 * REL_TOL[torch.bfloat16]
    first, first_res = layer.normed(x[:1], None, norm)  # the first layer: no residual yet
    assert torch.equal(first_res, x[:1])
    assert _rel(first, F.linear(norm(x[:1]), layer.weight)) < REL_TOL[torch.bfloat16]
