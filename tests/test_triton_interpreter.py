"""The Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1), at tiny fp32 shapes, and
are compared with the torch references.

The interpreter must be switched on before triton is imported, so the checks run in a child process: this file,
executed as a script, prints one JSON line per check; the test reads them. Skips cleanly when triton or its
interpreter is unavailable.
"""
from __future__ import annotations

import sys

import pytest

from tests.interpreter_harness import child_main, run_checks

REL_TOL = 1e-5  # fp32 everywhere (the interpreter's dots are numpy fp32)


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _attention_checks(emit) -> None:
    import torch

    from pagedllm.attention.torch_ref import paged_attention_ref, write_kv_ref
    from pagedllm.attention.triton_backend import TritonAttentionBackend
    from pagedllm.attention.triton_decode import paged_decode
    from pagedllm.attention.triton_prefill import paged_prefill
    from pagedllm.attention.triton_testing import make_paged_batch

    gen = torch.Generator().manual_seed(1234)
    backend = TritonAttentionBackend()
    cases = [
        # (lens, num_decodes, heads, kv_heads, head_dim, block_size)
        ([(1, 5), (1, 17), (3, 3), (4, 20)], 2, 4, 2, 16, 16),  # decodes + prefill + chunked prefill, GQA 2
        ([(1, 40), (7, 7), (2, 33)], 1, 2, 2, 8, 16),  # MHA, head_dim 8 (padded to 16)
        ([(1, 0), (1, 70), (1, 1)], 3, 4, 1, 32, 32),  # MQA decodes, graph padding (seq_len 0)
        ([(70, 75), (1, 9)], 0, 2, 1, 12, 16),  # head_dim 12 (not a power of two), tail of a prefill
    ]
    for idx, (lens, nd, heads, kv_heads, head_dim, block_size) in enumerate(cases):
        batch = make_paged_batch(lens, nd, heads, kv_heads, head_dim, block_size, torch.float32, "cpu", gen)
        expect_cache = batch.kv_cache.clone()
        write_kv_ref(batch.k_new, batch.v_new, expect_cache, batch.meta.slot_mapping)
        backend.write_kv(batch.k_new, batch.v_new, batch.kv_cache, batch.meta.slot_mapping)
        emit(f"write_kv[{idx}]", exact=bool(torch.equal(batch.kv_cache, expect_cache)))

        scale = head_dim ** -0.5
        live = torch.repeat_interleave(torch.tensor([s > 0 for _, s in lens]), torch.tensor([q for q, _ in lens]))
        ref = paged_attention_ref(batch.q.double(), batch.kv_cache, batch.meta, scale)
        out = backend.attend(batch.q, batch.kv_cache, batch.meta, scale)
        emit(f"attend[{idx}]", rel=_rel(out[live], ref[live]), finite=bool(out.isfinite().all()))
        if nd > 0:
            # Forced split-KV path, written into a poisoned buffer.
            dec = torch.full_like(batch.q[:nd], float("nan"))
            paged_decode(batch.q[:nd], batch.kv_cache, batch.meta.block_tables, batch.meta.seq_lens, scale, dec,
                         num_splits=4)
            emit(f"decode_split4[{idx}]", rel=_rel(dec[live[:nd]], ref[:nd][live[:nd]]),
                 finite=bool(dec.isfinite().all()))
        if nd < len(lens):
            pre = torch.full_like(batch.q, float("nan"))
            paged_prefill(batch.q, batch.kv_cache, batch.meta.query_start_loc, batch.meta.seq_lens,
                          batch.meta.block_tables, scale, pre, first_seq=nd, tile=(16, 16, 4, 1))
            rows = slice(batch.meta.query_start_loc_cpu[nd], None)
            emit(f"prefill_tile16[{idx}]", rel=_rel(pre[rows], ref[rows]), finite=bool(pre[rows].isfinite().all()))

    # Several query heads of one kv head in a program (GQA 4): one, two or four heads, chunked prefill beside a
    # decode row that must stay untouched.
    lens = [(1, 9), (37, 37), (20, 53), (5, 70)]
    batch = make_paged_batch(lens, 1, 8, 2, 16, 16, torch.float32, "cpu", gen)
    ref = paged_attention_ref(batch.q.double(), batch.kv_cache, batch.meta, 0.25)
    for heads in (1, 2, 4):
        pre = torch.full_like(batch.q, float("nan"))
        paged_prefill(batch.q, batch.kv_cache, batch.meta.query_start_loc, batch.meta.seq_lens,
                      batch.meta.block_tables, 0.25, pre, first_seq=1, tile=(64, 16, 4, 1), heads=heads)
        emit(f"prefill_heads{heads}", rel=_rel(pre[1:], ref[1:]), finite=bool(pre[1:].isfinite().all()),
             exact=bool(pre[0].isnan().all()))


