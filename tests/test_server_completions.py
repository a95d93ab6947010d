"""POST /v1/completions over real HTTP with the real openai client, on stories260K (known greedy output)."""
from __future__ import annotations

import asyncio

import pytest

from tests.server_fixtures import STORIES_GREEDY, ServerThread, need_stories

PROMPT_IDS = [1, 403, 407, 261, 378]  # "Once upon a time" with BOS
LILY_GREEDY = (". They saw a big box with a big box. They wanted to play with it. They wanted to play with the box. "
               "They wanted to play with")


@pytest.fixture(scope="module")
def server():
    server = ServerThread(need_stories(), served_model_name="stories")
    yield server
    server.stop()


def _complete(client, **kwargs):
    kwargs.setdefault("model", "stories")
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 40)
    return client.completions.create(**kwargs)


def test_greedy_completion_matches_the_reference(server):
    response = _complete(server.client(), prompt="Once upon a time")
    assert response.object == "text_completion" and response.model == "stories"
    assert response.choices[0].text == STORIES_GREEDY
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (5, 40, 45)
    assert server.wait_idle()


def test_streamed_text_concatenates_to_the_greedy_text(server):
    stream = _complete(server.client(), prompt="Once upon a time", stream=True,
                       stream_options={"include_usage": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 5  # it really streamed
    assert "".join(c.choices[0].text for c in text_chunks) == STORIES_GREEDY
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 40
    assert usage_chunk.usage.prompt_tokens == 5


def test_token_id_prompts_and_lists_of_prompts(server):
    client = server.client()
    assert _complete(client, prompt=PROMPT_IDS).choices[0].text == STORIES_GREEDY
    response = _complete(client, prompt=["Once upon a time", "Lily and Tom went to the park"], n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [STORIES_GREEDY, STORIES_GREEDY, LILY_GREEDY, LILY_GREEDY]
    assert response.usage.prompt_tokens == 5 + 12 and response.usage.completion_tokens == 4 * 40
    response = _complete(client, prompt=[PROMPT_IDS, PROMPT_IDS[:3]], max_tokens=5)
    assert response.choices[0].text == STORIES_GREEDY[:len(response.choices[0].text)]
    assert len(response.choices) == 2 and response.usage.prompt_tokens == 8


def test_streaming_several_prompts_and_choices(server):
    stream = _complete(server.client(), prompt=["Once upon a time", "Lily and Tom went to the park"], n=2,
                       stream=True)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {0: STORIES_GREEDY, 1: STORIES_GREEDY, 2: LILY_GREEDY, 3: LILY_GREEDY}
    assert finish == {i: "length" for i in range(4)}


def test_echo_stop_and_stop_reason(server):
    client = server.client()
    echoed = _complete(client, prompt="Once upon a time", echo=True)
    assert echoed.choices[0].text == "Once upon a time" + STORIES_GREEDY
    stopped = _complete(client, prompt="Once upon a time", stop=["Lily"])
    assert stopped.choices[0].text == ", there was a little girl named "
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == "Lily"
    streamed = _complete(client, prompt="Once upon a time", stop="Lily", stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ", there was a little girl named "


def test_logprobs(server):
    response = _complete(server.client(), prompt="Once upon a time", logprobs=3, max_tokens=10)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 10
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 3 for top in logprobs.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(top.values()) - lp) < 1e-5 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_seeded_sampling_is_reproducible(server):
    client = server.client()
    a = _complete(client, prompt="Once upon a time", temperature=1.0, seed=7, max_tokens=30)
    b = _complete(client, prompt="Once upon a time", temperature=1.0, seed=7, max_tokens=30)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens >= 1
    # The seed is what made them equal: other seeds sample other texts (and none of them is the greedy one).
    others = {_complete(client, prompt="Once upon a time", temperature=1.0, seed=seed, max_tokens=30).choices[0].text
              for seed in (8, 9)}
    assert a.choices[0].text not in others and len(others) == 2
    assert not STORIES_GREEDY.startswith(a.choices[0].text)


def test_extra_sampling_fields_pass_through(server):
    response = _complete(server.client(), prompt="Once upon a time", max_tokens=8,
                         extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 8,
                                     "ignore_eos": True, "stop_token_ids": [2], "skip_special_tokens": True,
                                     "some_unknown_field": 1})
    assert response.usage.completion_tokens == 8


def test_top_k_1_and_min_p_1_sample_the_greedy_text(server):
    """At temperature 1, top_k=1 and min_p=1.0 each leave only the most likely token: the greedy text. Without
    them (the seed fixed), temperature 1 gives another text, so the fields did the work."""
    client = server.client()
    sampled = _complete(client, prompt="Once upon a time", temperature=1.0, seed=3).choices[0].text
    assert sampled != STORIES_GREEDY
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_k": 1, "top_p": 0.5}):
        response = _complete(client, prompt="Once upon a time", temperature=1.0, seed=3, extra_body=extra)
        assert response.choices[0].text == STORIES_GREEDY, extra


def test_stop_token_ids_end_at_that_token(server):
    """A stop token is the last token generated (it is counted in usage); its text is left out of the output
    unless include_stop_str_in_output, as vLLM does; stop_reason is the token id."""
    tokenizer = server.engine.tokenizer
    lily = tokenizer.convert_tokens_to_ids("\u2581Lily")
    assert lily != tokenizer.unk_token_id
    client = server.client()
    before = STORIES_GREEDY[:STORIES_GREEDY.index(" Lily")]  # ", there was a little girl named"
    greedy_tokens = _complete(client, prompt="Once upon a time", logprobs=0).choices[0].logprobs.tokens
    num_tokens = greedy_tokens.index(tokenizer.decode([lily])) + 1
    stopped = _complete(client, prompt="Once upon a time", extra_body={"stop_token_ids": [lily]})
    choice = stopped.choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (before, "stop", lily)
    assert stopped.usage.completion_tokens == num_tokens
    kept = _complete(client, prompt="Once upon a time", extra_body={"stop_token_ids": [lily],
                                                                    "include_stop_str_in_output": True})
    assert kept.choices[0].text == before + " Lily" and kept.usage.completion_tokens == num_tokens
    streamed = _complete(client, prompt="Once upon a time", stream=True, extra_body={"stop_token_ids": [lily]})
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"
    with_logprobs = _complete(client, prompt="Once upon a time", logprobs=1, extra_body={"stop_token_ids": [lily]})
    assert with_logprobs.choices[0].logprobs.tokens[-1] == tokenizer.decode([lily])  # generated last, and kept


def test_penalties_change_the_greedy_output(server):
    """Greedy with a penalty is still deterministic, but no longer the unpenalised greedy text; each penalty
    leaves the text alone until a token would repeat."""
    client = server.client()
    common = ", there was a little girl named Lily. She loved to play outside in the park"
    assert STORIES_GREEDY.startswith(common)
    for penalty in ({"extra_body": {"repetition_penalty": 1.5}}, {"presence_penalty": 1.5},
                    {"frequency_penalty": 1.5}):
        penalised = [_complete(client, prompt="Once upon a time", **penalty).choices[0].text for _ in range(2)]
        assert penalised[0] == penalised[1], penalty
        assert penalised[0] != STORIES_GREEDY and penalised[0].startswith(common), penalty
    # A penalty below the neutral value rewards repeating: the story loops on fewer distinct words.
    looping = _complete(client, prompt="Once upon a time", frequency_penalty=-2.0, max_tokens=60).choices[0].text
    normal = _complete(client, prompt="Once upon a time", max_tokens=60).choices[0].text
    assert len(set(looping.split())) < len(set(normal.split()))


def test_skip_special_tokens_false_shows_the_special_token(server):
    """stories260K starts a new story with <s> (its BOS, not an EOS): hidden by default, shown with
    skip_special_tokens=False. stop_token_ids on it stop there, with its text only if include_stop_str_in_output."""
    client = server.client()
    by_bos = _complete(client, prompt="The dog", max_tokens=200, extra_body={"stop_token_ids": [1]})
    choice = by_bos.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == 1
    num_tokens = by_bos.usage.completion_tokens
    assert 10 < num_tokens < 200
    past = num_tokens + 4
    hidden = _complete(client, prompt="The dog", max_tokens=past).choices[0].text
    shown = _complete(client, prompt="The dog", max_tokens=past,
                      extra_body={"skip_special_tokens": False}).choices[0].text
    assert "<s>" not in hidden and shown.count("<s>") == 1
    assert shown.startswith(choice.text + "<s>") and shown.replace("<s>", "") == hidden
    stopped_shown = _complete(client, prompt="The dog", max_tokens=200,
                              extra_body={"stop_token_ids": [1], "skip_special_tokens": False}).choices[0].text
    assert stopped_shown == choice.text  # the stop token's text is left out, special or not
    included = _complete(client, prompt="The dog", max_tokens=200,
                         extra_body={"stop_token_ids": [1], "skip_special_tokens": False,
                                     "include_stop_str_in_output": True}).choices[0].text
    assert included == choice.text + "<s>"


def test_user_field_is_accepted(server):
    response = _complete(server.client(), prompt="Once upon a time", user="user-1234")
    assert response.choices[0].text == STORIES_GREEDY


def test_64_concurrent_requests_match_one_at_a_time(server):
    import openai
    prompts = ["Once upon a time", "Lily and Tom went to the park", "The dog", "One day, a bird"]
    alone = [_complete(server.client(), prompt=p).choices[0].text for p in prompts]

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(i: int) -> str:
            prompt = prompts[i % len(prompts)]
            if i % 2:
                stream = await client.completions.create(model="stories", prompt=prompt, max_tokens=40,
                                                         temperature=0.0, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])
            response = await client.completions.create(model="stories", prompt=prompt, max_tokens=40,
                                                       temperature=0.0)
            return response.choices[0].text

        try:
            return await asyncio.gather(*[one(i) for i in range(64)])
        finally:
            await client.close()

    together = asyncio.run(run_all())
    assert together == [alone[i % len(prompts)] for i in range(64)]
    assert server.wait_idle()
