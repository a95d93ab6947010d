"""StructuredOutputManager driven by a hand-written decode loop over random logits: every constrained output must
parse (JSON schema via `jsonschema`, JSON object, regex full-match, choice, EBNF via an independent parser), with
constrained and free rows sharing one bitmask, and bad constraints rejected with ValueError."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from pagedllm.sampling.structured import StructuredOutputManager
from pagedllm.sampling_params import StructuredOutputsParams as SOP

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
QWEN3 = SHARED / "tokenizers" / "qwen3"
STORIES = SHARED / "models" / "stories260K"
QWEN3_VOCAB = 151936  # Qwen3's logits width: 267 more ids than the tokenizer has


def _tokenizer(path: Path):
    if not path.exists():
        pytest.skip(f"{path} is not here")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen3():
    tokenizer = _tokenizer(QWEN3)
    return tokenizer, StructuredOutputManager(tokenizer, QWEN3_VOCAB)


@pytest.fixture(scope="module")
def stories():
    tokenizer = _tokenizer(STORIES)
    return tokenizer, StructuredOutputManager(tokenizer, 512)


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Independent reading of an int32 bitmask: bool [rows, vocab], True = allowed."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def allowed_ids(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The token ids one bitmask row allows (unpacking only its non-zero words)."""
    words = (bitmask_row != 0).nonzero().flatten()
    bits = (bitmask_row[words].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    ids = (words.unsqueeze(-1) * 32 + torch.arange(32))[bits.bool()]
    return ids[ids < vocab_size]


def wait_ready(manager: StructuredOutputManager, request_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not manager.is_ready(request_id):
        assert time.monotonic() < deadline, f"{request_id} never compiled"
        time.sleep(0.002)


_counter = iter(range(10**9))


def decode(manager: StructuredOutputManager, tokenizer, constraints: list[SOP | None], *, seed: int,
           sample: bool, max_steps: int = 400, check_free_rows: bool = True) -> list[tuple[str, bool]]:
    """Run one batch (None = a free row) over random logits until every constrained row terminates or max_steps.
    Returns (text, terminated) per constrained row. Free rows must come out of apply_bitmask unchanged."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[str | None] = []
    for params in constraints:
        request_id = None if params is None else f"req-{next(_counter)}"
        if params is not None:
            manager.validate(params)
            manager.add_request(request_id, params)
        ids.append(request_id)
    for request_id in ids:
        if request_id is not None:
            wait_ready(manager, request_id)
    outputs = {request_id: [] for request_id in ids if request_id is not None}
    done = {request_id: False for request_id in outputs}
    vocab = manager.vocab_size
    special_ids = [i for i in tokenizer.all_special_ids if i not in manager.stop_token_ids]
    for step in range(max_steps):
        row_ids = [None if request_id is None or done[request_id] else request_id for request_id in ids]
        logits = torch.randn(len(ids), vocab, generator=generator)
        check = step % 8 == 0  # the full-vocabulary checks are slow on a 152k vocabulary: every 8th step
        free_rows = [row for row, request_id in enumerate(row_ids) if request_id is None]
        original = logits[free_rows].clone() if check and check_free_rows else None
        bitmask = manager.fill_bitmask(row_ids)
        if bitmask is None:
            break
        assert bitmask.dtype == torch.int32 and bitmask.shape == (len(ids), (vocab + 31) // 32)
        manager.apply_bitmask(logits, bitmask)
        if original is not None:
            assert torch.equal(logits[free_rows], original)
        tokens = []
        for row, request_id in enumerate(row_ids):
            if request_id is None:
                tokens.append(None)
                continue
            if check:
                allowed = unpack(bitmask[row:row + 1], vocab)[0]
                assert torch.equal(logits[row] != float("-inf"), allowed)
                # never the ids past the tokenizer, nor its special tokens but the stop ones
                assert not allowed[len(tokenizer):].any() and not allowed[special_ids].any()
            if sample:  # Gumbel-max over the allowed ids: a draw from the softmax of the masked logits
                candidates = allowed_ids(bitmask[row], vocab)
                noise = -torch.log(-torch.log(torch.rand(len(candidates), generator=generator).clamp_min(1e-20)))
                token = int(candidates[torch.argmax(logits[row, candidates] + noise)])
            else:
                token = int(logits[row].argmax())
            assert (int(bitmask[row, token // 32]) >> (token % 32)) & 1  # the pick is one the mask allows
            tokens.append(token)
        for request_id, token in zip(row_ids, tokens):
            if request_id is None:
                continue
            assert manager.accept_token(request_id, token)
            if manager.is_terminated(request_id):
                assert token in manager.stop_token_ids
                done[request_id] = True
            else:
                outputs[request_id].append(token)
    results = []
    for request_id, tokens in outputs.items():
        results.append((tokenizer.decode(tokens), done[request_id]))
        manager.remove_request(request_id)
    return results


# ---- JSON schema ------------------------------------------------------------------------------------------------
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"},
                                                  "role": {"enum": ["admin", "user", "guest"]}},
                 "required": ["id", "role"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 4},
                                      "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
     "required": ["tags", "scores"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                      "currency": {"type": "string", "enum": ["USD", "EUR"]},
                                      "note": {"type": ["string", "null"], "pattern": "^[a-z ]{0,12}$"}},
     "required": ["price", "currency"]},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                 "y": {"type": "integer"}},
                                "required": ["x", "y"]}, "minItems": 1, "maxItems": 3},
]


@pytest.mark.parametrize("sample", [False, True], ids=["argmax", "sampled"])
def test_json_schemas_validate(qwen3, sample):
    jsonschema = pytest.importorskip("jsonschema")
    tokenizer, manager = qwen3
    # all five schemas in one batch, the JSON text of one of them instead of its dict, plus two free rows
    constraints = [SOP(json=schema) for schema in SCHEMAS] + [None, SOP(json=json.dumps(SCHEMAS[0])), None]
    results = decode(manager, tokenizer, constraints, seed=1 + sample, sample=sample)
    for schema, (text, terminated) in zip(SCHEMAS + [SCHEMAS[0]], results):
        assert terminated, f"did not finish: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_json_fields_follow_schema_order(qwen3):
    tokenizer, manager = qwen3
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"enum": [1, 2]},
                                               "mid": {"type": "boolean"}}, "required": ["zeta", "alpha", "mid"]}
    for text, terminated in decode(manager, tokenizer, [SOP(json=schema)] * 2, seed=4, sample=True):
        assert terminated
        assert [key for key, _ in json.loads(text, object_pairs_hook=list)] == ["zeta", "alpha", "mid"]
    # a valid document in the schema's order, fed token by token, is accepted to the end
    manager.add_request("ordered", SOP(json=schema))
    wait_ready(manager, "ordered")
    for token in tokenizer.encode(json.dumps({"zeta": 7, "alpha": 2, "mid": True})) + manager.stop_token_ids[:1]:
        assert manager.accept_token("ordered", token)
    assert manager.is_terminated("ordered")
    manager.remove_request("ordered")


def test_json_schema_plain_strings(stories):
    jsonschema = pytest.importorskip("jsonschema")
    tokenizer, manager = stories
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "pages": {"type": "integer"},
                                               "authors": {"type": "array", "items": {"type": "string"}}},
              "required": ["title", "pages", "authors"]}
    results = decode(manager, tokenizer, [SOP(json=schema)] * 4, seed=3, sample=True, max_steps=3000)
    finished = [text for text, terminated in results if terminated]
    assert len(finished) >= 3, results
    for text in finished:
        jsonschema.validate(json.loads(text), schema)


def test_json_object(stories):
    tokenizer, manager = stories
    results = decode(manager, tokenizer, [SOP(json_object=True)] * 4 + [None], seed=0, sample=False,
                     max_steps=2000)
    results += decode(manager, tokenizer, [SOP(json_object=True)] * 4, seed=1, sample=True, max_steps=2000)
    finished = [text for text, terminated in results if terminated]
    assert len(finished) >= 6, results  # a random walk through nested JSON can outlast any cap
    for text in finished:
        assert isinstance(json.loads(text), dict)


# ---- regex, choice, grammar -------------------------------------------------------------------------------------
REGEXES = [r"\d{3}-[a-z]{2,6}", r"(cat|dog)s?", r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}\.",
           r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"(0|[1-9][0-9]{0,3})\.[0-9]{2}"]


@pytest.mark.parametrize("sample", [False, True], ids=["argmax", "sampled"])
def test_regex_full_match(qwen3, sample):
    tokenizer, manager = qwen3
    results = decode(manager, tokenizer, [None] + [SOP(regex=regex) for regex in REGEXES], seed=5, sample=sample)
    for regex, (text, terminated) in zip(REGEXES, results):
        assert terminated and re.fullmatch(regex, text), (regex, text)


CHOICES = ["yes", "no", "maybe so", 'a "quoted" one', "back\\slash", "ünïcödé ✓"]


@pytest.mark.parametrize("sample", [False, True], ids=["argmax", "sampled"])
def test_choice(qwen3, sample):
    tokenizer, manager = qwen3
    results = decode(manager, tokenizer, [SOP(choice=CHOICES)] * 6 + [None], seed=7, sample=sample)
    for text, terminated in results:
        assert terminated and text in CHOICES, text


# bounded nesting and repetition, so that a random walk through it always ends
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" inner ")"
inner ::= num (("+" | "-" | "*") num){0,3}
num ::= [0-9]{1,3}
"""


def parse_arithmetic(text: str) -> bool:
    """A recursive-descent recogniser of ARITHMETIC, written independently of xgrammar."""
    position = 0

    def peek(characters: str) -> bool:
        return position < len(text) and text[position] in characters

    def num() -> bool:
        nonlocal position
        start = position
        while peek("0123456789"):
            position += 1
        return 1 <= position - start <= 3

    def chain(item, operators: str, most: int) -> bool:
        nonlocal position
        if not item():
            return False
        for _ in range(most):
            if not peek(operators):
                break
            position += 1
            if not item():
                return False
        return not peek(operators)

    def factor() -> bool:
        nonlocal position
        if not peek("("):
            return num()
        position += 1
        if not chain(num, "+-*", 3) or not peek(")"):
            return False
        position += 1
        return True

    def term() -> bool:
        return chain(factor, "*/", 2)

    return chain(term, "+-", 3) and position == len(text)


def test_arithmetic_recogniser_rejects():
    assert parse_arithmetic("(1+22*3)*333-4/5+(6)")
    for bad in ["", "1+", "(1", "1234", "1)", "a", "1++2", "()", "((1))", "1+2+3+4+5", "1*2*3*4", "(1+2+3+4+5)"]:
        assert not parse_arithmetic(bad), bad


@pytest.mark.parametrize("sample", [False, True], ids=["argmax", "sampled"])
def test_ebnf_grammar(qwen3, sample):
    tokenizer, manager = qwen3
    results = decode(manager, tokenizer, [SOP(grammar=ARITHMETIC)] * 4 + [None], seed=11, sample=sample,
                     max_steps=600)
    for text, terminated in results:
        assert terminated and parse_arithmetic(text), text


def test_mixed_kinds_in_one_batch(qwen3):
    jsonschema = pytest.importorskip("jsonschema")
    tokenizer, manager = qwen3
    constraints = [None, SOP(json=SCHEMAS[1]), None, SOP(regex=REGEXES[0]), SOP(choice=CHOICES), None]
    (json_text, ok1), (regex_text, ok2), (choice_text, ok3) = decode(manager, tokenizer, constraints, seed=13,
                                                                     sample=True)
    assert ok1 and ok2 and ok3
    jsonschema.validate(json.loads(json_text), SCHEMAS[1])
    assert re.fullmatch(REGEXES[0], regex_text) and choice_text in CHOICES


# ---- masks, EOS, bookkeeping ------------------------------------------------------------------------------------
def test_eos_only_when_grammar_can_end(qwen3):
    tokenizer, manager = qwen3
    manager.add_request("eos", SOP(choice=["yes", "no"]))
    wait_ready(manager, "eos")
    stop = manager.stop_token_ids
    allowed = unpack(manager.fill_bitmask(["eos"]), manager.vocab_size)[0]
    assert not allowed[stop].any()
    assert manager.accept_token("eos", tokenizer.encode("yes")[0]) and tokenizer.decode(tokenizer.encode("yes")) == "yes"
    allowed = unpack(manager.fill_bitmask(["eos"]), manager.vocab_size)[0]
    assert allowed.nonzero().flatten().tolist() == sorted(stop)  # "yes" is complete: only a stop token
    assert not manager.is_terminated("eos")
    assert not manager.accept_token("eos", tokenizer.encode("x")[0])  # refused, matcher unchanged
    assert manager.accept_token("eos", stop[0]) and manager.is_terminated("eos")
    manager.remove_request("eos")
    manager.remove_request("eos")  # idempotent


def test_length_bounded_json_string_excludes_control_characters(stories):
    # a raw tab or \x01 inside a JSON string is invalid JSON (json.loads rejects it); xgrammar 0.2.8 allowed them in
    # strings with maxLength, and the manager patches its grammar
    tokenizer, manager = stories
    manager.add_request("ctl", SOP(json={"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}},
                                         "required": ["s"]}))
    wait_ready(manager, "ctl")
    for token in tokenizer.convert_tokens_to_ids(["<0x7B>", '"', "s", '"', ":", '"']):
        assert manager.accept_token("ctl", token)
    allowed = unpack(manager.fill_bitmask(["ctl"]), manager.vocab_size)[0]
    tab, ctrl_a, letter = tokenizer.convert_tokens_to_ids(["<0x09>", "<0x01>", "a"])
    assert allowed[letter] and not allowed[tab] and not allowed[ctrl_a]
    manager.remove_request("ctl")


def test_fill_bitmask_none_and_errors(qwen3):
    _, manager = qwen3
    assert manager.fill_bitmask([None, None]) is None
    assert manager.fill_bitmask([]) is None
    with pytest.raises(ValueError, match="unknown request"):
        manager.fill_bitmask(["never-added"])
    with pytest.raises(ValueError, match="unknown request"):
        manager.is_ready("never-added")
    manager.add_request("dup", SOP(regex="a"))
    with pytest.raises(ValueError, match="already registered"):
        manager.add_request("dup", SOP(regex="a"))
    manager.remove_request("dup")


def test_large_batch_grows_buffer(stories):
    tokenizer, manager = stories
    ids = [f"grow-{i}" for i in range(40)]
    for request_id in ids:
        manager.add_request(request_id, SOP(regex="[ab]c"))
    for request_id in ids:
        wait_ready(manager, request_id)
    for request_id in ids[::3]:  # move a third of them on, so that the rows differ
        assert manager.accept_token(request_id, tokenizer.convert_tokens_to_ids("a"))
    batch = ids[:20] + [None] * 10 + ids[20:]
    # the rows of a large batch are filled by xgrammar's threads: each must equal the row filled alone
    bitmask = manager.fill_bitmask(batch).clone()
    assert bitmask.shape == (50, 16)
    for row, request_id in enumerate(batch):
        if request_id is None:
            assert bool((bitmask[row] == -1).all())
        else:
            assert torch.equal(bitmask[row], manager.fill_bitmask([request_id])[0])
    for request_id in ids:
        manager.remove_request(request_id)


def test_apply_bitmask_matches_reference(stories):
    _, manager = stories
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 16), generator=generator, dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(3, 512, generator=generator).to(dtype)
        expected = logits.masked_fill(~unpack(bitmask, 512), float("-inf"))
        manager.apply_bitmask(logits, bitmask)
        assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="must be"):
        manager.apply_bitmask(torch.zeros(2, 512), bitmask)
    with pytest.raises(ValueError, match="vocab_size"):
        manager.apply_bitmask(torch.zeros(3, 500), bitmask)