def _qkv_step_checks(emit) -> None:
    """Attention straight from qkv against the layers' torch code: the decode kernel that norms, rotates and writes
    K/V itself (splits, GQA, a head_dim that pads, graph padding, a context of two tokens, key tiles wider than a
    page, with chunks of whole tiles and, from SMALL_TILE_SPLITS splits, of whole pages; 32-key tiles at 32 splits),
    and the backend's attend_qkv over decodes with prefills beside them, both routes."""
    import torch

    from pagedllm.attention import triton_backend
    from pagedllm.attention.triton_decode import paged_decode_qkv
    from tests.qkv_step_case import make_step, reference

    gen = torch.Generator().manual_seed(7)
    cases = [([5, 40, 17], 4, 2, 16, 16, True, None, None), ([33, 2, 0], 2, 1, 12, 16, False, 4, None),
             ([70, 9], 4, 4, 8, 32, True, 2, None), ([300, 70, 2], 4, 2, 16, 16, True, 8, 64),
             ([129, 40], 2, 1, 16, 16, False, 32, 64), ([300, 5], 4, 2, 16, 16, True, 16, 64),
             ([300, 33], 4, 2, 16, 16, True, 2, 64), ([300, 70, 9], 4, 2, 16, 16, True, 32, 32),
             ([129, 40], 2, 1, 16, 32, False, 32, 32)]
    for idx, (lens, heads, kv_heads, head_dim, block_size, qk_norm, splits, block_n) in enumerate(cases):
        step = make_step([(1, n) for n in lens], len(lens), heads, kv_heads, head_dim, block_size, qk_norm,
                         torch.float32, "cpu", gen)
        scale = head_dim ** -0.5
        ref, ref_cache = reference(step, scale)
        out = torch.full((len(lens), heads, head_dim), float("nan"))
        b = step.batch
        paged_decode_qkv(step.qkv, step.positions, heads, step.rotary.cos_cache, step.rotary.sin_cache, b.kv_cache,
                         b.meta.slot_mapping, b.meta.block_tables, b.meta.seq_lens, scale, out, *step.norms,
                         num_splits=splits, block_n=block_n)
        live = torch.tensor([n > 0 for n in lens])
        emit(f"decode_qkv[{idx}]", rel=_rel(out[live], ref[live]), finite=bool(out.isfinite().all()))
        _emit_cache(emit, f"decode_qkv_cache[{idx}]", b.kv_cache, ref_cache, b.meta.slot_mapping)

    backend = triton_backend.TritonAttentionBackend()
    default_max = triton_backend.FUSED_DECODE_MAX_SEQS
    steps = [([(1, 30), (1, 3), (4, 20), (1, 9)], 2), ([(1, 12), (1, 50), (1, 7)], 3), ([(6, 6), (1, 40)], 0)]
    for idx, (lens, nd) in enumerate(steps):
        for fused_max in (4, 0):  # the fused decode route, then qkv_prepare's
            step = make_step(lens, nd, 4, 2, 16, 16, True, torch.float32, "cpu", gen)
            ref, ref_cache = reference(step, 0.25)
            triton_backend.FUSED_DECODE_MAX_SEQS = fused_max
            try:
                out = backend.attend_qkv(step.qkv, step.positions, step.batch.kv_cache, step.batch.meta, 0.25, 4,
                                         step.rotary.cos_cache, step.rotary.sin_cache, *step.norms)
            finally:
                triton_backend.FUSED_DECODE_MAX_SEQS = default_max
            emit(f"attend_qkv[{idx}]_max{fused_max}", rel=_rel(out, ref), finite=bool(out.isfinite().all()))
            _emit_cache(emit, f"attend_qkv_cache[{idx}]_max{fused_max}", step.batch.kv_cache, ref_cache,
                        step.batch.meta.slot_mapping)


def _emit_cache(emit, label, cache, ref_cache, slot_mapping) -> None:
    """The new keys close to the reference's (their norm sums in another order), and nothing else written."""
    slots = slot_mapping[slot_mapping >= 0]
    k_got, k_ref = cache[0].flatten(0, 1)[slots], ref_cache[0].flatten(0, 1)[slots]
    cache[0].flatten(0, 1)[slots] = k_ref
    emit(label, rel=_rel(k_got, k_ref), exact=bool(cache.equal(ref_cache)))


