"""Structured output end to end: LLM(...).generate with StructuredOutputsParams on a tiny random-weight Qwen3 that
uses the real Qwen3 tokenizer (model vocab 151,936 > tokenizer 151,669), greedy and sampled, n > 1, stop strings,
max_tokens, and free requests in the same batch. Random weights make unconstrained output garbage, so every valid
structure below is the grammar's doing."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams as SOP
from tests.conftest import QWEN3_TOKENIZER, all_blocks_free
from tests.test_structured_output import ARITHMETIC, parse_arithmetic

jsonschema = pytest.importorskip("jsonschema")

VOCAB = 151936
EOS = 151645  # <|im_end|>, the tokenizer's EOS

# bounded (maxLength, enums, ranges, maxItems) so that every path through the grammar ends
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"]}
ORDER = {"type": "object", "properties": {
    "item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                              "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["sku", "qty"]},
    "paid": {"type": "boolean"}, "price": {"type": "number", "minimum": 0, "maximum": 99}},
    "required": ["item", "paid", "price"]}
REGEX = r"\d{3}-[a-z]{2,6}"
CHOICES = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    if not QWEN3_TOKENIZER.exists():
        pytest.skip("../shared/tokenizers/qwen3 is not here")
    import transformers
    path = tmp_path_factory.mktemp("tiny_qwen3_structured")
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=151643, eos_token_id=EOS,
        tie_word_embeddings=True, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(QWEN3_TOKENIZER).save_pretrained(path)
    return LLM(str(path), dtype="float32", max_model_len=512, seed=0)


def _check(kind: str, text: str) -> None:
    if kind == "person":
        jsonschema.validate(json.loads(text), PERSON)
    elif kind == "order":
        jsonschema.validate(json.loads(text), ORDER)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "grammar":
        assert parse_arithmetic(text), text
    else:
        raise AssertionError(kind)


CONSTRAINTS = {"person": SOP(json=PERSON), "order": SOP(json=json.dumps(ORDER)), "regex": SOP(regex=REGEX),
               "choice": SOP(choice=CHOICES), "grammar": SOP(grammar=ARITHMETIC)}
FREE = SamplingParams(temperature=0.0, max_tokens=12)


def test_mixed_batch_greedy_sampled_and_free(llm):
    """One generate call: every constraint kind greedy and sampled, free requests between them."""
    prompts, params, kinds = [], [], []
    for i, (kind, constraint) in enumerate(CONSTRAINTS.items()):
        for temperature in (0.0, 1.0):
            prompts.append(f"Request {i}: give me {kind} output, please.")
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=200,
                                         structured_outputs=constraint))
            kinds.append(kind)
        prompts.append(f"free text {i}")
        params.append(FREE)
        kinds.append(None)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for kind, output in zip(kinds, outputs):
        completion = output.outputs[0]
        if kind is None:
            continue
        assert completion.finish_reason == "stop", (kind, completion.text)
        assert completion.token_ids[-1] == EOS  # the grammar ended with the stop token
        _check(kind, completion.text)
    # free requests are untouched by the masks of their neighbours: the same tokens as when run alone
    free_prompts = [p for p, k in zip(prompts, kinds) if k is None]
    free_batched = [o.outputs[0].token_ids for o, k in zip(outputs, kinds) if k is None]
    alone = [o.outputs[0].token_ids for o in llm.generate(free_prompts, FREE, use_tqdm=False)]
    assert free_batched == alone
    assert not all(_decodes_as_json(llm, ids) for ids in alone)  # unconstrained output is not JSON
    assert all_blocks_free(llm) and llm.llm_engine.structured.num_requests() == 0


def _decodes_as_json(llm, ids: list[int]) -> bool:
    try:
        json.loads(llm.get_tokenizer().decode(ids))
        return True
    except ValueError:
        return False


def test_n_greater_than_one(llm):
    outputs = llm.generate(["Pick one:", "Code:"], [
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=50, structured_outputs=CONSTRAINTS["choice"]),
        SamplingParams(n=3, temperature=1.0, seed=8, max_tokens=50, structured_outputs=CONSTRAINTS["regex"])],
        use_tqdm=False)
    for kind, output in zip(("choice", "regex"), outputs):
        assert len(output.outputs) == 3
        for completion in output.outputs:
            assert completion.finish_reason == "stop"
            _check(kind, completion.text)
    assert len({c.text for c in outputs[1].outputs}) > 1  # the siblings really sampled apart
    assert all_blocks_free(llm) and llm.llm_engine.structured.num_requests() == 0


def test_max_tokens_and_stop_strings(llm):
    short, stopped, whole = llm.generate(["a", "b", "c"], [
        SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=CONSTRAINTS["person"]),
        SamplingParams(temperature=0.0, max_tokens=200, stop=[","], structured_outputs=CONSTRAINTS["person"]),
        SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=CONSTRAINTS["person"])],
        use_tqdm=False)
    # max_tokens cuts the structure short: "length", an unfinished object
    assert short.outputs[0].finish_reason == "length" and len(short.outputs[0].token_ids) == 4
    assert short.outputs[0].text.startswith("{") and not _parses(short.outputs[0].text)
    # a stop string inside the structure ends it there (the required fields need a comma)
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == ","
    assert "," not in stopped.outputs[0].text and stopped.outputs[0].text.startswith("{")
    # the same prompt without the stop string runs to the end of the structure
    assert whole.outputs[0].finish_reason == "stop"
    _check("person", whole.outputs[0].text)
    assert all_blocks_free(llm) and llm.llm_engine.structured.num_requests() == 0


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def small_llm(tiny_llama):
    """A tiny Llama with the 512-token stories260K tokenizer: grammars compile in milliseconds."""
    if not (tiny_llama / "tokenizer.json").exists():
        pytest.skip("../shared/models/stories260K (the tokenizer) is not here")
    return LLM(str(tiny_llama), dtype="float32", max_model_len=256, seed=0)


def test_json_object(small_llm):
    """json_object on a tiny Llama with the 512-token stories260K tokenizer: free-form strings end soon enough in a
    small vocabulary (in Qwen3's 151k, a random walk inside a string rarely finds its closing quote)."""
    llm = small_llm
    outputs = []
    for temperature in (0.0, 1.0):
        outputs += llm.generate([f"Once upon a time {i}" for i in range(4)],
                                SamplingParams(temperature=temperature, seed=1, max_tokens=200,
                                               structured_outputs=SOP(json_object=True)), use_tqdm=False)
    finished = 0
    for output in outputs:
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict), completion.text
            finished += 1
        else:  # an object of free-form strings may outlast max_tokens: then it is cut there, never ended early
            assert completion.finish_reason == "length" and len(completion.token_ids) == 200
    assert finished >= 4
    assert all_blocks_free(llm) and llm.llm_engine.structured.num_requests() == 0


