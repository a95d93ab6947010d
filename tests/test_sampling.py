"""Sampling: greedy equivalences, seeds, penalties / min_p / top-k / top-p against direct formulas, stop strings,
logprobs against Hugging Face logits."""
import math

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sampling.sampler import (SamplingMetadata, Sampler, apply_min_p, apply_penalties,
                                       apply_top_k_top_p)
from tests.conftest import all_blocks_free, random_prompts


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, seed=123)


def _ids(llm, prompts, params):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_top_k_1_equals_greedy(llm):
    prompts = random_prompts(4, seed=5)
    greedy = _ids(llm, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    top1 = _ids(llm, prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=20, ignore_eos=True))
    assert greedy == top1


def test_seed_reproducible_alone_and_batched(llm):
    prompts = random_prompts(5, seed=6)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=25, ignore_eos=True)
    alone = _ids(llm, [prompts[0]], seeded)[0]
    others = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    batched = _ids(llm, prompts, [seeded] + [others] * 4)[0]
    assert alone == batched
    assert _ids(llm, [prompts[0]], SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=25,
                                                  ignore_eos=True))[0] != alone
    assert all_blocks_free(llm)


def _meta(batch, **kw):
    base = dict(temperature=torch.ones(batch), greedy=torch.zeros(batch, dtype=torch.bool), all_greedy=False)
    base.update(kw)
    return SamplingMetadata(**base)


def test_penalties_match_formula():
    torch.manual_seed(0)
    vocab = 10
    logits = torch.randn(2, vocab)
    prompts = [[1, 2, 2], [5]]
    outputs = [[2, 3, 3, 3], [7, 7]]
    rep, pres, freq = [1.3, 0.8], [0.5, -0.2], [0.25, 1.0]
    meta = _meta(2, repetition_penalty=torch.tensor(rep), presence_penalty=torch.tensor(pres),
                 frequency_penalty=torch.tensor(freq),
                 prompt_token_ids=torch.tensor([[1, 2, 2], [5, vocab, vocab]]),
                 output_token_ids=torch.tensor([[2, 3, 3, 3], [7, 7, vocab, vocab]]))
    got = apply_penalties(logits.clone(), meta)
    for row in range(2):
        for t in range(vocab):
            x = logits[row, t].item()
            if t in prompts[row] or t in outputs[row]:
                x = x / rep[row] if x > 0 else x * rep[row]
            count = outputs[row].count(t)
            x -= freq[row] * count + pres[row] * (count > 0)
            assert got[row, t].item() == pytest.approx(x, abs=1e-6)


