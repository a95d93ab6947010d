"""Structured output over HTTP with the real `openai` client, on a tiny random-weight Qwen3 (stories260K's 512-token
tokenizer, a chat template): response_format (json_schema, json_object), structured_outputs (json, regex, choice,
grammar, json_object) and guided_* on /v1/completions and /v1/chat/completions; n > 1; constrained and free
requests sent concurrently into the same batch; bad constraints are 400s naming the field used. Random weights make
unconstrained output garbage, so every valid structure below is the grammar's doing."""
from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

from tests.server_fixtures import ServerThread, build_tiny_chat_model
from tests.test_structured_output import ARITHMETIC, parse_arithmetic

pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny"
# bounded (maxLength, enums, ranges, maxItems) so that every path through the grammar ends within max_tokens
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                              "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["sku", "qty"], "additionalProperties": False},
    "status": {"enum": ["new", "paid", "shipped"]},
    "paid": {"type": "boolean"},
    "price": {"type": "number", "minimum": 0, "maximum": 99}},
    "required": ["item", "status", "paid", "price"], "additionalProperties": False}
REGEX = r"\d{3}-[a-z]{2,6}"
CHOICES = ["dragon", "princess", "castle"]
MAX_TOKENS = 450  # more than any of the bounded structures above needs, whitespace included


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_qwen3"))
    # room for MAX_TOKENS: a random model pads JSON with whitespace runs (up to 16 characters between tokens)
    config_path = Path(model) / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "max_position_embeddings": 512}))
    server = ServerThread(model, served_model_name=MODEL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _complete(client, prompt: str = "Once upon a time", n: int = 1, temperature: float = 0.0, seed: int = 0,
              max_tokens: int = MAX_TOKENS, **extra_body):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                     seed=seed, n=n, extra_body=extra_body)


def _chat(client, content: str = "Tell me about the dragon.", n: int = 1, temperature: float = 0.0, seed: int = 0,
          response_format=None, **extra_body):
    kwargs = {} if response_format is None else {"response_format": response_format}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, n=n,
                                          extra_body=extra_body, **kwargs)


def _texts(response) -> list[str]:
    """Every choice's text, after checking that each ended on its own (the structure is complete)."""
    texts = []
    for choice in response.choices:
        text = choice.message.content if hasattr(choice, "message") else choice.text
        assert choice.finish_reason == "stop", (choice.finish_reason, text)
        texts.append(text)
    return texts


def _validate_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(autouse=True)
def _engine_clean_after(server):
    yield
    # every request is over: no KV block is held and no structured-output state is left behind
    assert server.wait_idle()
    structured = server.llm_engine.structured
    assert structured is None or structured.num_requests() == 0


def test_unconstrained_output_is_garbage(client):
    """The premise of every other test: without a constraint this model writes no JSON, no regex, no choice."""
    text = _complete(client, max_tokens=40).choices[0].text
    assert text and not _is_json(text) and not re.fullmatch(REGEX, text) and text not in CHOICES
    assert not parse_arithmetic(text)
    # response_format text is no constraint: the same greedy output
    assert _complete(client, max_tokens=40, response_format={"type": "text"}).choices[0].text == text


# ---- JSON schemas -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["guided_json", "structured_outputs", "response_format"])
@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person", "order"])
def test_completion_json_schema(client, field, schema):
    extra = {"guided_json": {"guided_json": schema},
             "structured_outputs": {"structured_outputs": {"json": schema}},
             "response_format": {"response_format": _json_schema_format(schema)}}[field]
    (text,) = _texts(_complete(client, **extra))
    _validate_json(text, schema)


@pytest.mark.parametrize("field", ["response_format", "guided_json", "structured_outputs"])
@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person", "order"])
def test_chat_json_schema(client, field, schema):
    if field == "response_format":  # the openai client's own parameter
        response = _chat(client, response_format=_json_schema_format(schema))
    elif field == "guided_json":  # a schema given as JSON text is the same constraint
        response = _chat(client, guided_json=json.dumps(schema))
    else:
        response = _chat(client, structured_outputs={"json": schema})
    (text,) = _texts(response)
    _validate_json(text, schema)


def test_json_object_completion_and_chat(client):
    """json_object: the whole output parses as one JSON object (json.loads on all of it). Free-form keys and strings
    in a random walk can outlast any max_tokens, so the prompts and seeds are ones whose object ends."""
    json_object = {"type": "json_object"}
    responses = [_complete(client, prompt="Object 0:", response_format=json_object),
                 _chat(client, content="Object 0", response_format=json_object)]
    for seed in (1, 3):
        responses.append(_complete(client, prompt=f"Object {seed}:", temperature=1.0, seed=seed,
                                   response_format=json_object))
        responses.append(_chat(client, content=f"Object {seed}", temperature=1.0, seed=seed,
                               response_format=json_object))
    responses.append(_complete(client, prompt="Object 3:", temperature=1.0, seed=3,
                               structured_outputs={"json_object": True}))
    objects = []
    for response in responses:
        (text,) = _texts(response)
        objects.append(json.loads(text))
        assert isinstance(objects[-1], dict), text
    assert sum(len(obj) > 0 for obj in objects) >= 3  # not only "{}": keys and values were written and closed
    # structured_outputs.json_object is the same constraint as response_format json_object: the same sampled text
    assert _texts(responses[-1]) == _texts(responses[-3])