@pytest.mark.parametrize("constraint", [SOP(json={"type": "nonsense"}), SOP(regex="(unclosed"),
                                        SOP(grammar="root ::= missing")], ids=["schema", "regex", "grammar"])
def test_invalid_constraint_rejected_and_engine_unharmed(llm, constraint):
    with pytest.raises(ValueError, match="invalid structured_outputs"):
        llm.generate(["ok", "bad"], [FREE, SamplingParams(max_tokens=8, structured_outputs=constraint)],
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert all_blocks_free(llm) and llm.llm_engine.structured.num_requests() == 0
    (output,) = llm.generate(["still works"], SamplingParams(temperature=0.0, max_tokens=20,
                                                             structured_outputs=CONSTRAINTS["choice"]),
                             use_tqdm=False)
    _check("choice", output.outputs[0].text)


def _wrap_compile(monkeypatch, before=None) -> list[str]:
    """Count xgrammar's real compilations (the call StructuredOutputManager makes), optionally running before(grammar
    text) first; returns the list of compiled grammars' texts, appended as they finish."""
    xgr = pytest.importorskip("xgrammar")
    original = xgr.GrammarCompiler.compile_grammar
    compiled = []

    def compile_grammar(self, grammar, *args, **kwargs):
        text = str(grammar)
        if before is not None:
            before(text)
        result = original(self, grammar, *args, **kwargs)
        compiled.append(text)
        return result

    monkeypatch.setattr(xgr.GrammarCompiler, "compile_grammar", compile_grammar)
    return compiled


COUNTED = {"type": "object", "properties": {"counted": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "flag": {"type": "boolean"}}, "required": ["counted", "flag"]}
COUNTED_REGEX = r"[a-c]{2}-\d{1,2}"


def test_same_constraint_compiled_once(small_llm, monkeypatch):
    """One distinct constraint, one compilation: shared by the requests of a batch (as a dict or as its JSON
    text, greedy, sampled, n > 1) and cached for the next generate call."""
    compiled = _wrap_compile(monkeypatch)

    def run(seed: int):
        params = [SamplingParams(temperature=0.0, max_tokens=150, structured_outputs=SOP(json=COUNTED)),
                  SamplingParams(temperature=1.0, seed=seed, max_tokens=150,
                                 structured_outputs=SOP(json=json.dumps(COUNTED, indent=2))),
                  SamplingParams(n=2, temperature=1.0, seed=seed + 1, max_tokens=150,
                                 structured_outputs=SOP(json=dict(COUNTED))),
                  SamplingParams(temperature=1.0, seed=seed + 2, max_tokens=30,
                                 structured_outputs=SOP(regex=COUNTED_REGEX)),
                  SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=SOP(regex=COUNTED_REGEX)),
                  SamplingParams(temperature=0.0, max_tokens=10)]
        outputs = small_llm.generate([f"Count {i}:" for i in range(len(params))], params, use_tqdm=False)
        for output in outputs[:3]:
            for completion in output.outputs:
                assert completion.finish_reason == "stop", completion.text
                jsonschema.validate(json.loads(completion.text), COUNTED)
        assert len(outputs[2].outputs) == 2
        for output in outputs[3:5]:
            assert output.outputs[0].finish_reason == "stop"
            assert re.fullmatch(COUNTED_REGEX, output.outputs[0].text), output.outputs[0].text
        assert all_blocks_free(small_llm) and small_llm.llm_engine.structured.num_requests() == 0

    run(seed=1)
    assert len(compiled) == 2, f"{len(compiled)} compilations"  # the schema once and the regex once, for 6 sequences
    assert sum("counted" in text for text in compiled) == 1
    run(seed=11)
    assert len(compiled) == 2, f"{len(compiled)} compilations"  # the second call finds both compiled


