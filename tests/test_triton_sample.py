"""The fused Gumbel-max sampling kernel (pagedllm/sampling/triton_sample.py) on the CPU through Triton's interpreter,
at small shapes: greedy rows equal torch.argmax (ties to the lowest index, 16-bit inputs), -inf entries are never
chosen, a row's draw depends only on its seed, and draws follow softmax(logits / T). Also mix_seed, the wrapper's
input checks, and the Sampler keeping its torch path when no seeds are given.

The interpreter must be switched on before triton is imported, so the kernel runs in a child process: this file,
executed as a script, prints one JSON line per check; the tests read them (as in test_triton_interpreter.py).
"""
from __future__ import annotations

import sys

import pytest
import torch

from pagedllm.sampling.sampler import Sampler, SamplingMetadata, random_sample
from tests.interpreter_harness import child_main, run_checks

CHI2_LIMIT = 30.0  # 7 degrees of freedom: p < 1e-4 (the seeds are fixed, so the statistic is too)
DIST_LOGITS = [1.0, 0.5, 0.0, -0.5, 0.8, -1.0, 0.2, -0.2]
DIST_TEMPERATURE = 0.8
DIST_ROWS = 2000


def _kernel_checks(emit) -> None:
    from pagedllm.sampling.seeds import mix_seed
    from pagedllm.sampling.triton_sample import argmax_rows, gumbel_sample

    gen = torch.Generator().manual_seed(2024)

    def seeds(base: int, n: int) -> torch.Tensor:
        return torch.tensor([mix_seed(base, i) for i in range(n)])

    def sample(logits, temperature, greedy=None, seed_base=0, block=16, num_splits=None):
        batch = logits.shape[0]
        temperature = torch.full((batch,), float(temperature)) if isinstance(temperature, float) else temperature
        greedy = torch.zeros(batch, dtype=torch.bool) if greedy is None else greedy
        return gumbel_sample(logits, temperature, greedy, seeds(seed_base, batch), block=block,
                             num_splits=num_splits).tolist()

    # Greedy: by flag and by T == 0, over several chunks (block 16, vocab 50), in one, and split over four programs
    # per row; ties at the maximum in one lane (3, 19), across lanes (5, 40) and three-way (2, 34, 49).
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(6, 50, generator=gen) * 3
        for row, cols in ((0, [3, 19]), (1, [40, 5]), (2, [49, 2, 34])):
            x[row, cols] = x[row].max() + 1
        x = x.to(dtype)
        ones, every = torch.ones(6), torch.ones(6, dtype=torch.bool)
        emit(f"greedy_{dtype}", ref=x.float().argmax(-1).tolist(),
             flag=sample(x, ones, every), zero_t=sample(x, torch.zeros(6)), one_chunk=sample(x, ones, every, block=64),
             split=sample(x, ones, every, num_splits=4),
             argmax_rows=argmax_rows(x, block=16).tolist(), argmax_split=argmax_rows(x, block=16, num_splits=4).tolist(),
             argmax_split3=argmax_rows(x, block=16, num_splits=3).tolist())

    # -inf entries: a high temperature (the noise dominates) and 10 draws of each of 8 rows.
    x = torch.randn(8, 40, generator=gen)
    x[torch.rand(8, 40, generator=gen) < 0.7] = float("-inf")
    x[:, 0] = torch.randn(8, generator=gen)  # at least one finite entry per row
    x[7] = float("-inf")
    x[7, 33] = 0.0
    xs = x.repeat(10, 1)
    tokens = sample(xs, 4.0, seed_base=3)
    emit("masked", finite=[bool(torch.isfinite(xs[i, t])) for i, t in enumerate(tokens)],
         single=[t for i, t in enumerate(tokens) if i % 8 == 7])
    dead = torch.full((3, 20), float("-inf"))
    emit("all_masked", tokens=sample(dead, 1.0) + sample(dead, 1.0, torch.ones(3, dtype=torch.bool))
         + sample(dead, 1.0, num_splits=2) + argmax_rows(dead, block=4, num_splits=3).tolist())

    # A row's token depends on its logits, temperature and seed only.
    x = torch.randn(5, 37, generator=gen)
    temperature = torch.tensor([0.5, 0.8, 1.0, 1.3, 2.0])
    first = sample(x, temperature, seed_base=9)
    again = sample(x, temperature, seed_base=9)
    others = torch.randn(5, 37, generator=gen)
    others[2] = x[2]
    seeds_mixed = seeds(77, 5)
    seeds_mixed[2] = mix_seed(9, 2)
    changed = gumbel_sample(others, torch.tensor([1.7, 0.3, 1.0, 0.9, 5.0]),
                            torch.tensor([True, False, False, True, False]), seeds_mixed, block=16).tolist()
    moved = gumbel_sample(torch.stack([x[2], others[0]]), torch.tensor([1.0, 1.0]), torch.zeros(2, dtype=torch.bool),
                          torch.tensor([mix_seed(9, 2), 5]), block=16).tolist()
    emit("seeded", first=first, again=again, row2_changed_batch=changed[2], row2_moved=moved[0],
         split=sample(x, temperature, seed_base=9, num_splits=3), one_chunk=sample(x, temperature, seed_base=9,
                                                                                 block=64))
    emit("seeds_vary", tokens=sample(torch.zeros(64, 50), 1.0, seed_base=11, block=64))

    logits = torch.tensor(DIST_LOGITS)
    emit("distribution", tokens=sample(logits.repeat(DIST_ROWS, 1), DIST_TEMPERATURE, seed_base=12345, block=64))
    steps = torch.linspace(0, 2, 8).repeat(100, 1)
    emit("temperature", cold=sample(steps, 0.05, seed_base=21), hot=sample(steps, 10.0, seed_base=22))



