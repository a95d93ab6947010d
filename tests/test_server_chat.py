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