# ---- regex, choice, grammar ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["guided_regex", "structured_outputs"])
def test_regex(client, field):
    extra = {"guided_regex": REGEX} if field == "guided_regex" else {"structured_outputs": {"regex": REGEX}}
    texts = _texts(_complete(client, **extra)) + _texts(_chat(client, **extra))
    texts += _texts(_complete(client, temperature=1.0, seed=3, **extra))
    for text in texts:
        assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_choice(client, field):
    extra = {"guided_choice": CHOICES} if field == "guided_choice" else {"structured_outputs": {"choice": CHOICES}}
    texts = _texts(_complete(client, **extra)) + _texts(_chat(client, **extra))
    texts += _texts(_complete(client, temperature=1.0, seed=4, **extra))
    for text in texts:
        assert text in CHOICES, text


@pytest.mark.parametrize("field", ["guided_grammar", "structured_outputs"])
def test_grammar(client, field):
    extra = {"guided_grammar": ARITHMETIC} if field == "guided_grammar" else \
        {"structured_outputs": {"grammar": ARITHMETIC}}
    texts = _texts(_complete(client, **extra)) + _texts(_chat(client, **extra))
    texts += _texts(_complete(client, temperature=1.0, seed=5, **extra))
    for text in texts:
        assert parse_arithmetic(text), text


# ---- n > 1 --------------------------------------------------------------------------------------------------------
def test_n_greater_than_one(client):
    regex = _complete(client, n=4, temperature=1.0, seed=7, guided_regex=REGEX)
    choice = _complete(client, n=4, temperature=1.0, seed=8, structured_outputs={"choice": CHOICES})
    person = _chat(client, n=3, temperature=1.0, seed=9, response_format=_json_schema_format(PERSON))
    assert len(regex.choices) == 4 and len(choice.choices) == 4 and len(person.choices) == 3
    assert sorted(c.index for c in regex.choices) == [0, 1, 2, 3]
    regex_texts = _texts(regex)
    for text in regex_texts:
        assert re.fullmatch(REGEX, text), text
    for text in _texts(choice):
        assert text in CHOICES, text
    person_texts = _texts(person)
    for text in person_texts:
        _validate_json(text, PERSON)
    # each sibling has its own matcher and its own random stream: they really sampled apart
    assert len(set(regex_texts)) > 1 and len(set(person_texts)) > 1


# ---- constrained and free requests in one batch -------------------------------------------------------------------
def test_mixed_batch_concurrent(server, monkeypatch):
    """Constrained (every kind, completions and chat) and free requests sent at once with the async client: the
    engine batches them together, each constrained output is valid, and each free output is exactly what it is
    when the request runs alone (its neighbours' masks do not touch it)."""
    engine = server.llm_engine
    mixed_steps, lock = [], threading.Lock()
    apply_grammar = engine._apply_grammar

    def recording_apply_grammar(logits, requests):
        constrained = sum(r.sampling_params.structured_outputs is not None for r in requests)
        with lock:
            mixed_steps.append((constrained, len(requests) - constrained))
        apply_grammar(logits, requests)

    monkeypatch.setattr(engine, "_apply_grammar", recording_apply_grammar)
    free_prompts = [f"Free story {i}:" for i in range(4)]

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        free = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                          extra_body={"ignore_eos": True}) for prompt in free_prompts]
        constrained = [
            client.completions.create(model=MODEL, prompt="Person:", max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"guided_json": PERSON}),
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Order?"}],
                                           max_tokens=MAX_TOKENS, temperature=1.0, seed=1,
                                           response_format=_json_schema_format(ORDER)),
            client.completions.create(model=MODEL, prompt="Code:", max_tokens=MAX_TOKENS, temperature=1.0, seed=2,
                                      extra_body={"structured_outputs": {"regex": REGEX}}),
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick"}],
                                           max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"guided_choice": CHOICES}),
            client.completions.create(model=MODEL, prompt="Sum:", max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"guided_grammar": ARITHMETIC}),
            client.completions.create(model=MODEL, prompt="Object:", max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"response_format": {"type": "json_object"}}),
        ]
        try:  # all in flight at once
            return await asyncio.gather(*free, *constrained)
        finally:
            await client.close()

    results = asyncio.run(run_all())
    free_out, constrained_out = results[:len(free_prompts)], results[len(free_prompts):]
    person, order, regex, choice, grammar, json_object = [_texts(r)[0] for r in constrained_out]
    _validate_json(person, PERSON)
    _validate_json(order, ORDER)
    assert re.fullmatch(REGEX, regex), regex
    assert choice in CHOICES, choice
    assert parse_arithmetic(grammar), grammar
    assert isinstance(json.loads(json_object), dict), json_object
    # the engine really ran constrained and free rows in the same step
    assert any(constrained and free for constrained, free in mixed_steps), mixed_steps
    monkeypatch.undo()
    # free rows came out untouched: the same tokens as each free request alone
    sync_client = server.client()
    for prompt, response in zip(free_prompts, free_out):
        assert response.choices[0].finish_reason == "length"
        alone = sync_client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert response.choices[0].text == alone.choices[0].text
        assert not _is_json(alone.choices[0].text)


# ---- bad constraints ----------------------------------------------------------------------------------------------
INVALID = [
    ({"guided_regex": "[unclosed"}, "guided_regex"),
    ({"structured_outputs": {"regex": "(a|b"}}, "structured_outputs"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "nope"}}}}},
     "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"guided_grammar": "root ::= nothing-defined"}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "root ::= nothing-defined"}}, "structured_outputs"),
    ({"structured_outputs": {"no_such_key": "x"}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("extra, param", INVALID, ids=[f"{i}-{p}" for i, (_, p) in enumerate(INVALID)])
def test_invalid_constraints_are_400(client, endpoint, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "completions":
            _complete(client, max_tokens=5, **extra)
        else:
            _chat(client, **extra)
    error = caught.value
    assert error.status_code == 400 and error.type == "invalid_request_error" and error.message
    assert error.param == param, error.body
    # the server goes on, constraints included
    assert _texts(_complete(client, max_tokens=20, guided_choice=CHOICES))[0] in CHOICES
