"""Incremental detokenization of one sequence and stop-string detection across token boundaries."""
from __future__ import annotations

_PROMPT_CONTEXT = 6  # prompt tokens decoded with the first output token, so that it decodes in context
_MAX_UTF8_WAIT = 4  # a character is at most 4 bytes: wait no longer than that for an incomplete one


class IncrementalDetokenizer:
    """Text grows only at its end: each new token's text is the decode of a short window (a few tokens already
    shown, then the new ones) minus the decode of the part already shown, so that spaces and merges that depend on
    the tokens before come out right. Text that ends in an incomplete UTF-8 character waits for the next tokens
    (byte-fallback pieces); bytes that never form a character come out as U+FFFD, as a full decode gives them."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool) -> None:
        backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode  # Rust: ~1 us for a window
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.text = ""
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0  # the window: ids[prefix_offset:read_offset] are shown, the rest are not yet
        self._read_offset = len(self._ids)
        self._stopped = False  # a stop string cut the text
        # Text that may still turn out to start a stop string is held back from the visible output.
        self._hold_back = max((len(s) for s in stop), default=1) - 1 if not include_stop_str_in_output else 0

    def append(self, token_id: int) -> str | None:
        """Add one token; return the stop string it completed, if any (self.text is then cut at it)."""
        old_len = len(self.text)
        ids = self._ids
        ids.append(token_id)
        shown = self._decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=self.skip_special_tokens)
        full = self._decode(ids[self._prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        waiting = full.endswith("\ufffd") and len(ids) - self._read_offset < _MAX_UTF8_WAIT
        if len(full) > len(shown) and not waiting:
            self.text += full[len(shown):]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            if self._prefix_offset > 64:  # keep the list short; only the window is ever decoded
                del ids[:self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        best = None
        for stop in self.stop:
            index = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[:index + len(stop)] if self.include_stop else self.text[:index]
        self._stopped = True
        return stop

    def visible_text(self, finished: bool) -> str:
        if finished:
            return self.text + self._unfinished_character()
        if self._hold_back == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self._hold_back)]

    def _unfinished_character(self) -> str:
        """At the end, bytes still waiting for the rest of their character show as U+FFFD, as a full decode has
        them (unless a stop string already ended the text)."""
        if self._stopped or self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset:]
        shown = self._decode(window[:self._read_offset - self._prefix_offset],
                             skip_special_tokens=self.skip_special_tokens)
        return self._decode(window, skip_special_tokens=self.skip_special_tokens)[len(shown):]


def check_unicode(text: str, what: str) -> None:
    """Tokenizers take only valid Unicode: a lone surrogate (JSON allows "\\ud800") is refused here, clearly."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid Unicode text: {error.reason} at character {error.start}.") from None