def test_decode_qkv_rejects_bad_inputs():
    pytest.importorskip("triton")
    import torch

    from pagedllm.attention.triton_decode import paged_decode_qkv
    cache = torch.zeros(2, 4, 16, 2, 8)  # 2 kv heads of 8
    qkv, pos, rope = torch.zeros(3, 64), torch.zeros(3, dtype=torch.long), torch.zeros(16, 8)
    tables, lens, out = torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, dtype=torch.int32), torch.zeros(3, 4, 8)
    for args, what in (((qkv[:, :60], pos, 4, rope, rope, cache, pos), "even head_dim"),
                       ((qkv, pos[:2], 4, rope, rope, cache, pos), "must both be"),
                       ((qkv, pos, 4, rope[:, :4], rope[:, :4], cache, pos), "do not match head_dim")):
        with pytest.raises(ValueError, match=what):
            paged_decode_qkv(*args, tables, lens, 1.0, out)
    with pytest.raises(ValueError, match="both be"):
        paged_decode_qkv(qkv, pos, 4, rope, rope, cache, pos, tables, lens, 1.0, out, torch.ones(8), None)
    with pytest.raises(ValueError, match="out"):
        paged_decode_qkv(qkv, pos, 4, rope, rope, cache, pos, tables, lens, 1.0, out[:2])
    from pagedllm.attention.triton_qkv import qkv_prepare
    with pytest.raises(ValueError, match="contiguous heads"):  # where q goes must be [tokens, heads, head_dim]
        qkv_prepare(qkv, pos, 4, 2, rope, rope, cache, pos, out=out.transpose(1, 2).contiguous())


def _ops_checks(emit) -> None:
    import torch
    import torch.nn.functional as F

    from pagedllm.layers.triton_ops import rms_norm, silu_and_mul

    gen = torch.Generator().manual_seed(99)
    x = torch.randn(5, 48, generator=gen)
    res = torch.randn(5, 48, generator=gen)
    w = torch.randn(48, generator=gen)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    emit("rms_norm", rel=_rel(rms_norm(x, w, 1e-6), ref))
    s = x + res
    out, new_res = rms_norm(x, w, 1e-6, residual=res)
    emit("rms_norm_residual", rel=_rel(out, w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))))
    emit("rms_norm_new_residual", exact=bool(torch.equal(new_res, s)))

    _qkv_prepare_checks(emit, gen)

    gu = torch.randn(3, 2, 2 * 40, generator=gen)
    emit("silu_and_mul", rel=_rel(silu_and_mul(gu), F.silu(gu[..., :40]) * gu[..., 40:]))
    _gemv_checks(emit, gen)
    _host_io_checks(emit)


def _host_io_checks(emit) -> None:
    """The step's staging kernel (a plain copy of int64 words, except that the first num_ids words below zero,
    -(1 + i), take the in-flight step's sampled id i) over several programs, and the kernel that writes outputs
    out to the host."""
    import torch

    from pagedllm.worker.host_io import STAGE_BLOCK, stage_inputs, to_host

    n = STAGE_BLOCK + 300
    host = torch.arange(n, dtype=torch.int64) + 1000
    host[[0, 3, STAGE_BLOCK + 1]] = torch.tensor([-2, -1, -3])
    host[n - 1] = -1  # past num_ids: copied as it is
    device = torch.zeros(n + 16, dtype=torch.int64)
    stage_inputs(host, device, STAGE_BLOCK + 2, torch.tensor([70, 71, 72], dtype=torch.int32))
    expect = host.clone()
    expect[[0, 3, STAGE_BLOCK + 1]] = torch.tensor([71, 70, 72])
    emit("stage_inputs", exact=bool(torch.equal(device[:n], expect) and not device[n:].any()))
    ids, logprobs = torch.arange(5, dtype=torch.int64) * 7, torch.randn(5, 3)
    out_ids, out_lp = torch.zeros_like(ids), torch.zeros_like(logprobs)
    to_host(ids, out_ids)
    to_host(logprobs, out_lp)
    emit("to_host", exact=bool(torch.equal(out_ids, ids) and torch.equal(out_lp, logprobs)))