@pytest.fixture(scope="module")
def checks() -> dict[str, dict]:
    lines = run_checks(__file__)
    return {rec["name"]: rec for rec in lines}


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16", "torch.float16"])
def test_greedy_rows_equal_argmax(checks, dtype):
    rec = checks[f"greedy_{dtype}"]
    assert rec["ref"][:3] == [3, 5, 2]  # torch.argmax takes the lowest of tied indices
    assert rec["flag"] == rec["ref"]
    assert rec["zero_t"] == rec["ref"]
    assert rec["one_chunk"] == rec["ref"]
    assert rec["split"] == rec["ref"]
    # argmax_rows: the kernel for greedy batches, one program a row and split (the last split's program reduces)
    assert rec["argmax_rows"] == rec["argmax_split"] == rec["argmax_split3"] == rec["ref"]


def test_masked_entries_never_chosen(checks):
    assert all(checks["masked"]["finite"])
    assert checks["masked"]["single"] == [33] * 10
    assert all(0 <= t < 20 for t in checks["all_masked"]["tokens"])


def test_a_rows_token_depends_on_its_seed_only(checks):
    rec = checks["seeded"]
    assert rec["first"] == rec["again"]
    assert rec["row2_changed_batch"] == rec["first"][2]
    assert rec["row2_moved"] == rec["first"][2]
    assert rec["split"] == rec["first"]  # the chunking and the split of the vocabulary do not change the draw
    assert rec["one_chunk"] == rec["first"]


def test_different_seeds_vary(checks):
    assert len(set(checks["seeds_vary"]["tokens"])) > 25  # 64 uniform draws over 50 tokens: about 36 distinct


def test_distribution_is_softmax_over_temperature(checks):
    counts = torch.bincount(torch.tensor(checks["distribution"]["tokens"]), minlength=len(DIST_LOGITS)).double()
    expected = (torch.tensor(DIST_LOGITS, dtype=torch.float64) / DIST_TEMPERATURE).softmax(-1) * DIST_ROWS
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_LIMIT, f"chi-square {chi2:.1f}: counts {counts.tolist()}, expected {expected.tolist()}"


def test_temperature_scales(checks):
    rec = checks["temperature"]
    assert rec["cold"].count(7) >= 97  # p(top) = 0.997 at T = 0.05
    assert rec["hot"].count(7) <= 30  # p(top) = 0.15 at T = 10
    assert len(set(rec["hot"])) == 8


def test_input_checks():
    pytest.importorskip("triton")
    from pagedllm.sampling.triton_sample import gumbel_sample
    logits, t, g, s = torch.zeros(3, 10), torch.ones(3), torch.zeros(3, dtype=torch.bool), torch.zeros(3).long()
    bad = [
        (logits[0], t, g, s, "logits must be"),
        (torch.zeros(3, 0), t, g, s, "logits must be"),
        (logits.double(), t, g, s, "dtype"),
        (logits, t.double(), g, s, "temperature"),
        (logits, torch.ones(4), g, s, "temperature"),
        (logits, t, g.int(), s, "greedy"),
        (logits, t, g, s.int(), "seeds"),
        (logits, t, g, s[:, None], "seeds"),
    ]
    for args in bad:
        with pytest.raises(ValueError, match=args[-1]):
            gumbel_sample(*args[:-1])
    with pytest.raises(ValueError, match="power of two"):
        gumbel_sample(logits, t, g, s, block=48)
    with pytest.raises(ValueError, match="num_splits"):
        gumbel_sample(logits, t, g, s, num_splits=0)


def test_mix_seed():
    pytest.importorskip("triton")
    from pagedllm.sampling.seeds import mix_seed
    values = {mix_seed(a, b) for a in (0, 1, 2**64 - 1, -5, 10**30) for b in range(20)}
    assert len(values) == 100
    assert all(0 <= v < 2**63 for v in values)
    assert mix_seed(42, 7) == mix_seed(42, 7) != mix_seed(7, 42)


def test_sampler_without_seeds_keeps_the_torch_path():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(5)) * 2
    temperature = torch.tensor([1.0, 0.7, 1.0, 1.5, 0.3, 1.0])
    greedy = torch.tensor([False, False, True, False, False, True])
    meta = SamplingMetadata(temperature=temperature, greedy=greedy, all_greedy=False, any_greedy=True)
    expected = random_sample((logits / temperature[:, None]).softmax(-1), {}, torch.Generator().manual_seed(7))
    expected = torch.where(greedy, logits.argmax(-1), expected)
    assert torch.equal(Sampler(torch.Generator().manual_seed(7))(logits.clone(), meta).token_ids, expected)
    meta.seeds = torch.arange(6)  # seeds alone do not switch a CPU batch to the kernel
    assert torch.equal(Sampler(torch.Generator().manual_seed(7))(logits.clone(), meta).token_ids, expected)


if __name__ == "__main__":
    sys.exit(child_main(_kernel_checks))
