"""The Triton attention kernels against the torch reference on fresh random paged batches, on a CUDA GPU.

Covers block sizes 16/32, GQA ratios 1..8 and MQA, head_dim 8..256, lengths 1..8192, ragged batches of decodes and
chunked prefills with cached prefixes, bf16/fp16/fp32, split-KV decode, CUDA-graph capture with graph padding,
skipped slots, and the errors. The reference runs on upcast inputs (fp32 for 16-bit, fp64 for fp32).
"""
from __future__ import annotations

import random

import pytest
import torch

from pagedllm.attention.torch_ref import paged_attention_ref, write_kv_ref
from pagedllm.attention.triton_testing import PagedBatch, make_paged_batch

pytestmark = pytest.mark.gpu

REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5}


def _backend():
    from pagedllm.attention.triton_backend import TritonAttentionBackend
    return TritonAttentionBackend()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def _reference(batch: PagedBatch, scale: float) -> torch.Tensor:
    upcast = torch.float64 if batch.q.dtype == torch.float32 else torch.float32
    return paged_attention_ref(batch.q.to(upcast), batch.kv_cache, batch.meta, scale)


def _live_rows(batch: PagedBatch) -> torch.Tensor:
    """Token rows whose sequence has context (graph-padding decodes with seq_len 0 have no defined answer)."""
    starts, lens = batch.meta.query_start_loc_cpu, batch.meta.seq_lens_cpu
    q_lens = torch.tensor([starts[i + 1] - starts[i] for i in range(len(lens))])
    return torch.repeat_interleave(torch.tensor([s > 0 for s in lens]), q_lens).to(batch.q.device)


def _random_lens(rng: random.Random, num_decodes: int, num_prefills: int, max_len: int) -> list[tuple[int, int]]:
    lens = [(1, rng.randint(1, max_len)) for _ in range(num_decodes)]
    for _ in range(num_prefills):
        q_len = rng.choice([1, rng.randint(2, 64), rng.randint(1, max_len)])
        prefix = rng.choice([0, rng.randint(0, max_len), rng.randint(1, 40)])
        lens.append((q_len, q_len + prefix))
    return lens


def _check_batch(batch: PagedBatch, scale: float, label: str) -> None:
    backend = _backend()
    expected_cache = batch.kv_cache.clone()
    write_kv_ref(batch.k_new, batch.v_new, expected_cache, batch.meta.slot_mapping)
    backend.write_kv(batch.k_new, batch.v_new, batch.kv_cache, batch.meta.slot_mapping)
    assert torch.equal(batch.kv_cache, expected_cache), f"{label}: write_kv differs from the reference"
    ref = _reference(batch, scale)
    out = backend.attend(batch.q, batch.kv_cache, batch.meta, scale)
    live = _live_rows(batch)
    assert out.isfinite().all(), f"{label}: non-finite output"
    err = _rel(out[live], ref[live])
    assert err < REL_TOL[batch.q.dtype], f"{label}: relative error {err:.2e}"