def _gemv_checks(emit, gen) -> None:
    """The few-row matmul against F.linear: 1-16 rows, ragged N and K (masked tails), a bias, the shape rule's
    configs."""
    import torch
    import torch.nn.functional as F

    from pagedllm.layers.triton_gemv import gemv
    for m, n, k, bias, config in ((1, 24, 40, False, (16, 16, 4, 2)), (3, 70, 100, True, (32, 32, 4, 2)),
                                  (1, 33, 300, False, None), (16, 300, 64, True, None)):
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        emit(f"gemv_m{m}_n{n}_k{k}", rel=_rel(gemv(x, w, b, config), F.linear(x.double(), w.double(),
                                                                              None if b is None else b.double())))
    _fused_gemv_checks(emit, gen)


def _fused_gemv_checks(emit, gen) -> None:
    """The GEMV with RMSNorm (+ residual) before it and SiLU-and-mul after it, against the layers' CPU code (RMSNorm,
    F.linear, activation.silu_and_mul): K not a multiple of the K step (the loads one step ahead run past K), a
    bias, the next residual bit-exact."""
    import torch
    import torch.nn.functional as F

    from pagedllm.layers.activation import silu_and_mul
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.layers.triton_gemv import gemv

    for m, n, k, bias, config in ((1, 24, 40, True, (16, 16, 4, 2)), (3, 70, 300, False, None),
                                  (4, 64, 100, False, (32, 32, 4, 2))):
        norm = RMSNorm(k, 1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(k, generator=gen) * 0.5 + 1)
        x, res = torch.randn(m, k, generator=gen), torch.randn(m, k, generator=gen)
        w, w2 = torch.randn(n, k, generator=gen), torch.randn(2 * n, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        h, expect_res = norm(x, res)
        with torch.no_grad():
            out, new_res = gemv(x, w, b, config, norm=(norm.weight, norm.eps), residual=res)
            emit(f"gemv_norm_residual_m{m}_k{k}", rel=_rel(out, F.linear(h, w, b)),
                 exact=bool(torch.equal(new_res, expect_res)))
            out = gemv(x, w, b, config, norm=(norm.weight, norm.eps))
            emit(f"gemv_norm_m{m}_k{k}", rel=_rel(out, F.linear(norm(x), w, b)))
            out, _ = gemv(x, w2, None, config, norm=(norm.weight, norm.eps), residual=res, silu_and_mul=True)
            emit(f"gemv_norm_silu_m{m}_k{k}", rel=_rel(out, silu_and_mul(F.linear(h, w2))))
            emit(f"gemv_silu_m{m}_k{k}", rel=_rel(gemv(x, w2, silu_and_mul=True), silu_and_mul(F.linear(x, w2))))



def _qkv_prepare_checks(emit, gen) -> None:
    """The fused q/k norm + rotary + KV write against the layers' own CPU code (RMSNorm, RotaryEmbedding) and
    the reference KV write; strided qkv rows; a -1 slot writes nothing."""
    import torch

    from pagedllm.attention.torch_ref import write_kv_ref
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.layers.rotary import RotaryEmbedding
    from pagedllm.attention.triton_qkv import qkv_prepare

    for heads, kv_heads, head_dim in ((4, 2, 16), (3, 1, 20)):  # the second pads heads and half-dims
        tokens = 6
        rope = RotaryEmbedding(head_dim, 64, 10000.0, None)
        q_norm, k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        with torch.no_grad():
            q_norm.weight.copy_(torch.randn(head_dim, generator=gen) * 0.5 + 1)
            k_norm.weight.copy_(torch.randn(head_dim, generator=gen) * 0.5 + 1)
        width = (heads + 2 * kv_heads) * head_dim
        qkv = torch.randn(tokens, width + 5, generator=gen)[:, :width]
        pos = torch.tensor([0, 5, 63, 7, 7, 1])
        slots = torch.tensor([3, 17, -1, 0, 30, 9])
        for with_norm in (True, False):
            cache = torch.randn(2, 2, 16, kv_heads, head_dim, generator=gen)
            expected = cache.clone()
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q, k = q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)
            if with_norm:
                q, k = q_norm(q), k_norm(k)
            ref_q, ref_k = rope(pos, q, k)
            live = slots >= 0
            write_kv_ref(ref_k[live], v.reshape(tokens, kv_heads, head_dim)[live], expected, slots[live])
            norms = (q_norm.weight.detach(), k_norm.weight.detach(), 1e-6) if with_norm else ()
            out = qkv_prepare(qkv, pos, heads, kv_heads, rope.cos_cache, rope.sin_cache, cache, slots, *norms)
            label = f"qkv_prepare_h{heads}d{head_dim}" + ("_qk_norm" if with_norm else "")
            emit(f"{label}_q", rel=_rel(out, ref_q))
            emit(f"{label}_cache", rel=_rel(cache, expected))
            emit(f"{label}_v_exact", exact=bool(torch.equal(cache[1], expected[1])))


