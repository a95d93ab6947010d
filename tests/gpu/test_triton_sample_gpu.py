"""The fused Gumbel-max sampling kernel on the GPU at real shapes (vocabularies of 151,936 and 32,003; fp32 and
bf16): greedy rows equal torch.argmax, -inf entries are never chosen, a row's token depends on its seed only, and
draws follow softmax(logits / T). The Sampler given seeds agrees with its torch path: exactly where greedy, in
distribution (chi-square) where not."""
import pytest
import torch

from pagedllm.sampling.sampler import Sampler, SamplingMetadata, apply_min_p, apply_top_k_top_p

pytestmark = pytest.mark.gpu

VOCABS = [151936, 32003]
DTYPES = [torch.float32, torch.bfloat16]
CHI2_LIMIT = 40.0  # at most 7 degrees of freedom: p < 1e-5 (the seeds are fixed)
DIST_LOGITS = [1.0, 0.5, 0.0, -0.5, 0.8, -1.0, 0.2, -0.2]


def _seeds(base: int, n: int) -> torch.Tensor:
    from pagedllm.sampling.seeds import mix_seed
    return torch.tensor([mix_seed(base, i) for i in range(n)], device="cuda")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).cuda()


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.cpu().double() * tokens.numel()
    live = expected > 0
    assert counts[~live].sum() == 0, f"tokens of probability 0 drawn: {counts.tolist()}"
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", [1, 37, 256])
def test_greedy_equals_argmax(batch, vocab, dtype):
    from pagedllm.sampling.triton_sample import gumbel_sample
    x = (_randn(batch, vocab, seed=vocab + batch) * 4).to(dtype)
    x[0, [vocab - 1, 7, vocab // 2]] = x[0].max() + 1  # a three-way tie at the maximum: the lowest index wins
    ref = x.argmax(dim=-1)
    assert ref[0] == 7
    ones, zeros = torch.ones(batch, device="cuda"), torch.zeros(batch, device="cuda")
    seeds = _seeds(batch, batch)
    assert torch.equal(gumbel_sample(x, ones, torch.ones_like(ones, dtype=torch.bool), seeds), ref)
    assert torch.equal(gumbel_sample(x, zeros, torch.zeros_like(ones, dtype=torch.bool), seeds), ref)
    from pagedllm.sampling.triton_sample import argmax_rows
    for num_splits in (None, 1, 7):  # the default split, none, and one that leaves the last split short
        assert torch.equal(argmax_rows(x, num_splits=num_splits), ref), num_splits


def test_split_reduction_under_load():
    """The last program of a row to finish reduces its splits (a counter a row): over many calls of many splits,
    with the maximum in a random split each time, every token is torch.argmax's."""
    from pagedllm.sampling.triton_sample import argmax_rows, gumbel_sample
    gen = torch.Generator(device="cuda").manual_seed(5)
    for batch in (1, 5, 64):
        x = torch.randn(batch, 151936, device="cuda", generator=gen, dtype=torch.bfloat16)
        ones, flags = torch.ones(batch, device="cuda"), torch.ones(batch, dtype=torch.bool, device="cuda")
        for i in range(40):
            x[:, (i * 7919) % x.shape[1]] = 100.0 + i
            ref = x.argmax(dim=-1)
            assert torch.equal(argmax_rows(x), ref), (batch, i)
            assert torch.equal(gumbel_sample(x, ones, flags, _seeds(i, batch)), ref), (batch, i)


def test_sampling_kernel_compiles_once_for_any_batch():
    """The batch changes every step, and with it the splits a row: one compiled variant a mode (sampling, all
    greedy) must serve every batch (a new one mid-run costs a compilation inside a step)."""
    from pagedllm.sampling.triton_sample import _gumbel_argmax_kernel, argmax_rows, gumbel_sample

    def compiled() -> int:
        return sum(len(caches[0]) for caches in _gumbel_argmax_kernel.device_caches.values())

    before, counts = compiled(), []
    for batch in (1, 3, 17, 64, 100, 256):
        x = _randn(batch, 151936, seed=batch).to(torch.bfloat16)
        ones = torch.ones(batch, device="cuda")
        gumbel_sample(x, ones, torch.zeros(batch, dtype=torch.bool, device="cuda"), _seeds(batch, batch))
        argmax_rows(x)
        counts.append(compiled() - before)
    assert max(counts) <= 2, f"new compiled variants of the sampling kernel after each batch: {counts}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_masked_entries_never_chosen(vocab, dtype):
    from pagedllm.sampling.triton_sample import gumbel_sample
    batch = 256
    keep = torch.rand(batch, vocab, generator=torch.Generator().manual_seed(vocab)).cuda() < 0.01
    keep[:, -1] = True
    x = (_randn(batch, vocab, seed=1) * 2).masked_fill(~keep, float("-inf")).to(dtype)
    no_greedy = torch.zeros(batch, dtype=torch.bool, device="cuda")
    for step, temperature in enumerate((0.5, 1.0, 5.0)):
        tokens = gumbel_sample(x, torch.full((batch,), temperature, device="cuda"), no_greedy, _seeds(step, batch))
        assert keep.gather(1, tokens[:, None]).all()
    dead = torch.full((4, vocab), float("-inf"), dtype=dtype, device="cuda")
    tokens = gumbel_sample(dead, torch.ones(4, device="cuda"), no_greedy[:4], _seeds(9, 4))
    assert ((tokens >= 0) & (tokens < vocab)).all()


@pytest.mark.parametrize("vocab", VOCABS)
def test_a_rows_token_depends_on_its_seed_only(vocab):
    from pagedllm.sampling.triton_sample import gumbel_sample
    batch, kept = 256, 10
    x = _randn(batch, vocab, seed=2) * 2
    temperature = torch.rand(batch, generator=torch.Generator().manual_seed(3)).cuda() * 1.5 + 0.2
    no_greedy = torch.zeros(batch, dtype=torch.bool, device="cuda")
    seeds = _seeds(1, batch)
    first = gumbel_sample(x, temperature, no_greedy, seeds)
    assert torch.equal(gumbel_sample(x, temperature, no_greedy, seeds), first)
    for num_splits in (1, 7):  # nor on how the vocabulary is split over programs
        assert torch.equal(gumbel_sample(x, temperature, no_greedy, seeds, num_splits=num_splits), first)
    # other rows change (logits, temperature, greedy flag, seed): the first rows' tokens do not
    x2, t2, seeds2 = _randn(batch, vocab, seed=4) * 2, temperature.flip(0), _seeds(2, batch)
    x2[:kept], t2[:kept], seeds2[:kept] = x[:kept], temperature[:kept], seeds[:kept]
    greedy2 = torch.arange(batch, device="cuda") % 2 == 1
    greedy2[:kept] = False
    assert torch.equal(gumbel_sample(x2, t2, greedy2, seeds2)[:kept], first[:kept])
    for row in (0, 5):
        alone = gumbel_sample(x[row:row + 1], temperature[row:row + 1], no_greedy[:1], seeds[row:row + 1])
        assert alone.item() == first[row].item()
    flat = torch.zeros(batch, vocab, device="cuda")
    assert gumbel_sample(flat, torch.ones(batch, device="cuda"), no_greedy, seeds).unique().numel() > 200


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_distribution_is_softmax_over_temperature(vocab, dtype):
    """Eight live tokens spread over the vocabulary (first and last chunk, a chunk boundary), one row repeated."""
    from pagedllm.sampling.triton_sample import gumbel_sample
    rows, temperature = 20000, 0.8
    cols = torch.tensor([0, 1, 2047, 2048, vocab // 3, vocab // 2 + 3, vocab - 2, vocab - 1])
    row = torch.full((vocab,), float("-inf"))
    row[cols] = torch.tensor(DIST_LOGITS)
    row = row.to("cuda", dtype)
    tokens = gumbel_sample(row.expand(rows, vocab), torch.full((rows,), temperature, device="cuda"),
                           torch.zeros(rows, dtype=torch.bool, device="cuda"), _seeds(12345, rows))
    assert torch.isin(tokens.cpu(), cols).all()
    probs = (row.float() / temperature).softmax(-1)
    chi2 = _chi2(tokens, probs)
    assert chi2 < CHI2_LIMIT, f"chi-square {chi2:.1f}"


def _meta(batch: int, temperature: float, greedy: torch.Tensor | None = None, **kw) -> SamplingMetadata:
    greedy = torch.zeros(batch, dtype=torch.bool, device="cuda") if greedy is None else greedy
    return SamplingMetadata(temperature=torch.where(greedy, 1.0, torch.full((batch,), temperature, device="cuda")),
                            greedy=greedy, all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("filters", [False, True])
def test_sampler_with_seeds_greedy_rows_and_logprobs_exact(vocab, dtype, filters):
    batch = 64
    x = (_randn(batch, vocab, seed=vocab) * 3).to(dtype)
    kw = {}
    if filters:
        kw = dict(top_k=torch.full((batch,), 50, device="cuda"), top_p=torch.full((batch,), 0.9, device="cuda"),
                  min_p=torch.full((batch,), 0.05, device="cuda"))
    for greedy in (torch.arange(batch, device="cuda") % 3 == 0, torch.ones(batch, dtype=torch.bool, device="cuda")):
        torch_out = Sampler(torch.Generator(device="cuda").manual_seed(0))(
            x.clone(), _meta(batch, 0.9, greedy, max_num_logprobs=5, **kw))
        fused_out = Sampler(torch.Generator(device="cuda").manual_seed(0))(
            x.clone(), _meta(batch, 0.9, greedy, max_num_logprobs=5, seeds=_seeds(7, batch), **kw))
        assert torch.equal(fused_out.token_ids[greedy], torch_out.token_ids[greedy])
        assert torch.equal(fused_out.sampled_logprobs[greedy], torch_out.sampled_logprobs[greedy])
        assert torch.equal(fused_out.top_logprobs, torch_out.top_logprobs)
        assert torch.equal(fused_out.top_token_ids, torch_out.top_token_ids)
        assert fused_out.sampled_logprobs.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "top_k_top_p", "min_p"])
def test_sampler_with_seeds_matches_the_torch_path_in_distribution(case, dtype):
    rows, temperature = 20000, 1.2 if case == "top_k_top_p" else 0.8
    logits = torch.tensor(DIST_LOGITS, device="cuda").to(dtype)
    kw = {}
    if case == "top_k_top_p":
        kw = dict(top_k=torch.full((rows,), 6, device="cuda"), top_p=torch.full((rows,), 0.8, device="cuda"))
    elif case == "min_p":
        kw = dict(min_p=torch.full((rows,), 0.4, device="cuda"))
    # the torch path's own filters on one row give the distribution both paths must follow
    one = logits.float()[None] / temperature
    if "min_p" in kw:
        one = apply_min_p(one, kw["min_p"][:1])
    if "top_k" in kw:
        one = apply_top_k_top_p(one, kw["top_k"][:1], kw["top_p"][:1])
    probs = one.softmax(-1)[0]
    if case != "plain":
        assert (probs == 0).sum() >= 2  # the filters do drop tokens
    fused = Sampler()(logits.repeat(rows, 1), _meta(rows, temperature, seeds=_seeds(99, rows), **kw)).token_ids
    reference = Sampler(torch.Generator(device="cuda").manual_seed(0))(
        logits.repeat(rows, 1), _meta(rows, temperature, **kw)).token_ids
    for tokens in (fused, reference):
        chi2 = _chi2(tokens, probs)
        assert chi2 < CHI2_LIMIT, f"chi-square {chi2:.1f}"
