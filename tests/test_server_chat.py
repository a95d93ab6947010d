"""POST /v1/chat/completions over real HTTP with the openai client: a tiny random Qwen3 whose tokenizer has a
chat template, and stories260K with a template given to the server."""
from __future__ import annotations

import pytest

from tests.server_fixtures import CHAT_TEMPLATE, ServerThread, build_tiny_chat_model, need_stories

MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    path = build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat") / "qwen3")
    server = ServerThread(path, served_model_name="tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stories_server():
    server = ServerThread(need_stories(), served_model_name="stories", chat_template=CHAT_TEMPLATE)
    yield server
    server.stop()


def _chat(client, model: str, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=model, **kwargs)


def test_chat_stream_equals_non_stream(tiny_server):
    client = tiny_server.client()
    response = _chat(client, "tiny")
    assert response.object == "chat.completion" and response.model == "tiny"
    message = response.choices[0].message
    assert message.role == "assistant" and message.content
    assert response.usage.completion_tokens == 24 and response.choices[0].finish_reason == "length"
    chunks = list(_chat(client, "tiny", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    with_text = [c for c in chunks if c.choices]
    assert with_text[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == response.usage.model_dump()
    assert tiny_server.wait_idle()


def test_chat_prompt_is_the_templated_prompt(stories_server):
    """The chat answer equals a completion of the template's own tokens (no second BOS added)."""
    client = stories_server.client()
    messages = [{"role": "user", "content": "Once upon a time"}]
    chat = _chat(client, "stories", messages=messages, max_tokens=30)
    tokenizer = stories_server.engine.tokenizer
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    completion = client.completions.create(model="stories", prompt=ids, max_tokens=30, temperature=0.0)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == len(ids)


def test_n_choices_max_completion_tokens_and_stop(tiny_server):
    client = tiny_server.client()
    response = _chat(client, "tiny", n=3, max_tokens=None, max_completion_tokens=7)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) == 1  # greedy: the same three times
    assert response.usage.completion_tokens == 21
    first = response.choices[0].message.content
    stop = first[len(first) // 2:len(first) // 2 + 2]
    if stop.strip():
        stopped = _chat(client, "tiny", max_tokens=7, stop=[stop])
        assert stopped.choices[0].finish_reason == "stop"
        assert stop not in stopped.choices[0].message.content


def test_streamed_n_choices(tiny_server):
    client = tiny_server.client()
    reference = _chat(client, "tiny", max_tokens=10).choices[0].message.content
    texts = {0: "", 1: ""}
    roles = set()
    for chunk in _chat(client, "tiny", n=2, max_tokens=10, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add(choice.index)
    assert texts == {0: reference, 1: reference} and roles == {0, 1}


def test_chat_logprobs(tiny_server):
    response = _chat(tiny_server.client(), "tiny", logprobs=True, top_logprobs=3, max_tokens=6)
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5  # greedy: the top token was taken
        assert entry.bytes == list(entry.token.encode())
    streamed = list(_chat(tiny_server.client(), "tiny", logprobs=True, top_logprobs=2, max_tokens=6, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_message_forms(tiny_server):
    client = tiny_server.client()
    plain = _chat(client, "tiny", messages=[{"role": "user", "content": "Hi there"}], max_tokens=5)
    parts = _chat(client, "tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
                  max_tokens=5)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    developer = _chat(client, "tiny", max_tokens=5, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "tool", "content": "42", "tool_call_id": "t1"},
        {"role": "user", "content": "Again"}])
    assert developer.usage.completion_tokens == 5


def test_random_sampling_on_a_random_model_and_broken_unicode(tiny_server):
    """A random model's sampled bytes form invalid UTF-8: that is text with U+FFFD, never a dead engine; a message
    with a lone surrogate is a 400 naming the messages; the server serves on."""
    import json

    import httpx
    client = tiny_server.client()
    for seed in range(3):
        response = _chat(client, "tiny", temperature=1.0, seed=seed, max_tokens=60, extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == 60 and response.choices[0].message.content
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi \ud800"}]})
    error = httpx.post(tiny_server.base_url + "/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/json"}, timeout=30)
    assert error.status_code == 400 and error.json()["error"]["param"] == "messages"
    assert "not valid Unicode" in error.json()["error"]["message"]
    assert _chat(client, "tiny").choices[0].finish_reason == "length"


STORY = [{"role": "user", "content": "Once upon a time"}]


def test_seeded_chat_sampling_is_reproducible(stories_server):
    client = stories_server.client()
    texts = [_chat(client, "stories", messages=STORY, temperature=1.0, seed=seed, max_tokens=30).choices[0]
             .message.content for seed in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) == 3  # other seeds, other texts
    greedy = _chat(client, "stories", messages=STORY, max_tokens=30).choices[0].message.content
    assert greedy not in texts


def test_chat_top_k_1_min_p_1_and_user_give_the_greedy_text(stories_server):
    client = stories_server.client()
    greedy = _chat(client, "stories", messages=STORY, max_tokens=40).choices[0].message.content
    sampled = _chat(client, "stories", messages=STORY, max_tokens=40, temperature=1.0, seed=3)
    assert sampled.choices[0].message.content != greedy
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        response = _chat(client, "stories", messages=STORY, max_tokens=40, temperature=1.0, seed=3, extra_body=extra)
        assert response.choices[0].message.content == greedy, extra
    assert _chat(client, "stories", messages=STORY, max_tokens=40, user="user-1234").choices[0].message.content \
        == greedy


def test_chat_stop_token_ids_and_penalties(stories_server):
    client = stories_server.client()
    tokenizer = stories_server.engine.tokenizer
    reference = _chat(client, "stories", messages=STORY, max_tokens=40, logprobs=True)
    greedy = reference.choices[0].message.content
    tokens = [entry.token for entry in reference.choices[0].logprobs.content]
    was_id = tokenizer.convert_tokens_to_ids("\u2581was")  # "The owl was very happy"
    assert was_id != tokenizer.unk_token_id and tokenizer.decode([was_id]) in tokens
    stopped = _chat(client, "stories", messages=STORY, max_tokens=40, extra_body={"stop_token_ids": [was_id]})
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == was_id
    assert choice.message.content == greedy[:greedy.index(" was")]  # its text left out, as vLLM does
    assert stopped.usage.completion_tokens == tokens.index(tokenizer.decode([was_id])) + 1
    streamed = _chat(client, "stories", messages=STORY, max_tokens=40, stream=True,
                     extra_body={"stop_token_ids": [was_id], "include_stop_str_in_output": True})
    with_text = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_text) == greedy[:greedy.index(" was") + 4]
    assert with_text[-1].choices[0].finish_reason == "stop"
    for penalty in ({"extra_body": {"repetition_penalty": 1.5}}, {"presence_penalty": 1.5},
                    {"frequency_penalty": 1.5}):
        penalised = [_chat(client, "stories", messages=STORY, max_tokens=40, **penalty).choices[0].message.content
                     for _ in range(2)]
        assert penalised[0] == penalised[1] != greedy, penalty


def test_chat_skip_special_tokens_false_shows_the_special_token(stories_server):
    """stories260K begins its next story with <s>: hidden by default, shown with skip_special_tokens=False."""
    client = stories_server.client()
    by_bos = _chat(client, "stories", messages=STORY, max_tokens=200, extra_body={"stop_token_ids": [1]})
    choice = by_bos.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == 1
    past = by_bos.usage.completion_tokens + 4
    assert past < 200
    hidden = _chat(client, "stories", messages=STORY, max_tokens=past).choices[0].message.content
    shown = _chat(client, "stories", messages=STORY, max_tokens=past,
                  extra_body={"skip_special_tokens": False}).choices[0].message.content
    assert "<s>" not in hidden and shown.count("<s>") == 1
    assert shown.startswith(choice.message.content + "<s>") and shown.replace("<s>", "") == hidden
