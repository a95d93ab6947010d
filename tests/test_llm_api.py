"""The offline API's shape is vLLM's: LLM(...)'s arguments and defaults, generate/chat, RequestOutput's fields,
the prompt forms, and the startup line that states the KV cache."""
import inspect
import logging
import re

from pagedllm import LLM, SamplingParams
from tests.conftest import all_blocks_free
from tests.test_hf_equivalence import STORIES_REFERENCE


def test_llm_arguments_and_defaults():
    expected = dict(tokenizer=None, dtype="auto", max_model_len=None, gpu_memory_utilization=0.9,
                    kv_cache_memory=None, max_num_seqs=256, max_num_batched_tokens=None, block_size=16, seed=0,
                    enforce_eager=False, load_format="auto", skip_tokenizer_init=False, device="auto")
    params = inspect.signature(LLM.__init__).parameters
    assert list(params)[1] == "model"
    assert {name: params[name].default for name in expected} == expected
    generate = inspect.signature(LLM.generate).parameters
    assert list(generate)[1:4] == ["prompts", "sampling_params", "use_tqdm"]
    assert generate["sampling_params"].default is None and generate["use_tqdm"].default is True
    chat = inspect.signature(LLM.chat).parameters
    assert list(chat)[1:3] == ["messages", "sampling_params"] and "chat_template_kwargs" in chat


def test_request_output_fields_and_prompt_forms(stories_path, caplog):
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        llm = LLM(stories_path, dtype="float32", kv_cache_memory=1 << 20)
    ready = [r.getMessage() for r in caplog.records if "pagedllm ready" in r.getMessage()]
    assert len(ready) == 1
    blocks = llm.llm_engine.kv_cache.num_blocks
    match = re.search(r"(\d+) KV blocks of 16 tokens \((\d+) tokens, [\d.]+ GiB\), max concurrency ([\d.]+)x at "
                      r"max_model_len (\d+)", ready[0])
    assert match and int(match[1]) == blocks and int(match[2]) == 16 * blocks
    assert float(match[3]) == round(16 * blocks / int(match[4]), 1)

    text = "Once upon a time"
    ids = llm.get_tokenizer()(text).input_ids
    params = SamplingParams(temperature=0, max_tokens=40)
    outputs = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}, ids], params, use_tqdm=False)
    assert len({o.request_id for o in outputs}) == 4 and all(isinstance(o.request_id, str) for o in outputs)
    for output in outputs:
        assert output.finished and output.prompt_token_ids == ids
        (completion,) = output.outputs
        assert completion.index == 0 and completion.text == STORIES_REFERENCE[text]
        assert completion.finish_reason == "length" and completion.stop_reason is None
        assert completion.cumulative_logprob is None and completion.logprobs is None
        m = output.metrics
        assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert [o.prompt for o in outputs] == [text, text, None, None]
    assert all_blocks_free(llm)