def test_penalties_apply_in_generation(llm, tiny_llama):
    """Greedy decoding with repetition, presence and frequency penalties equals a step-by-step loop over HF
    transformers' logits with the same formula, in a batch whose other rows carry other penalties (or none)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompts = random_prompts(3, min_len=3, max_len=12, seed=12)
    settings = [(1.6, 0.0, 0.0), (1.0, 1.5, 0.7), (1.3, -0.5, 1.2)]  # (repetition, presence, frequency)
    params = [SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, repetition_penalty=r,
                             presence_penalty=p, frequency_penalty=f) for r, p, f in settings]
    got = _ids(llm, prompts, params)
    for prompt, (rep, pres, freq), ours in zip(prompts, settings, got):
        output: list[int] = []
        for _ in range(25):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + output])).logits[0, -1]
            seen = torch.tensor(sorted(set(prompt + output)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / rep, logits[seen] * rep)
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.numel()).float()
            logits -= freq * counts + pres * (counts > 0).float()
            output.append(int(logits.argmax()))
        assert ours == output
    plain = _ids(llm, prompts, SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))
    assert all(a != b for a, b in zip(got, plain))  # each setting changed what greedy decoding gives


def test_min_p_applies_in_generation(llm):
    """min_p=1 keeps only the most likely token: sampling at any temperature then equals greedy decoding."""
    prompts = random_prompts(4, seed=13)
    greedy = _ids(llm, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert _ids(llm, prompts, SamplingParams(temperature=2.0, min_p=1.0, max_tokens=20, ignore_eos=True)) == greedy
    assert _ids(llm, prompts, SamplingParams(temperature=2.0, seed=5, max_tokens=20, ignore_eos=True)) != greedy


def test_min_p_matches_formula():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = logits.softmax(-1)[0]
    got = apply_min_p(logits, torch.tensor([0.2]))
    keep = probs >= 0.2 * probs.max()
    assert torch.equal(torch.isfinite(got[0]), keep)
    assert torch.equal(got[0][keep], logits[0][keep])


def test_top_k_top_p_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    got = apply_top_k_top_p(logits, torch.tensor([2, 5]), torch.tensor([1.0, 0.5]))
    assert torch.isfinite(got[0]).tolist() == [True, False, True, False, False]
    probs = logits[1].softmax(-1)
    order = probs.argsort(descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    keep = torch.zeros(5, dtype=torch.bool)
    keep[order[before <= 0.5]] = True
    assert torch.isfinite(got[1]).tolist() == keep.tolist()


def test_random_sampling_follows_the_distribution():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -4.0]).repeat(20000, 1)
    temperature = 0.8
    meta = _meta(20000, temperature=torch.full((20000,), temperature), top_k=torch.full((20000,), 4))
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, meta).token_ids
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    expected = (logits[0, :4] / temperature).softmax(-1)
    assert freq[4] == 0
    assert torch.allclose(freq[:4], expected, atol=0.015)


def test_stop_strings_across_token_boundaries(stories_path):
    llm = LLM(stories_path, dtype="float32")
    full = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40),
                        use_tqdm=False)[0].outputs[0]
    assert full.text.startswith(", there was a little girl named Lily.")
    # "e was a l" spans the tokens of "there", " was", " a" and " little".
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=["zzz", "e was a l"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == ", ther"
    assert out.finish_reason == "stop" and out.stop_reason == "e was a l"
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop="girl nam",
                                                           include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == ", there was a little girl nam"
    by_id = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40,
                                                            stop_token_ids=[full.token_ids[3]]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:4] and by_id.stop_reason == full.token_ids[3]
    assert all_blocks_free(llm)


def test_eos_min_tokens_ignore_eos(tiny_llama, tmp_path):
    import json
    import shutil
    prompt = {"prompt_token_ids": random_prompts(1, seed=8)[0]}
    base = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True)
    free = base.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    eos = free[5]
    first = free.index(eos)
    # The same model, told that this token is its EOS.
    path = tmp_path / "model"
    shutil.copytree(tiny_llama, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos
        (path / name).write_text(json.dumps(config))
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True)
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    longer = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, min_tokens=first + 3),
                          use_tqdm=False)[0].outputs[0]
    assert eos not in longer.token_ids[:first + 3]
    ignored = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"
    by_stop_id = base.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[eos],
                                                      min_tokens=first + 1), use_tqdm=False)[0].outputs[0]
    assert eos not in by_stop_id.token_ids[:first + 1]
    assert by_stop_id.finish_reason in ("stop", "length")


def test_logprobs_equal_hf_log_softmax(tiny_llama):
    from transformers import AutoModelForCausalLM
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True)
    prompt = random_prompts(1, seed=9)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.8, seed=1, max_tokens=8,
                                                                    logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    ids = torch.tensor([prompt + out.token_ids])
    logprobs = hf(ids).logits[0].log_softmax(-1)
    total = 0.0
    for i, token in enumerate(out.token_ids):
        row = logprobs[len(prompt) - 1 + i]
        entry = out.logprobs[i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(3)
        for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
            if tid != token:
                assert entry[tid].rank == rank
        total += row[token].item()
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)
    assert not math.isnan(total)


def test_token_history_equals_padding_the_lists():
    """The penalties' persistent token arrays equal padding the requests' lists, step after step, also when an
    id is reused by a new request and when outputs outgrow the buffer."""
    import random

    from pagedllm.core.request import Request
    from pagedllm.worker.token_history import TokenHistory

    def naive(rows, pad):
        width = max(1, max(len(r) for r in rows))
        return [r + [pad] * (width - len(r)) for r in rows]

    rng = random.Random(0)
    history = TokenHistory(pad_id=99)
    requests = [Request(f"r{i}", [rng.randrange(90) for _ in range(rng.randint(1, 30))], None, 0.0, i, 500)
                for i in range(5)]
    for step in range(80):
        batch = [r for r in requests if rng.random() < 0.8] or requests[:1]
        for r in batch:
            r.append_output_token(rng.randrange(90))
        prompts, outputs = history.padded(batch)
        assert prompts.tolist() == naive([r.prompt_token_ids for r in batch], 99)
        assert outputs.tolist() == naive([r.output_token_ids for r in batch], 99)
        if step == 40:  # r0 finishes; a new request takes its id
            history.forget("r0")
            requests[0] = Request("r0", [1, 2, 3], None, 0.0, 9, 500)
        if step == 60:  # an id reused without forget (the old object is still cached): rebuilt, not mixed
            requests[1] = Request("r1", [4], None, 0.0, 10, 500)
