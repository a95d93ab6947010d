"""Greedy outputs equal Hugging Face transformers token for token (fp32, CPU)."""
import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import TINY_CONFIGS, all_blocks_free, hf_greedy, random_prompts


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_greedy_matches_hf(tiny_models, kind):
    path = tiny_models[kind]
    prompts = random_prompts(6, min_len=1, max_len=60, seed=list(TINY_CONFIGS).index(kind))
    expected = hf_greedy(path, prompts, max_new_tokens=24)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all_blocks_free(llm)


STORIES_REFERENCE = {
    "Once upon a time": ", there was a little girl named Lily. She loved to play outside in the park. "
                        "One day, she saw a big, red ball.",
    "Lily and Tom went to the park": ". They saw a big box with a big box. They wanted to play with it. They "
                                     "wanted to play with the box. They wanted to play with",
}


def test_stories260k_reference_continuations(stories_path):
    llm = LLM(stories_path, dtype="float32")
    prompts = list(STORIES_REFERENCE)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert outputs[0].prompt_token_ids == [1, 403, 407, 261, 378]
    assert outputs[1].prompt_token_ids == [1, 317, 269, 274, 287, 263, 377, 267, 265, 282, 295, 433]
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].text == STORIES_REFERENCE[prompt]
        assert output.outputs[0].finish_reason == "length"
        assert len(output.outputs[0].token_ids) == 40
    hf = hf_greedy(stories_path, [o.prompt_token_ids for o in outputs], 40)
    assert [o.outputs[0].token_ids for o in outputs] == hf