def test_repeat_constraint_is_cached(qwen3):
    _, manager = qwen3
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    manager.add_request("c1", SOP(json=schema))
    wait_ready(manager, "c1")
    # the same schema, written differently, is the same constraint: ready at once, no second compile
    manager.add_request("c2", SOP(json=json.dumps(schema, indent=2)))
    assert manager.is_ready("c2")
    manager.remove_request("c1")
    manager.remove_request("c2")


# ---- invalid constraints ------------------------------------------------------------------------------------------
INVALID = [
    (SOP(json="{not json"), "not valid JSON"),
    (SOP(json="[1, 2]"), "JSON schema object"),
    (SOP(json={"type": "foo"}), "Unsupported type"),
    (SOP(json={"type": "object", "properties": {"a": {"$ref": "#/defs/missing"}}}), "JSON schema"),
    (SOP(json={"type": "string", "pattern": "(unclosed"}), "JSON schema"),
    (SOP(regex="(unclosed"), "parenthesis"),
    (SOP(regex="a{2,1}"), "regex"),
    (SOP(regex="[z-a]"), "regex"),
    (SOP(grammar='root ::= undefined_rule'), "not defined"),
    (SOP(grammar='other ::= "a"'), "root"),
    (SOP(grammar='root ::= "a" |'), "EBNF"),
]


