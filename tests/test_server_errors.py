"""Every error the server gives, with its status and OpenAI's error schema, and a normal answer after each one."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_fixtures import STORIES_GREEDY, ServerThread, need_stories

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    server = ServerThread(need_stories(), served_model_name="stories", api_key=KEY)  # no chat template
    yield server
    server.stop()


def _assert_error(response: httpx.Response, status: int, param: str | None = "any", contains: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param != "any":
        assert error["param"] == param, error
    assert contains in error["message"], error["message"]
    return error


def _still_serving(server: ServerThread) -> None:
    response = httpx.post(server.base_url + "/v1/completions", headers=AUTH, timeout=30, json={
        "model": "stories", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == STORIES_GREEDY


COMPLETION_ERRORS = [
    # (body, param, text in the message)
    ({"prompt": 5}, "prompt", "prompt must be"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
    ({}, "prompt", "Field required"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [[]]}, "prompt[0]", "empty"),
    ({"prompt": [1, 99999]}, "prompt", "out of range"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", "integer"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"prompt": "hi", "max_tokens": 600}, "max_tokens", "512"),
    ({"prompt": "hi " * 600}, "prompt", "512"),
    ({"prompt": ["hi", "hi " * 600]}, "prompt[1]", "prompt[1]"),
    ({"prompt": "hi", "temperature": -1}, "temperature", "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "top_p"),
    ({"prompt": "hi", "top_k": 0}, "top_k", "top_k"),
    ({"prompt": "hi", "n": 0}, "n", "n must"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    ({"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids"),
    ({"prompt": "hi", "stop": [""]}, "stop", "stop"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
    ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo", "echo"),
    ({"prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({"prompt": "hi", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "hi", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "hi", "guided_regex": "a+", "guided_choice": ["a", "b"]}, "guided_choice", "at most one"),
    ({"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "at most one"),
    ({"prompt": "hi", "structured_outputs": {"nonsense": 1}}, "structured_outputs", "unknown keys"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    ({"prompt": "hi", "stream_options": {"include_usage": "lots"}}, "stream_options.include_usage", "boolean"),
    ({"prompt": "hi", "seed": 2**64}, "seed", "2**64"),
    ({"prompt": "hi", "n": 10**30}, "n", "max_num_seqs"),
    ({"prompt": "hi\ud800"}, "prompt", "not valid Unicode"),
    ({"prompt": ["ok", "\udfff"]}, "prompt[1]", "not valid Unicode"),
]

CHAT_ERRORS = [
    ({"messages": "hi"}, "messages", "list"),
    ({"messages": []}, "messages", "at least 1"),
    ({}, "messages", "Field required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "user"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "Field required"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "chat template"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs", "20"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 5},
     "max_completion_tokens", "not both"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens",
     "max_tokens"),
]


@pytest.mark.parametrize("body, param, contains", COMPLETION_ERRORS)
def test_completion_errors_are_400(server, body, param, contains):
    # json.dumps escapes lone surrogates ("\\ud800"), as JSON allows; httpx's json= would refuse them.
    _assert_error(httpx.post(server.base_url + "/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                             content=json.dumps({"model": "stories", **body}), timeout=30), 400, param, contains)
    _still_serving(server)


@pytest.mark.parametrize("body, param, contains", CHAT_ERRORS)
def test_chat_errors_are_400(server, body, param, contains):
    _assert_error(httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH,
                             json={"model": "stories", **body}, timeout=30), 400, param, contains)
    _still_serving(server)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies_are_400(server, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = httpx.post(server.base_url + path, headers={**AUTH, "Content-Type": "application/json"},
                              content=raw, timeout=30)
        _assert_error(response, 400)
    _still_serving(server)


def test_extreme_valid_values_are_served(server):
    """top_k beyond the vocabulary keeps every token (as -1); a seed may use all 64 bits, also with n > 1."""
    for extra in ({"top_k": 10**20}, {"seed": 2**64 - 1, "n": 2}, {"seed": -2**63}):
        body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 4, **extra}
        response = httpx.post(server.base_url + "/v1/completions", headers=AUTH, json=body, timeout=30)
        assert response.status_code == 200, response.text
    _still_serving(server)


def test_image_content_is_refused(server):
    body = {"model": "stories", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}
    # The content-part check comes before the chat template lookup only when a template exists; here the
    # template is missing, so either refusal is a 400 naming the messages.
    error = _assert_error(httpx.post(server.base_url + "/v1/chat/completions", headers=AUTH, json=body), 400)
    assert error["param"].startswith("messages")


def test_api_key(server):
    base = server.base_url
    _assert_error(httpx.get(base + "/v1/models"), 401, None, "API key")
    _assert_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.post(base + "/v1/completions", json={"prompt": "hi"}), 401)
    _assert_error(httpx.post(base + "/v1/chat/completions", json={"messages": []}), 401)
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/version").json()["version"]
    assert httpx.get(base + "/metrics").status_code == 200
    models = httpx.get(base + "/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "stories"
    assert models["data"][0]["max_model_len"] == 512
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert server.client(api_key=KEY).models.list().data[0].id == "stories"


def test_unknown_model_is_404(server):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        error = _assert_error(httpx.post(server.base_url + path, headers=AUTH, json={"model": "gpt-9", **body}),
                              404, "model", "gpt-9")
        assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client(api_key=KEY).completions.create(model="gpt-9", prompt="hi")
    _still_serving(server)


def test_openai_client_sees_bad_request(server):
    client = server.client(api_key=KEY)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="stories", prompt="hi " * 600, max_tokens=5)
    assert "512" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="stories", prompt="hi", temperature=-2, stream=True)
    _still_serving(server)


def test_unknown_routes_and_methods(server):
    _assert_error(httpx.get(server.base_url + "/v1/nothing-here", headers=AUTH), 404)
    _assert_error(httpx.get(server.base_url + "/v1/completions", headers=AUTH), 405)


def test_a_dead_engine_answers_503():
    server = ServerThread(need_stories(), served_model_name="stories")
    try:
        real_step = server.llm_engine.step
        calls = {"n": 0}

        def failing_step():
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("injected GPU failure")
            return real_step()

        server.llm_engine.step = failing_step  # fault injection into the real engine
        body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
        with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and "injected GPU failure" in lines[-2] and '"error"' in lines[-2]
        _assert_error(httpx.post(server.base_url + "/v1/completions", json=body), 503, None, "dead")
        _assert_error(httpx.post(server.base_url + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}]}), 503)
        _assert_error(httpx.get(server.base_url + "/health"), 503)
        assert httpx.get(server.base_url + "/v1/models").status_code == 200  # the HTTP server itself lives on
    finally:
        server.stop()
