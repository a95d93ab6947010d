"""Sharing the KV cache: prefix caching, parallel sampling with copy-on-write, swap preemption, waste accounting."""
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.block_pool import BlockPool, block_key
from tests.conftest import all_blocks_free, hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
BLOCK_BYTES_8 = 2 * 2 * 8 * 2 * 16 * 4  # one 8-token block of the tiny llama-gqa in fp32


def _run(llm, prompts, params=GREEDY):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], outputs


def _workloads():
    system = random_prompts(1, min_len=37, max_len=37, seed=10)[0]
    questions = random_prompts(6, min_len=3, max_len=15, seed=11)
    shared_system = [system + q for q in questions]
    base = random_prompts(1, min_len=21, max_len=21, seed=12)[0]  # diverge at token 21: inside block 3 of 8
    diverging = [base + [5 + i, 6 + i, 7] for i in range(4)]
    return {"shared_system": shared_system, "diverging_inside_a_block": diverging}


@pytest.mark.parametrize("name", ["shared_system", "diverging_inside_a_block"])
def test_prefix_caching_on_and_off_agree(tiny_llama, name):
    prompts = _workloads()[name]
    off = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8, enable_prefix_caching=False)
    on = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8)
    expected, _ = _run(off, prompts)
    _run(on, prompts[:1])  # the first request fills the cache
    got, outputs = _run(on, prompts[1:])
    assert got == expected[1:]
    stats, stats_off = on.llm_engine.get_stats(), off.llm_engine.get_stats()
    assert stats.prefix_cache_hit_rate > 0.3
    assert all(o.num_cached_tokens >= 16 for o in outputs)
    assert stats.num_computed_prompt_tokens <= stats_off.num_computed_prompt_tokens - 16 * (len(prompts) - 1)
    assert off.llm_engine.get_stats().prefix_cache_hit_rate == 0
    assert all_blocks_free(on) and all_blocks_free(off)


def test_multi_turn_chat_reuses_the_conversation(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8)
    reference = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8,
                    enable_prefix_caching=False)
    conversation = random_prompts(1, min_len=20, max_len=20, seed=13)[0]
    for turn in range(3):
        (answer,), (output,) = _run(llm, [conversation])
        assert answer == _run(reference, [conversation])[0][0]
        if turn > 0:
            assert output.num_cached_tokens >= 8 * ((len(conversation) - 1) // 8) - 8
        conversation = conversation + answer + random_prompts(1, min_len=5, max_len=5, seed=14 + turn)[0]
    stats, stats_off = llm.llm_engine.get_stats(), reference.llm_engine.get_stats()
    assert stats.prefix_cache_hit_rate > 0.4
    assert stats.prefix_cache_hits == stats_off.num_computed_prompt_tokens - stats.num_computed_prompt_tokens
    assert stats.num_computed_prompt_tokens < 0.6 * stats_off.num_computed_prompt_tokens


def test_whole_prompt_cached_still_computes_its_last_token(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8)
    prompt = random_prompts(1, min_len=24, max_len=24, seed=15)[0]  # exactly 3 blocks
    first, _ = _run(llm, [prompt])
    again, (output,) = _run(llm, [prompt])
    assert again == first and output.num_cached_tokens == 16


def test_eviction_under_a_small_pool(tiny_llama):
    prompts = _workloads()["shared_system"] + random_prompts(6, min_len=20, max_len=40, seed=16)
    reference = hf_greedy(tiny_llama, prompts, 20)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8,
              kv_cache_memory=14 * BLOCK_BYTES_8)
    for i in range(0, len(prompts), 3):
        assert _run(llm, prompts[i:i + 3])[0] == reference[i:i + 3]
    assert llm.llm_engine.kv_cache.pool.num_evictions > 0
    assert all_blocks_free(llm)


def test_block_pool_evicts_least_recently_freed_first():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    ka, kb = block_key(None, (1,)), block_key(None, (2,))
    pool.register(a, ka)
    pool.register(b, kb)
    pool.free([b])
    pool.free([a])
    pool.free([c])
    assert pool.allocate(1) == [b]  # freed first, so evicted first
    assert pool.lookup(kb) is None and pool.lookup(ka) == a
    pool.share(a)  # a hit takes it back out of the free queue
    assert pool.num_free_blocks == 1 and pool.ref_counts[a] == 1


def test_parallel_sampling_shares_prompt_blocks(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8)
    prompt = random_prompts(1, min_len=30, max_len=30, seed=17)[0]  # 3 full blocks + 6 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    engine = llm.llm_engine
    engine.add_request("p", prompt, params)
    shared_seen = []
    while engine.has_unfinished_requests():
        engine.step()
        tables = [t for rid, t in engine.kv_cache.block_tables.items() if rid.endswith("_p")]
        if len(tables) == 4:
            shared_seen.append(sum(1 for b in set(tables[0]) if all(b in t for t in tables)))
    assert max(shared_seen) >= 3, "the n sequences did not share the prompt's full blocks"
    assert all_blocks_free(llm)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    texts = [c.token_ids for c in first.outputs]
    assert texts == [c.token_ids for c in second.outputs]
    assert len({tuple(t) for t in texts}) > 1
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]


