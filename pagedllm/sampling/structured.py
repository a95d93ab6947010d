"""Structured output with xgrammar: compile a request's constraint (JSON schema, JSON object, regex, choice, EBNF
grammar) in the background, then per decode step build the token bitmask of every constrained row and mask logits.

The engine drives one StructuredOutputManager:

    validate(params)            in add_request, before anything is queued: a bad constraint -> ValueError
    add_request(id, params)     starts compilation on a background thread (one compile per distinct constraint)
    is_ready(id)                False while compiling; raises ValueError if that request's compilation failed
    fill_bitmask(ids)           one row per sampled sequence (None = free row) -> int32 [rows, ceil(vocab / 32)]
    apply_bitmask(logits, mask) disallowed tokens -> -inf, in place, on the logits' device
    accept_token(id, token)     advance the request's matcher by the sampled token
    is_terminated(id)           the structure is complete and a stop token was accepted
    remove_request(id)

Errors: validate() parses the constraint (it does not compile it) and rejects a malformed one up front. add_request()
itself does no validation (it must stay cheap); a constraint that fails later, in the background compilation,
surfaces as a ValueError from is_ready() for that request only, and the other requests are untouched.

Stop tokens: a structure may end only with a stop token (the tokenizer's EOS, or stop_token_ids given to the
constructor), which the grammar allows only where the structure is complete; accepting it terminates the matcher.
Every other special token of the tokenizer is never allowed in a constrained row, nor are ids past the tokenizer's
vocabulary (the model's logits may be wider).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import xgrammar as xgr

from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[12:34:56] /project/cpp/file.cc:83: " and sometimes "Check failed: (...) is false: "
_XGR_ERROR_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


_BATCH_FILL_MIN_ROWS = 8  # below this, handing rows to xgrammar's thread pool costs more than it saves


@dataclass
class _RequestState:
    key: tuple[str, str]
    future: Future
    matcher: xgr.GrammarMatcher | None = None


def _clean_error(error: BaseException) -> str:
    text = str(error).strip()
    return _XGR_ERROR_PREFIX.sub("", text).strip() or type(error).__name__


def _constraint_key(params: StructuredOutputsParams) -> tuple[str, str]:
    """A hashable, canonical form of the constraint: equal constraints compile once."""
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object (a dict or its JSON text), "
                             f"got {type(schema).__name__}")
        try:
            # not sort_keys: the order of "properties" is the order the output's fields must follow
            return ("json", json.dumps(schema, ensure_ascii=False))
        except (TypeError, ValueError) as error:
            raise ValueError(f"structured_outputs.json is not JSON-serialisable: {error}") from None
    if params.json_object:
        return ("json_object", "")
    if params.regex is not None:
        if not isinstance(params.regex, str) or not params.regex:
            raise ValueError("structured_outputs.regex must be a non-empty string")
        return ("regex", params.regex)
    if params.choice is not None:
        return ("choice", json.dumps(list(params.choice), ensure_ascii=False))
    if params.grammar is not None:
        if not isinstance(params.grammar, str) or not params.grammar.strip():
            raise ValueError("structured_outputs.grammar must be a non-empty EBNF string")
        return ("grammar", params.grammar)
    raise ValueError("structured_outputs has no constraint")


def _tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int] | None) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, with every special token of the tokenizer (<s>, <unk>, <|endoftext|>,
    <|im_start|>, ...) disallowed: xgrammar would otherwise let their literal text appear inside a JSON string, and a
    special token there is dropped by detokenization or, worse, taken by the engine as EOS mid-structure."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    special = set(tokenizer.all_special_ids)
    special |= {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    missing = special - set(info.special_token_ids) - set(info.stop_token_ids)
    if not missing:
        return info
    vocab = list(info.decoded_vocab)  # each token's bytes: the RAW vocab type matches them as they are
    for token_id in missing:
        if token_id < vocab_size:
            vocab[token_id] = b""  # xgrammar treats an empty token as special: never allowed
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                             stop_token_ids=list(info.stop_token_ids), add_prefix_space=info.add_prefix_space)


# xgrammar (0.2.8) writes the characters of a string with minLength/maxLength as [^"\\\r\n], which lets raw control
# characters (a tab, \x01, ...) into the JSON string: invalid JSON. Its own free-string rule excludes \0-\x1f.
_LOOSE_STRING_CHAR = r' ::= (([^\"\\\r\n]))'
_STRICT_STRING_CHAR = r' ::= (([^\0-\x1f\"\\\r\n]))'


def _json_string_fix(grammar: xgr.Grammar) -> xgr.Grammar:
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR))


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string escapes (\" \\ \n \uXXXX) are valid in xgrammar's EBNF literals; keep non-ASCII raw
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class StructuredOutputManager:
    """Compiles constraints, keeps one xgrammar matcher per request, and builds/applies token bitmasks."""

    def __init__(self, tokenizer, vocab_size: int, *, stop_token_ids: list[int] | None = None,
                 max_compile_threads: int | None = None, max_cached_grammars: int = 64,
                 json_max_whitespace: int | None = 16, fill_threads: int | None = None) -> None:
        """tokenizer: a transformers tokenizer; vocab_size: the model's logits width (>= the tokenizer's ids: the
        extra ids are never allowed in a constrained row); stop_token_ids: the ids that may end a structure
        (default: the tokenizer's EOS); json_max_whitespace: the longest whitespace run allowed between JSON tokens
        (None = unbounded; bounded by default so that a weak model cannot loop on whitespace forever);
        fill_threads: threads that fill the bitmask rows of a large batch (None: half the cores; 1: no threads)."""
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary "
                             f"({len(tokenizer)} tokens)")
        if stop_token_ids is None and tokenizer.eos_token_id is None:
            raise ValueError("structured output needs stop_token_ids: the tokenizer has no EOS token")
        self.vocab_size = vocab_size
        self.tokenizer_info = _tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.stop_token_ids = list(self.tokenizer_info.stop_token_ids)
        threads = max_compile_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        # our own cache below (keyed by the canonical constraint, sharing in-flight compiles) replaces xgrammar's
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)
        self._json_max_whitespace = json_max_whitespace
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-grammar")
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._max_cached = max_cached_grammars
        self._lock = threading.Lock()
        self._requests: dict[str, _RequestState] = {}
        self._batch_matcher = None if fill_threads == 1 else xgr.BatchGrammarMatcher(fill_threads or "auto")
        self._bitmask = self._allocate_bitmask(8)
        self._copy_done: torch.cuda.Event | None = None  # the last host->device copy that reads self._bitmask

    # ---- constraint -> xgrammar Grammar -------------------------------------------------------------------------
    def _grammar(self, key: tuple[str, str]) -> xgr.Grammar:
        kind, text = key
        try:
            if kind in ("json", "json_object"):
                schema = text if kind == "json" else '{"type": "object"}'
                return _json_string_fix(xgr.Grammar.from_json_schema(
                    schema, any_whitespace=True, max_whitespace_cnt=self._json_max_whitespace))
            if kind == "regex":
                return xgr.Grammar.from_regex(text)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(text)))
            return xgr.Grammar.from_ebnf(text)
        except (RuntimeError, ValueError, TypeError) as error:
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                    "choice": "choice list", "grammar": "EBNF grammar"}[kind]
            raise ValueError(f"invalid structured_outputs {what}: {_clean_error(error)}") from None

    def _compile(self, key: tuple[str, str]) -> xgr.CompiledGrammar:
        grammar = self._grammar(key)
        try:
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"structured_outputs: cannot compile the {key[0]} constraint: "
                             f"{_clean_error(error)}") from None

    def _compiled_future(self, key: tuple[str, str]) -> Future:
        with self._lock:
            future = self._compiled.get(key)
            if future is not None:
                self._compiled.move_to_end(key)
                return future
            future = self._executor.submit(self._compile, key)
            self._compiled[key] = future
            while len(self._compiled) > self._max_cached:  # live requests keep their own reference
                self._compiled.popitem(last=False)
            return future

    # ---- the engine's interface -----------------------------------------------------------------------------------
    def validate(self, params: StructuredOutputsParams) -> None:
        """Raise ValueError with a clear message if the constraint is malformed (parses it; does not compile)."""
        if not isinstance(params, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {type(params).__name__}")
        self._grammar(_constraint_key(params))

    def add_request(self, request_id: str, params: StructuredOutputsParams) -> None:
        """Register a request and start compiling its constraint in the background (cached per constraint)."""
        if request_id in self._requests:
            raise ValueError(f"structured output: request {request_id!r} is already registered")
        key = _constraint_key(params)
        self._requests[request_id] = _RequestState(key=key, future=self._compiled_future(key))

    def is_ready(self, request_id: str) -> bool:
        """True once the request's grammar is compiled; raises ValueError if its compilation failed."""
        state = self._state(request_id)
        if state.matcher is not None:
            return True
        if not state.future.done():
            return False
        error = state.future.exception()
        if error is not None:
            with self._lock:  # do not keep a failure cached: the next identical request retries
                if self._compiled.get(state.key) is state.future:
                    del self._compiled[state.key]
            raise ValueError(f"request {request_id!r}: {error}") if isinstance(error, ValueError) else error
        state.matcher = xgr.GrammarMatcher(state.future.result())
        return True

    def fill_bitmask(self, request_ids: list[str | None]) -> torch.Tensor | None:
        """The int32 [len(request_ids), ceil(vocab / 32)] CPU bitmask of the next token (bit set = allowed), or None
        when no row is constrained. None rows allow every token. The tensor is a view of a buffer reused by the next
        call. A request still compiling is waited for (the scheduler should not have scheduled it)."""
        rows = [i for i, request_id in enumerate(request_ids) if request_id is not None]
        if not rows:
            return None
        matchers = [self._matcher(request_ids[i]) for i in rows]
        if self._copy_done is not None:  # the previous step's bitmask may still be on its way to the GPU
            self._copy_done.synchronize()
            self._copy_done = None
        if len(request_ids) > self._bitmask.shape[0]:
            self._bitmask = self._allocate_bitmask(max(len(request_ids), 2 * self._bitmask.shape[0]))
        bitmask = self._bitmask[:len(request_ids)]
        if len(rows) < len(request_ids):
            bitmask.fill_(-1)
        live_rows, live_matchers = [], []
        for row, matcher in zip(rows, matchers):
            if matcher.is_terminated():  # finished structure: only a stop token may follow
                self._fill_stop_only(bitmask[row])
            else:
                live_rows.append(row)
                live_matchers.append(matcher)
        if self._batch_matcher is not None and len(live_rows) >= _BATCH_FILL_MIN_ROWS:
            self._batch_matcher.batch_fill_next_token_bitmask(live_matchers, bitmask, live_rows)
        else:
            for row, matcher in zip(live_rows, live_matchers):
                matcher.fill_next_token_bitmask(bitmask, row)
        return bitmask

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set logits of disallowed tokens to -inf, in place, on the logits' device (CPU or CUDA)."""
        if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
            raise ValueError(f"apply_bitmask: logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} "
                             "must be [rows, vocab] and [rows, ceil(vocab / 32)]")
        if logits.shape[1] != self.vocab_size or bitmask.shape[1] != (self.vocab_size + 31) // 32:
            raise ValueError(f"apply_bitmask: logits width {logits.shape[1]} / bitmask width {bitmask.shape[1]} "
                             f"do not match vocab_size {self.vocab_size}")
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=bitmask.is_pinned())
            if logits.device.type == "cuda":
                self._copy_done = torch.cuda.Event()
                self._copy_done.record()
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)

    def accept_token(self, request_id: str, token_id: int) -> bool:
        """Advance the request's matcher; False (and the matcher unchanged) if the grammar does not allow token_id."""
        matcher = self._matcher(request_id)
        accepted = not matcher.is_terminated() and matcher.accept_token(int(token_id))
        if not accepted:
            logger.warning("structured output: request %r: token %d is not allowed by its grammar",
                           request_id, token_id)
        return accepted

    def is_terminated(self, request_id: str) -> bool:
        """True when the structure is complete and its stop token was accepted."""
        state = self._state(request_id)
        return state.matcher is not None and state.matcher.is_terminated()

    def remove_request(self, request_id: str) -> None:
        """Forget a request (finished or aborted); unknown ids are ignored."""
        self._requests.pop(request_id, None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def num_requests(self) -> int:
        return len(self._requests)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _state(self, request_id: str) -> _RequestState:
        state = self._requests.get(request_id)
        if state is None:
            raise ValueError(f"structured output: unknown request {request_id!r}")
        return state

    def _matcher(self, request_id: str) -> xgr.GrammarMatcher:
        state = self._state(request_id)
        if state.matcher is None:
            wait([state.future])  # correct, if slow; a failed compile raises from is_ready
            self.is_ready(request_id)
        return state.matcher

    def _fill_stop_only(self, row: torch.Tensor) -> None:
        row.zero_()
        for token_id in self.stop_token_ids:
            word, bit = divmod(token_id, 32)
            row[word] |= (1 << bit) if bit < 31 else -(1 << 31)

    def _allocate_bitmask(self, rows: int) -> torch.Tensor:
        bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        return bitmask.pin_memory() if torch.cuda.is_available() else bitmask