SLOW = {"type": "object", "properties": {"slow_marker": {"enum": ["x", "y"]},
                                         "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["slow_marker", "n"]}


def test_slow_compile_does_not_stall_other_requests(small_llm, monkeypatch):
    """A constraint that takes 2 s to compile holds back only its own request: a free request added at the same
    moment runs all its engine steps and finishes while that compilation is still going, and the constrained
    request joins the batch (and completes validly) once its grammar is ready."""
    compile_started, compile_finished = threading.Event(), threading.Event()

    def before(text: str) -> None:
        if "slow_marker" in text:
            compile_started.set()
            time.sleep(2.0)

    compiled = _wrap_compile(monkeypatch, before)
    engine = small_llm.llm_engine
    engine.add_request("slow", "Slow:", SamplingParams(temperature=0.0, max_tokens=150,
                                                       structured_outputs=SOP(json=SLOW)))
    engine.add_request("free", "Free:", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    finished, steps, deadline = {}, 0, time.monotonic() + 60
    free_seen_at = None
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish"
        outputs = engine.step()
        steps += 1
        if any("slow_marker" in text for text in compiled):
            compile_finished.set()
        for output in outputs:
            if output.finished:
                finished[output.request_id] = output
                if output.request_id == "free":
                    stats = engine.get_stats()
                    free_seen_at = (compile_finished.is_set(), stats.num_running + stats.num_waiting)
        if not outputs:
            engine.wait_for_work()
    assert compile_started.is_set() and free_seen_at is not None
    compiling_then, scheduled_then = free_seen_at
    # the free request finished (16 tokens, 16+ engine steps) while the slow grammar was still compiling, and the
    # constrained request had not been admitted to the scheduler yet
    assert not compiling_then and scheduled_then == 0
    assert len(finished["free"].outputs[0].token_ids) == 16
    slow = finished["slow"].outputs[0]
    assert slow.finish_reason == "stop", slow.text
    jsonschema.validate(json.loads(slow.text), SLOW)
    assert sum("slow_marker" in text for text in compiled) == 1
    assert all_blocks_free(small_llm) and engine.structured.num_requests() == 0


def test_async_scheduling_gives_the_same_outputs(llm):
    """With async scheduling, a grammar's bitmask is filled after the previous token is accepted, while the device
    runs the step's forward pass: constrained, penalised and free requests come out exactly as when stepping
    synchronously."""
    async_llm = LLM(llm.llm_engine.args.model, dtype="float32", max_model_len=512, seed=0, async_scheduling=True)
    prompts, params = [], []
    for i, constraint in enumerate(CONSTRAINTS.values()):
        prompts += [f"Request {i}, constrained.", f"Request {i}, free.", f"Request {i}, penalised."]
        params += [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=constraint),
                   SamplingParams(temperature=0.0, max_tokens=10 + i),
                   SamplingParams(temperature=1.0, seed=i, max_tokens=12, presence_penalty=1.0)]
    results = [[o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
               for engine in (llm, async_llm)]
    assert results[0] == results[1]
    assert all_blocks_free(async_llm) and async_llm.llm_engine.structured.num_requests() == 0
