"""The same greedy outputs alone, batched, under preemption and under chunked prefill; every block comes back."""
from pagedllm import LLM, SamplingParams
from tests.conftest import all_blocks_free, hf_greedy, random_prompts

PARAMS = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def _generate(llm, prompts, params=PARAMS):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_alone_equals_batched(tiny_llama):
    prompts = random_prompts(12, max_len=50, seed=1)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True)
    batched = _generate(llm, prompts)
    alone = [_generate(llm, [p])[0] for p in prompts]
    assert batched == alone
    assert all_blocks_free(llm)


def test_preemption_keeps_outputs(tiny_llama):
    prompts = random_prompts(10, min_len=20, max_len=50, seed=2)
    reference = hf_greedy(tiny_llama, prompts, 30)
    # 12 blocks of 8 tokens = 96 tokens: one request needs up to 80, so ten cannot run side by side.
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, block_size=8,
              kv_cache_memory=12 * llm_block_bytes(tiny_llama, 8))
    assert llm.llm_engine.kv_cache.num_blocks == 12
    assert _generate(llm, prompts) == reference
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert all_blocks_free(llm)


def llm_block_bytes(path, block_size):
    # 2 (K, V) x 2 layers x block_size x 2 kv heads x head_dim 16 x 4 bytes (fp32), for the tiny llama-gqa
    return 2 * 2 * block_size * 2 * 16 * 4


def test_chunked_prefill_keeps_outputs(tiny_llama):
    prompts = random_prompts(6, min_len=30, max_len=70, seed=3)
    reference = hf_greedy(tiny_llama, prompts, 30)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=16)
    chunked = []
    step = llm.llm_engine.scheduler.schedule

    def spy():
        out = step()
        chunked.extend(n for r, n in zip(out.requests, out.num_new_tokens)
                       if r.num_computed_tokens + n < r.num_prompt_tokens)
        return out
    llm.llm_engine.scheduler.schedule = spy
    assert _generate(llm, prompts) == reference
    assert chunked, "no prompt was prefilled in chunks"
    assert all_blocks_free(llm)


def test_mixed_decode_and_prefill_in_one_step(tiny_llama):
    prompts = random_prompts(8, min_len=5, max_len=40, seed=4)
    reference = hf_greedy(tiny_llama, prompts, 30)
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, max_num_seqs=3,
              max_num_batched_tokens=24)
    mixed = []
    step = llm.llm_engine.scheduler.schedule

    def spy():
        out = step()
        if 0 < out.num_decodes < len(out.requests):
            mixed.append(out)
        return out
    llm.llm_engine.scheduler.schedule = spy
    assert _generate(llm, prompts) == reference
    assert mixed, "no step mixed decodes and prefills"
    assert all_blocks_free(llm)


def test_decodes_run_longest_context_first(tiny_llama):
    """The model runner orders a step's decodes longest context first (decode attention then launches its longest
    programs first), whatever the scheduler's order; each request's output is still HF's."""
    prompts = sorted(random_prompts(6, min_len=5, max_len=60, seed=5), key=len)  # arrival order: shortest first
    llm = LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True)
    runner = llm.llm_engine.runner
    build, orders = runner._build_step, []

    def spy(sched, tables):
        step, requests, rows = build(sched, tables)
        orders.append(step.seq_lens[:step.num_decodes])
        return step, requests, rows
    runner._build_step = spy
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(tiny_llama, prompts, 8)
    decode_orders = [o for o in orders if len(set(o)) > 1]
    assert decode_orders and all(o == sorted(o, reverse=True) for o in decode_orders)
    assert all_blocks_free(llm)
