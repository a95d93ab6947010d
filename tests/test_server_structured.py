"""Structured output over HTTP: response_format, structured_outputs and guided_* reach the engine's xgrammar
constraint (stories260K, greedy), and bad or conflicting constraints are 400s."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from tests.server_fixtures import CHAT_TEMPLATE, ServerThread, need_stories

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    server = ServerThread(need_stories(), served_model_name="stories", chat_template=CHAT_TEMPLATE)
    yield server
    server.stop()


def _complete(server, **body) -> httpx.Response:
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, **body}
    return httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)


def test_guided_choice_and_structured_outputs_choice(server):
    for extra in ({"guided_choice": ["dragon", "princess"]},
                  {"structured_outputs": {"choice": ["dragon", "princess"]}}):
        response = _complete(server, **extra)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] in ("dragon", "princess")
        assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_regex(server):
    response = _complete(server, guided_regex="[a-z]{3,6}")
    assert response.status_code == 200, response.text
    assert re.fullmatch("[a-z]{3,6}", response.json()["choices"][0]["text"])


def test_chat_response_format_json_schema(server):
    body = {"model": "stories", "messages": [{"role": "user", "content": "Who is Lily?"}], "max_tokens": 250,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object(server):
    response = _complete(server, response_format={"type": "json_object"}, max_tokens=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # a random walk through JSON may run out of tokens first
        assert isinstance(json.loads(choice["text"]), dict)
    else:
        assert choice["text"].lstrip().startswith("{")


def test_text_format_is_no_constraint(server):
    plain = _complete(server).json()["choices"][0]["text"]
    assert _complete(server, response_format={"type": "text"}).json()["choices"][0]["text"] == plain


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "[unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"structured_outputs": {"grammar": "root ::= nothing-defined"}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_invalid_constraints_are_400(server, extra, param):
    response = _complete(server, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] in (param, "prompt", None) or error["param"].startswith(param)
    assert _complete(server, max_tokens=5).status_code == 200  # and the server goes on