# (num_heads, num_kv_heads, head_dim, block_size, dtype, num_decodes, num_prefills, max_len)
MIXED_CASES = [
    (32, 8, 128, 16, torch.bfloat16, 6, 4, 3000),  # GQA 4, Llama-3-8B-like
    (8, 8, 64, 32, torch.float16, 5, 3, 1500),  # MHA
    (16, 2, 128, 32, torch.bfloat16, 3, 3, 2500),  # GQA 8
    (8, 1, 64, 16, torch.float16, 4, 4, 1200),  # MQA
    (16, 8, 128, 16, torch.float16, 0, 5, 2000),  # GQA 2, prefills only
    (4, 2, 16, 16, torch.bfloat16, 7, 5, 300),  # tiny head_dim
    (4, 1, 8, 32, torch.float32, 3, 3, 200),  # head_dim 8, fp32
    (12, 4, 80, 16, torch.bfloat16, 4, 3, 900),  # group 3, head_dim 80 (padded to 128)
    (8, 4, 256, 16, torch.bfloat16, 3, 2, 700),  # head_dim 256
    (8, 2, 128, 16, torch.float32, 4, 3, 600),  # fp32 at a real head_dim
    (32, 8, 64, 32, torch.bfloat16, 32, 0, 4000),  # decodes only
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}{str(c[4])[6:]}")
def test_mixed_batches_match_reference(case):
    heads, kv_heads, head_dim, block_size, dtype, nd, npf, max_len = case
    rng = random.Random(str(case))
    gen = torch.Generator().manual_seed(rng.randint(0, 2 ** 31))
    for trial in range(2):  # fresh random inputs each time
        lens = _random_lens(rng, nd, npf, max_len)
        batch = make_paged_batch(lens, nd, heads, kv_heads, head_dim, block_size, dtype, "cuda", gen)
        _check_batch(batch, head_dim ** -0.5, f"{case} trial {trial} lens {lens}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_decode_every_split_count(dtype):
    from pagedllm.attention.triton_decode import MAX_SPLITS, paged_decode
    gen = torch.Generator().manual_seed(7)
    lens = [(1, 8192), (1, 1), (1, 4097), (1, 64), (1, 65)]
    batch = make_paged_batch(lens, len(lens), 32, 8, 128, 16, dtype, "cuda", gen)
    ref = _reference(batch, 0.088)
    splits = 1
    while splits <= MAX_SPLITS:
        out = torch.full_like(batch.q, float("nan"))  # poisoned: every row must be written
        paged_decode(batch.q, batch.kv_cache, batch.meta.block_tables, batch.meta.seq_lens, 0.088, out,
                     num_splits=splits)
        assert out.isfinite().all(), f"splits={splits}: rows left unwritten or non-finite"
        err = _rel(out, ref)
        assert err < REL_TOL[dtype], f"splits={splits}: relative error {err:.2e}"
        splits *= 2


@pytest.mark.parametrize("block_n", [None, 64, 128])
def test_large_decode_batch(block_n):
    """160 ragged decodes with 8 kv heads (1,280 programs), with the default tiles and both tile widths."""
    from pagedllm.attention.triton_decode import paged_decode
    rng = random.Random(11)
    gen = torch.Generator().manual_seed(11)
    lens = [(1, rng.randint(1, 1500)) for _ in range(160)]
    batch = make_paged_batch(lens, len(lens), 16, 8, 128, 16, torch.bfloat16, "cuda", gen)
    ref = _reference(batch, 0.088)
    out = torch.full_like(batch.q, float("nan"))
    paged_decode(batch.q, batch.kv_cache, batch.meta.block_tables, batch.meta.seq_lens, 0.088, out, block_n=block_n)
    assert out.isfinite().all()
    assert _rel(out, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("lens,heads,kv_heads", [
    ([(8192, 8192)], 8, 2),  # one long prompt
    ([(1000, 8192), (5, 300), (3000, 3000)], 8, 8),  # chunked prefill over a 7192-token prefix, ragged
    ([(777, 1777)], 16, 1),  # MQA
])
@pytest.mark.parametrize("per_program", [None, 1])  # the kernel's choice of query heads a program, or one
def test_long_prefill(lens, heads, kv_heads, per_program):
    from pagedllm.attention.triton_prefill import paged_prefill
    gen = torch.Generator().manual_seed(len(lens) * 31 + heads)
    batch = make_paged_batch(lens, 0, heads, kv_heads, 128, 16, torch.bfloat16, "cuda", gen)
    ref = _reference(batch, 0.088)
    out = torch.full_like(batch.q, float("nan"))
    m = batch.meta
    paged_prefill(batch.q, batch.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables, 0.088, out,
                  heads=per_program)
    assert out.isfinite().all()
    assert _rel(out, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("tile", [(16, 16, 4, 1), (64, 32, 4, 2), (128, 64, 8, 3), (64, 128, 4, 2)])
def test_prefill_tile_shapes(tile):
    """Correctness must not depend on the tile shape (block_size 16 < BLOCK_N and > BLOCK_N alike)."""
    from pagedllm.attention.triton_prefill import paged_prefill
    rng = random.Random(sum(tile))
    gen = torch.Generator().manual_seed(sum(tile))
    for block_size in (16, 32):
        lens = [(1, 40)] + _random_lens(rng, 0, 6, 700)
        batch = make_paged_batch(lens, 1, 8, 2, 64, block_size, torch.float16, "cuda", gen)
        ref = _reference(batch, 0.125)
        out = torch.full_like(batch.q, float("nan"))
        m = batch.meta
        paged_prefill(batch.q, batch.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables, 0.125, out,
                      first_seq=1, tile=tile)
        assert out[1:].isfinite().all() and out[0].isnan().all(), "wrote rows outside its sequences"
        assert _rel(out[1:], ref[1:]) < REL_TOL[torch.float16]


def test_cuda_graph_decode_with_padding():
    """Capture once, then replay with new lengths (padding seq_len 0 included), block tables and queries."""
    backend = _backend()
    gen = torch.Generator().manual_seed(3)
    num_seqs, heads, kv_heads, head_dim, block_size = 16, 8, 2, 128, 16
    batch = make_paged_batch([(1, 2048)] * num_seqs, num_seqs, heads, kv_heads, head_dim, block_size,
                             torch.bfloat16, "cuda", gen)
    m = batch.meta
    m.query_start_loc_cpu = m.seq_lens_cpu = None  # as in graph mode
    backend.write_kv(batch.k_new, batch.v_new, batch.kv_cache, m.slot_mapping)
    backend.attend(batch.q, batch.kv_cache, m, 0.088)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.write_kv(batch.k_new, batch.v_new, batch.kv_cache, m.slot_mapping)
        out = backend.attend(batch.q, batch.kv_cache, m, 0.088)
    num_blocks = batch.kv_cache.shape[1]
    rows = torch.arange(num_seqs, device="cuda")
    for trial in range(3):
        new_lens = torch.randint(1, 2049, (num_seqs,), generator=gen)
        new_lens[trial::5] = 0  # graph padding
        new_lens = new_lens.cuda()
        pad = new_lens == 0
        m.seq_lens.copy_(new_lens.to(torch.int32))
        tables = torch.randperm(num_blocks, generator=gen)[:m.block_tables.numel()].view(m.block_tables.shape)
        m.block_tables.copy_(tables.to(torch.int32))
        last = (new_lens - 1).clamp_min(0)
        slots = m.block_tables[rows, last // block_size].long() * block_size + last % block_size
        m.slot_mapping.copy_(torch.where(pad, -1, slots))
        m.block_tables[pad] = 2 ** 30  # a padding row must never be read
        batch.q.copy_(torch.randn(batch.q.shape, generator=gen).to(batch.q))
        batch.k_new.copy_(torch.randn(batch.k_new.shape, generator=gen).to(batch.k_new))
        batch.v_new.copy_(torch.randn(batch.v_new.shape, generator=gen).to(batch.v_new))
        out.fill_(float("nan"))
        expected_cache = batch.kv_cache.clone()
        write_kv_ref(batch.k_new, batch.v_new, expected_cache, m.slot_mapping)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(batch.kv_cache, expected_cache), f"trial {trial}: graph write_kv differs"
        assert out.isfinite().all(), f"trial {trial}: non-finite rows (padding must give finite values)"
        live = ~pad
        m.block_tables[pad] = 0  # the reference gathers every row
        m.seq_lens_cpu = new_lens.tolist()
        m.query_start_loc_cpu = list(range(num_seqs + 1))
        ref = _reference(batch, 0.088)
        m.query_start_loc_cpu = m.seq_lens_cpu = None
        err = _rel(out[live], ref[live])
        assert err < REL_TOL[torch.bfloat16], f"trial {trial}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_write_kv_strided_and_skipped(dtype):
    """K/V as slices of a fused qkv tensor; slot -1 entries leave the cache untouched; other dtypes cast."""
    backend = _backend()
    gen = torch.Generator().manual_seed(11)
    tokens, kv_heads, head_dim, num_blocks, block_size = 300, 4, 64, 40, 16
    qkv = torch.randn(tokens, (8 + 2 * kv_heads) * head_dim, generator=gen).to(dtype).cuda()
    k = qkv[:, 8 * head_dim:(8 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (8 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1
    slots = slots.cuda()
    for cache_dtype in {dtype, torch.bfloat16}:
        cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(cache_dtype).cuda()
        expected = cache.clone()
        write_kv_ref(k, v, expected, slots)
        backend.write_kv(k, v, cache, slots)
        assert torch.equal(cache, expected)


def test_bad_inputs_raise_value_error():
    backend = _backend()
    gen = torch.Generator().manual_seed(5)
    batch = make_paged_batch([(1, 10), (4, 4)], 1, 8, 2, 64, 16, torch.float16, "cuda", gen)
    with pytest.raises(ValueError, match="head_dim"):
        backend.attend(batch.q[..., :32], batch.kv_cache, batch.meta, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        backend.attend(batch.q[:, :7], batch.kv_cache, batch.meta, 0.1)
    with pytest.raises(ValueError, match="dtypes"):
        backend.attend(batch.q.to(torch.int32), batch.kv_cache, batch.meta, 0.1)
    with pytest.raises(ValueError, match="kv_cache"):
        backend.write_kv(batch.k_new[..., :32], batch.v_new[..., :32], batch.kv_cache, batch.meta.slot_mapping)
    with pytest.raises(ValueError, match="slot_mapping"):
        backend.write_kv(batch.k_new, batch.v_new, batch.kv_cache, batch.meta.slot_mapping[:2])


def test_prefill_compiles_once_for_any_batch_composition():
    """The number of decodes before the prefills (first_seq) and of sequences changes every step: one compiled
    variant must serve them all (a new one mid-run costs a compilation, about a second, inside a step)."""
    from pagedllm.attention.triton_prefill import _prefill_kernel
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)

    def compiled() -> int:
        return sum(len(caches[0]) for caches in _prefill_kernel.device_caches.values())

    before, counts = compiled(), []
    for num_decodes, num_prefills in [(0, 1), (1, 1), (0, 16), (16, 16), (3, 5), (32, 1), (1, 15), (17, 2)]:
        lens = [(1, rng.randint(1, 300)) for _ in range(num_decodes)]
        lens += [(q, q + rng.randint(0, 40)) for q in (rng.randint(2, 200) for _ in range(num_prefills))]
        batch = make_paged_batch(lens, num_decodes, 16, 8, 128, 16, torch.bfloat16, "cuda", gen)
        _check_batch(batch, 128 ** -0.5, f"decodes {num_decodes} prefills {num_prefills}")
        counts.append(compiled() - before)
    assert max(counts) <= 1, f"new compiled variants of the prefill kernel after each call: {counts}"


# (heads, kv_heads, head_dim, block_size, q/k norms): Qwen3-8B's, Qwen3-0.6B's, Llama-like MHA without norms, MQA
# with a head_dim that pads, a GQA group of 8 with head_dim 256
QKV_DECODE_SHAPES = [(32, 8, 128, 16, True), (16, 8, 128, 16, True), (8, 8, 64, 32, False), (4, 1, 80, 16, True),
                     (16, 2, 256, 16, False)]


@pytest.mark.parametrize("shape", QKV_DECODE_SHAPES, ids=lambda s: "h{}kv{}d{}b{}{}".format(*s[:4], "n" * s[4]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_seqs", [1, 3, 64])
def test_decode_from_qkv_matches_the_layers(shape, dtype, num_seqs):
    """paged_decode_qkv (q/k norms, rotary, KV write and attention in one kernel) against the layers' torch code:
    the split counts the batch picks, contexts of 2 to 8k, graph padding; the cache written as the reference
    writes it."""
    from pagedllm.attention.triton_decode import paged_decode_qkv
    from tests.qkv_step_case import make_step, reference
    heads, kv_heads, head_dim, block_size, qk_norm = shape
    rng = random.Random(num_seqs * head_dim)
    lens = [rng.choice([2, rng.randint(3, 600), rng.randint(600, 8192)]) for _ in range(num_seqs)]
    if num_seqs > 1:
        lens[-1] = 0  # graph padding
    gen = torch.Generator().manual_seed(num_seqs)
    step = make_step([(1, n) for n in lens], num_seqs, heads, kv_heads, head_dim, block_size, qk_norm, dtype,
                     "cuda", gen)
    ref, ref_cache = reference(step, head_dim ** -0.5)
    b = step.batch
    out = torch.full((num_seqs, heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    paged_decode_qkv(step.qkv, step.positions, heads, step.rotary.cos_cache, step.rotary.sin_cache, b.kv_cache,
                     b.meta.slot_mapping, b.meta.block_tables, b.meta.seq_lens, head_dim ** -0.5, out, *step.norms)
    live = torch.tensor([n > 0 for n in lens], device="cuda")
    assert out.isfinite().all()
    assert _rel(out[live], ref[live]) < REL_TOL[dtype]
    slots = b.meta.slot_mapping[live]
    k_got, k_ref = b.kv_cache[0].flatten(0, 1)[slots], ref_cache[0].flatten(0, 1)[slots]
    assert _rel(k_got, k_ref) < REL_TOL[dtype]  # the norm's sum runs in another order: not always bit-equal
    b.kv_cache[0].flatten(0, 1)[slots] = k_ref
    assert torch.equal(b.kv_cache, ref_cache)  # v as is, and nothing but the new slots written


@pytest.mark.parametrize("num_decodes", [0, 1, 2, 3])
def test_attend_qkv_with_prefills_beside(num_decodes):
    """The backend from qkv over decodes with chunked prefills beside them: up to FUSED_DECODE_MAX_SEQS (2) decodes
    take the fused decode kernel, more take qkv_prepare; both against the layers' torch code."""
    from tests.qkv_step_case import make_step, reference
    rng = random.Random(num_decodes)
    lens = [(1, rng.randint(2, 3000)) for _ in range(num_decodes)] + [(300, 300), (17, 900), (1, 40)]
    gen = torch.Generator().manual_seed(num_decodes)
    step = make_step(lens, num_decodes, 32, 8, 128, 16, True, torch.bfloat16, "cuda", gen)
    ref, ref_cache = reference(step, 128 ** -0.5)
    b = step.batch
    out = _backend().attend_qkv(step.qkv, step.positions, b.kv_cache, b.meta, 128 ** -0.5, 32, step.rotary.cos_cache,
                                step.rotary.sin_cache, *step.norms)
    assert out.isfinite().all()
    assert _rel(out, ref) < REL_TOL[torch.bfloat16]
    slots = b.meta.slot_mapping
    assert _rel(b.kv_cache[0].flatten(0, 1)[slots], ref_cache[0].flatten(0, 1)[slots]) < REL_TOL[torch.bfloat16]
    assert torch.equal(b.kv_cache[1], ref_cache[1])