def test_parallel_sampled_sequences_keep_their_own_cache(tiny_llama):
    """n=4 sampled sequences diverge inside the shared partial block: each sequence's log-probabilities must be
    HF's on its own tokens, which holds only if every sequence attends to its own K/V after copy-on-write."""
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8, enable_prefix_caching=False)
    prompt = random_prompts(1, min_len=13, max_len=13, seed=25)[0]  # 1 full block + 5 tokens shared
    output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.5, seed=3, max_tokens=10,
                                                                       logprobs=0, ignore_eos=True),
                          use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 4
    for completion in output.outputs:
        with torch.no_grad():
            rows = hf(torch.tensor([prompt + completion.token_ids])).logits[0].log_softmax(-1)
        for i, token in enumerate(completion.token_ids):
            assert completion.logprobs[i][token].logprob == pytest.approx(rows[len(prompt) - 1 + i, token].item(),
                                                                          abs=1e-4)
    assert all_blocks_free(llm)


def test_parallel_sampling_greedy_copies_on_write(tiny_llama):
    """n greedy sequences must all equal the single greedy answer: the copy-on-write of the shared partial block
    keeps each sequence's writes its own."""
    prompts = random_prompts(3, min_len=10, max_len=30, seed=18)
    single, _ = _run(LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True), prompts)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8, enable_prefix_caching=False)
    copies = []
    schedule = llm.llm_engine.scheduler.schedule

    def spy():
        out = schedule()
        copies.extend(out.blocks_to_copy)
        return out
    llm.llm_engine.scheduler.schedule = spy
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for expected, output in zip(single, outputs):
        assert [c.token_ids for c in output.outputs] == [expected] * 3
    assert copies, "no copy-on-write happened"
    assert all_blocks_free(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_modes_keep_outputs(tiny_llama, mode):
    prompts = random_prompts(10, min_len=20, max_len=50, seed=19)
    reference = hf_greedy(tiny_llama, prompts, 20)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8,
              kv_cache_memory=12 * BLOCK_BYTES_8, preemption_mode=mode, swap_space=0.01,
              enable_prefix_caching=False)
    assert _run(llm, prompts)[0] == reference
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert (stats.num_swaps > 0) == (mode == "swap")
    assert all_blocks_free(llm)
    assert not llm.llm_engine.kv_cache.host_tables


def test_block_keys_chain_their_parents(tiny_llama):
    """A block is found only under the same prefix: the same 8 tokens after another first block (or first in
    the prompt) are different K/V, so they must miss."""
    first, second = random_prompts(2, min_len=8, max_len=8, seed=22)
    assert block_key(None, tuple(second)) != block_key(block_key(None, tuple(first)), tuple(second))
    tail = random_prompts(1, min_len=12, max_len=12, seed=23)[0]
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8)
    _run(llm, [first + second + tail])
    got, (output,) = _run(llm, [second + tail])  # its first block equals the cached prompt's second block
    assert output.num_cached_tokens == 0
    assert got == hf_greedy(tiny_llama, [second + tail], 20)
    again, (output,) = _run(llm, [first + second + tail[:4]])
    assert output.num_cached_tokens == 16 and again == hf_greedy(tiny_llama, [first + second + tail[:4]], 20)


def test_waste_accounting_is_exact(tiny_llama):
    """One sequence, a 10-token prompt, blocks of 16, 4 output tokens: after each of its 4 steps the cache holds
    10, 11, 12, 13 tokens in one 16-slot block (the last sampled token is never computed)."""
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=16, max_model_len=200,
              enable_prefix_caching=False)
    _run(llm, random_prompts(1, min_len=10, max_len=10, seed=24), SamplingParams(max_tokens=4, ignore_eos=True))
    stats = llm.llm_engine.get_stats()
    held = [10, 11, 12, 13]
    assert stats.kv_fragmentation == pytest.approx(sum(1 - h / 16 for h in held) / 4)
    assert stats.kv_waste_if_contiguous == pytest.approx(sum(1 - h / 200 for h in held) / 4)
    assert stats.kv_sharing_savings == 0
    assert stats.num_computed_prompt_tokens == 10


def test_waste_accounting(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=16)
    _run(llm, random_prompts(8, min_len=10, max_len=40, seed=20))
    stats = llm.llm_engine.get_stats()
    assert 0 < stats.kv_fragmentation < 0.5
    assert stats.kv_sharing_savings == 0  # nothing shared
    llm.generate({"prompt_token_ids": random_prompts(1, min_len=40, max_len=40, seed=21)[0]},
                 SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert llm.llm_engine.get_stats().kv_sharing_savings > 0
