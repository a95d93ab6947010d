"""Async scheduling (each step launched before the previous one's tokens are on the host): the same outputs as
stepping synchronously, under batching, chunked prefill, preemption (recompute and swap), stops of every kind and
aborts, with every block given back. On the CPU nothing overlaps, but the bookkeeping is the same as on CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import all_blocks_free, hf_greedy, random_prompts
from tests.test_invariance import llm_block_bytes

TESTS = Path(__file__).resolve().parent


def _llm(path, async_scheduling: bool, **kwargs) -> LLM:
    kwargs.setdefault("skip_tokenizer_init", True)
    return LLM(str(path), dtype="float32", async_scheduling=async_scheduling, **kwargs)


def _count_deferred(llm) -> list[int]:
    """Counts the decode inputs that were read from the device (tokens still in flight) at each step."""
    runner = llm.llm_engine.runner
    build = runner._build_step
    counts = []

    def spy(sched, tables):
        step, requests, rows = build(sched, tables)
        counts.append(len(step.deferred_rows))
        return step, requests, rows
    runner._build_step = spy
    return counts


def _run(llm, prompts, params):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outputs]


@pytest.mark.parametrize("engine_kwargs", [
    dict(),
    dict(max_num_batched_tokens=16),  # chunked prefill, mixed steps
    dict(block_size=8, kv_cache_memory=12 * llm_block_bytes(None, 8)),  # preemption by recompute
    dict(block_size=8, kv_cache_memory=12 * llm_block_bytes(None, 8), preemption_mode="swap", swap_space=0.01),
], ids=["batched", "chunked", "recompute", "swap"])
def test_greedy_equals_hf(tiny_llama, engine_kwargs):
    prompts = random_prompts(10, min_len=20, max_len=50, seed=2)
    reference = hf_greedy(tiny_llama, prompts, 30)
    llm = _llm(tiny_llama, True, **engine_kwargs)
    deferred = _count_deferred(llm)
    outputs = _run(llm, prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert [tokens for tokens, _, _ in outputs] == reference
    assert sum(deferred) > 0, "no step read its input tokens from the step in flight"
    assert all_blocks_free(llm)
    if "kv_cache_memory" in engine_kwargs:
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_stops_and_limits_equal_sync(tiny_llama):
    """EOS, stop_token_ids, min_tokens, max_tokens and seeded sampling: a request learns of its stop one step
    late, and the token computed meanwhile is dropped, so outputs equal synchronous stepping exactly."""
    prompts = random_prompts(24, min_len=3, max_len=40, seed=5)
    params = [SamplingParams(temperature=0.0 if i % 3 == 0 else 1.0, seed=i, max_tokens=5 + (i * 7) % 40,
                             min_tokens=i % 5, stop_token_ids=[(i * 13) % 500 + 3, (i * 29) % 500 + 3])
              for i in range(len(prompts))]
    results = {}
    for mode in (False, True):
        llm = _llm(tiny_llama, mode, max_num_seqs=8, max_num_batched_tokens=64)
        results[mode] = _run(llm, prompts, params)
        assert all_blocks_free(llm)
    assert results[True] == results[False]
    reasons = {reason for _, reason, _ in results[True]}
    assert reasons == {"stop", "length"}, reasons


def test_stop_strings_equal_sync(stories_path):
    prompts = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They", "One day"]
    params = SamplingParams(temperature=0, max_tokens=60, stop=[".", " and"])
    results = {}
    for mode in (False, True):
        llm = LLM(stories_path, dtype="float32", async_scheduling=mode)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[mode] = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outputs]
        assert all_blocks_free(llm)
    assert results[True] == results[False]
    assert all(reason == "stop" for _, _, reason in results[True])


def test_penalties_and_parallel_sampling_equal_sync(tiny_llama):
    """Penalties need the previous token on the host before sampling (the engine processes it while the forward
    pass runs); n > 1 forks from the first token (the engine drains and steps synchronously while such a request
    lives, then overlaps again)."""
    prompts = random_prompts(6, min_len=5, max_len=30, seed=6)
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    special = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3),
               SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=20, ignore_eos=True)]
    params = [plain, special[0], plain, special[1], plain, plain]
    results = {}
    for mode in (False, True):
        llm = _llm(tiny_llama, mode, max_num_seqs=4)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[mode] = [[c.token_ids for c in o.outputs] for o in outputs]
        assert all_blocks_free(llm)
    assert results[True] == results[False]


def test_abort_while_in_flight_frees_blocks(tiny_llama):
    llm = _llm(tiny_llama, True)
    engine = llm.llm_engine
    for i, prompt in enumerate(random_prompts(6, min_len=5, max_len=30, seed=7)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None and engine._in_flight.requests
    engine.abort_request(["0", "3"])
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output
    assert sorted(finished) == ["1", "2", "4", "5"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    engine.step()  # whatever was still in flight for the aborted requests is dropped
    assert all_blocks_free(llm)


def test_async_is_off_on_the_cpu_by_default(tiny_llama, monkeypatch):
    monkeypatch.delenv("PAGEDLLM_ASYNC_SCHEDULING", raising=False)
    assert LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True).llm_engine.async_scheduling is False
    monkeypatch.setenv("PAGEDLLM_ASYNC_SCHEDULING", "1")
    assert LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True).llm_engine.async_scheduling is True
    with pytest.raises(ValueError, match="PAGEDLLM_ASYNC_SCHEDULING"):
        monkeypatch.setenv("PAGEDLLM_ASYNC_SCHEDULING", "yes")
        LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True)


def test_engine_suites_pass_with_async_scheduling():
    """The engine's and the server's own test files, again with async scheduling on (PAGEDLLM_ASYNC_SCHEDULING=1):
    every invariance, sharing, sampling, beam-search, structured-output and HTTP test holds for it too."""
    files = ["test_invariance.py", "test_kv_sharing.py", "test_llm_api.py", "test_sampling.py", "test_beam_search.py",
             "test_structured_output_llm.py", "test_structured_engine.py", "test_async_engine.py",
             "test_server_completions.py", "test_server_chat.py", "test_server_structured.py",
             "test_server_metrics.py", "test_server_errors.py"]
    env = dict(os.environ, PAGEDLLM_ASYNC_SCHEDULING="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *(str(TESTS / f) for f in files)], env=env, cwd=TESTS.parent, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]


def test_swap_out_in_a_step_that_computes_nothing(tiny_llama):
    """Finished requests give their blocks back one step late, so a lone running request can be preempted by its
    own next block: the step schedules nothing, and its swap-out must still happen."""
    prompts = random_prompts(10, min_len=20, max_len=50, seed=19)
    reference = hf_greedy(tiny_llama, prompts, 20)
    llm = _llm(tiny_llama, True, block_size=8, kv_cache_memory=12 * llm_block_bytes(None, 8),
               preemption_mode="swap", swap_space=0.01, enable_prefix_caching=False)
    schedule, empty_swaps = llm.llm_engine.scheduler.schedule, []

    def spy():
        out = schedule()
        if out.is_empty and out.blocks_to_swap_out:
            empty_swaps.append(out)
        return out
    llm.llm_engine.scheduler.schedule = spy
    outputs = _run(llm, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [tokens for tokens, _, _ in outputs] == reference
    assert empty_swaps, "no step swapped out without computing anything"
    assert all_blocks_free(llm) and not llm.llm_engine.kv_cache.host_tables
