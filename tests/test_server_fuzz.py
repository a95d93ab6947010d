"""Odd values in every request field, in random combinations: each answer is a 200 or an OpenAI-style 4xx (never a
500), the engine keeps serving, and every KV block comes back."""
import json
import random

import httpx
import pytest

from tests.server_fixtures import CHAT_TEMPLATE, ServerThread, need_stories

ODD = [None, -1, 0, 1, 2**31, 2**63, 2**64, -2**64, 10**40, 1e308, -1e308, 0.5, -0.5, "", "x", "\ud800", "1e5", [],
       [1], [-1], ["a"], [[1, 2]], [[]], [2**40], {}, {"a": 1}, True, False]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo", "stream",
          "presence_penalty", "frequency_penalty", "user", "top_k", "min_p", "repetition_penalty", "min_tokens",
          "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "stream_options",
          "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "best_of", "suffix", "logit_bias", "use_beam_search", "length_penalty", "spaces_between_special_tokens"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt", "continue_final_message",
               "chat_template_kwargs", "tools", "tool_choice"]


@pytest.fixture(scope="module")
def server():
    server = ServerThread(need_stories(), served_model_name="stories", chat_template=CHAT_TEMPLATE)
    yield server
    server.stop()


def test_odd_values_never_give_a_500_or_harm_the_engine(server):
    # An error that quotes the client's text must encode even a lone surrogate.
    for path, extra in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": []})):
        response = httpx.post(server.base_url + path, content=json.dumps({"model": "\ud800", **extra}),
                              headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code in (400, 404) and response.json()["error"]["message"]
    rng = random.Random(0)
    statuses = {}
    for i in range(300):
        chat = rng.random() < 0.4
        body = {"model": "stories", "max_tokens": 3}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "Once upon"})
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS[1:] + CHAT_FIELDS if chat else FIELDS)] = rng.choice(ODD)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        response = httpx.post(server.base_url + path, content=json.dumps(body),
                              headers={"Content-Type": "application/json"}, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 404), (body, response.text)
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["message"] and error["type"]
        if i % 50 == 0:
            ok = httpx.post(server.base_url + "/v1/completions", timeout=60,
                            json={"model": "stories", "prompt": "Once", "max_tokens": 2})
            assert ok.status_code == 200
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100  # both kinds of answer were exercised
    assert server.wait_idle(30)