def test_decode_split_policy():
    """Splits fill about one wave of programs over the SMs; between one and two waves, 2 splits even out the second
    wave's ragged tail; from two waves up, none (the CPU stands in 4 SMs)."""
    pytest.importorskip("triton")
    import torch

    from pagedllm.attention.triton_decode import choose_num_splits
    cpu = torch.device("cpu")
    assert [choose_num_splits(seqs, 1, cpu) for seqs in (1, 2, 3, 4, 5, 7, 8, 64)] == [4, 2, 2, 2, 2, 2, 1, 1]
    assert choose_num_splits(1, 2, cpu) == 2 and choose_num_splits(4, 2, cpu) == 1


def test_prefill_heads_per_program():
    """A prefill program takes the largest power of two of its GQA group's heads that leaves 16 tokens a tile;
    a request for heads that do not divide the group, or leave fewer tokens, is refused."""
    pytest.importorskip("triton")
    import torch

    from pagedllm.attention.triton_prefill import heads_per_program, paged_prefill
    assert [heads_per_program(g, 64) for g in (1, 2, 3, 4, 6, 7, 8, 16)] == [1, 2, 1, 4, 2, 1, 4, 4]
    assert [heads_per_program(4, rows) for rows in (16, 32, 128)] == [1, 2, 4]
    q, cache = torch.zeros(4, 4, 16), torch.zeros(2, 1, 16, 2, 16)
    meta = (torch.tensor([0, 4], dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32))
    for heads, tile in ((4, (64, 16, 4, 1)), (3, (48, 16, 4, 1)), (2, (16, 16, 4, 1))):
        with pytest.raises(ValueError, match="heads a program"):
            paged_prefill(q, cache, *meta, 0.25, torch.empty_like(q), tile=tile, heads=heads)


def test_gemv_config_rule():
    """The rule reproduces the measured best configurations of Qwen3-8B's and Qwen3-0.6B's four layers (bench_pdl)."""
    pytest.importorskip("triton")
    from pagedllm.layers.triton_gemv import gemv_config
    layers = {  # (K, N): qkv, o_proj, gate_up, down
        "8b": ((4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096)),
        "0.6b": ((1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024)),
    }
    best = ((64, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 3), (32, 256, 4, 4))
    for model, shapes in layers.items():
        assert [gemv_config(n, k) for k, n in shapes] == list(best), model


def test_gemv_rejects_what_it_cannot_serve():
    pytest.importorskip("triton")
    import torch

    from pagedllm.layers.triton_gemv import gemv
    w = torch.zeros(8, 32)
    for x, what in ((torch.zeros(17, 32), "M <= 16"), (torch.zeros(2, 32, dtype=torch.float64), "M <= 16"),
                    (torch.zeros(1, 31), "31 columns")):
        with pytest.raises(ValueError, match=what):
            gemv(x, w)
    x, g = torch.zeros(2, 32), torch.ones(32)
    for weight, kwargs, what in ((w, dict(residual=x), "needs a norm"),
                                 (w, dict(norm=(g, 1e-6), residual=x[:1]), "x's shape"),
                                 (w, dict(norm=(g[:16], 1e-6)), "does not match K"),
                                 (w, dict(bias=torch.zeros(8), silu_and_mul=True), "no bias"),
                                 (torch.zeros(7, 32), dict(silu_and_mul=True), "even rows")):
        with pytest.raises(ValueError, match=what):
            gemv(x, weight, **kwargs)


def test_triton_kernels_in_interpreter():
    lines = run_checks(__file__)
    failures = []
    for rec in lines:
        if "rel" in rec and not rec["rel"] <= REL_TOL:  # NaN fails too
            failures.append(rec)
        if rec.get("finite") is False or rec.get("exact") is False:
            failures.append(rec)
    assert len(lines) >= 20, f"too few checks ran: {lines}"
    assert not failures, f"kernels disagree with the torch reference: {failures}"


if __name__ == "__main__":
    sys.exit(child_main(_attention_checks, _qkv_step_checks, _ops_checks))
