"""How the engine treats structured-output requests around the grammar: min_tokens, compile failures."""
import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from tests.conftest import STORIES, all_blocks_free


@pytest.fixture(scope="module")
def llm(tiny_llama):
    if not STORIES.exists():
        pytest.skip("the tiny model's tokenizer comes from ../shared")
    return LLM(str(tiny_llama), dtype="float32")


def test_min_tokens_does_not_fight_the_grammar(llm):
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=5,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    out = llm.generate("Is it", params, use_tqdm=False)[0].outputs[0]
    assert out.text.strip() in ("yes", "no") and out.finish_reason == "stop"
    assert all_blocks_free(llm)


def test_a_grammar_that_fails_to_compile_ends_only_its_request(llm, monkeypatch):
    engine = llm.llm_engine
    engine._structured()

    def broken(request_id):
        raise ValueError("grammar compilation failed: planted")
    monkeypatch.setattr(engine.structured, "is_ready", broken)
    good = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    bad = SamplingParams(temperature=0, max_tokens=5, structured_outputs=StructuredOutputsParams(regex="a+"))
    outputs = llm.generate(["Once upon a time", "Once upon a time"], [good, bad], use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 5
    assert outputs[1].outputs[0].finish_reason == "abort"
    assert "planted" in outputs[1].outputs[0].stop_reason
    assert all_blocks_free(llm)
