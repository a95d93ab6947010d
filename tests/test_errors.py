"""Bad input gets a clear ValueError naming what is wrong, and harms nobody else."""
import json

import pytest

from pagedllm import LLM, EngineArgs, SamplingParams, StructuredOutputsParams
from tests.conftest import all_blocks_free


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", -2), ("n", 0),
    ("max_tokens", 0), ("min_tokens", -1), ("min_p", 1.5), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("logprobs", -1), ("stop", [""]),
    ("stop_token_ids", [-3]), ("seed", 2**64), ("seed", -2**63 - 1), ("seed", 1.5),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b"):  # the message starts with the field's name
        SamplingParams(**{field: value})


def test_invalid_beam_search_params_name_the_field():
    from pagedllm import BeamSearchParams
    for kwargs, field in (({"beam_width": 0}, "beam_width"), ({"max_tokens": 0}, "max_tokens"),
                          ({"temperature": 0.7}, "temperature"), ({"length_penalty": float("nan")}, "length_penalty")):
        with pytest.raises(ValueError, match=rf"^{field}\b"):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_structured_outputs_needs_exactly_one():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a+", choice=["a"])


@pytest.mark.parametrize("field, value", [
    ("gpu_memory_utilization", 1.5), ("max_num_seqs", 0), ("max_num_seqs", 65536), ("block_size", 12),
    ("dtype", "int3"), ("load_format", "zip"), ("max_model_len", 0), ("kv_cache_memory", -1), ("device", "tpu"),
])
def test_invalid_engine_args_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(model="x", **{field: value})


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_missing_model_directory():
    with pytest.raises(ValueError, match="no such file or directory"):
        LLM("/nonexistent/model", skip_tokenizer_init=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", skip_tokenizer_init=True, max_model_len=64, block_size=8,
               kv_cache_memory=6 * 2 * 2 * 8 * 2 * 16 * 4)  # 6 blocks of 8 tokens = 48 tokens


def test_bad_requests_are_rejected_and_the_engine_still_works(llm):
    good = {"prompt_token_ids": [5, 6, 7]}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    before = llm.generate(good, params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=r"70 tokens.*max_model_len is 64"):
        llm.generate({"prompt_token_ids": [5] * 70}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="can never fit"):
        llm.generate({"prompt_token_ids": [5] * 40}, SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate({"prompt_token_ids": [5, 100000]}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text without a tokenizer", params, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate([good, good], [params], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^n must be at most max_num_seqs \(256\), got 1000000"):
        llm.generate(good, SamplingParams(n=10**6, max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=r"^logprobs must be at most the vocabulary size \(512\)"):
        llm.generate(good, SamplingParams(logprobs=513, max_tokens=2), use_tqdm=False)
    # Extreme but valid values run: top_k beyond the vocabulary keeps every token; seeds use all 64 bits.
    for extreme in (SamplingParams(top_k=10**20, max_tokens=2), SamplingParams(seed=2**64 - 1, n=2, max_tokens=2),
                    SamplingParams(seed=-2**63, max_tokens=2), SamplingParams(logprobs=512, max_tokens=2)):
        assert len(llm.generate(good, extreme, use_tqdm=False)[0].outputs[0].token_ids) == 2
    # A bad prompt in the middle of a batch: nothing of the batch is left behind.
    with pytest.raises(ValueError):
        llm.generate([good, {"prompt_token_ids": [5] * 70}, good], params, use_tqdm=False)
    assert all_blocks_free(llm) and not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(good, params, use_tqdm=False)[0].outputs[0].token_ids == before


def test_duplicate_request_id(llm):
    engine = llm.llm_engine
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    engine.abort_request("dup")
    assert all_blocks_free(llm) and not engine.has_unfinished_requests()


def test_abort_frees_blocks_mid_generation(llm):
    engine = llm.llm_engine
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv_cache.pool.num_free_blocks < engine.kv_cache.num_blocks
    engine.abort_request("a")
    assert all_blocks_free(llm) and not engine.has_unfinished_requests()