@pytest.mark.parametrize("params,message", INVALID, ids=[f"{i}" for i in range(len(INVALID))])
def test_invalid_constraints_raise(stories, params, message):
    _, manager = stories
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        manager.validate(params)
    assert "/project/cpp" not in str(error.value)  # xgrammar's source locations are stripped


def test_background_compile_failure_is_per_request(stories):
    tokenizer, manager = stories
    # add_request does not validate (the engine calls validate first); a failure then surfaces in is_ready
    good_ids = tokenizer.encode("ok", add_special_tokens=False)  # SentencePiece: "▁o" "k", the bytes " ok"
    manager.add_request("bad", SOP(regex="(unclosed"))
    manager.add_request("good", SOP(regex=" ?ok"))
    deadline = time.monotonic() + 30
    with pytest.raises(ValueError, match="request 'bad'.*parenthesis"):
        while not manager.is_ready("bad"):
            assert time.monotonic() < deadline
            time.sleep(0.002)
    wait_ready(manager, "good")
    for token in good_ids:
        assert manager.accept_token("good", token)
    assert manager.accept_token("good", manager.stop_token_ids[0]) and manager.is_terminated("good")
    manager.add_request("bad-again", SOP(regex="(unclosed"))  # the failure is not cached as a success
    with pytest.raises(ValueError, match="parenthesis"):
        wait_ready(manager, "bad-again")
    for request_id in ("bad", "good", "bad-again"):
        manager.remove_request(request_id)


def test_constructor_rejects_small_vocab():
    tokenizer = _tokenizer(STORIES)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        StructuredOutputManager(tokenizer, 100)
