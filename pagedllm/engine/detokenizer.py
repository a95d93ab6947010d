"""Incremental detokenization of one sequence and stop-string detection across token boundaries."""
from __future__ import annotations

_PROMPT_CONTEXT = 8  # prompt tokens given to the stream so the first output token decodes in context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.text = ""
        self._output_ids: list[int] = []
        self._stream = None
        backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream
            self._backend = backend
            self._stream = DecodeStream(ids=list(prompt_token_ids[-_PROMPT_CONTEXT:]),
                                        skip_special_tokens=skip_special_tokens)
        # Text that may still turn out to start a stop string is held back from the visible output.
        self._hold_back = max((len(s) for s in stop), default=1) - 1 if not include_stop_str_in_output else 0

    def append(self, token_id: int) -> str | None:
        """Add one token; return the stop string it completed, if any (self.text is then cut at it)."""
        old_len = len(self.text)
        if self._stream is not None:
            self.text += self._stream.step(self._backend, token_id) or ""
        else:
            self._output_ids.append(token_id)
            self.text = self.tokenizer.decode(self._output_ids, skip_special_tokens=self.skip_special_tokens)
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
        return stop

    def visible_text(self, finished: bool) -> str:
        if finished or self._hold_back == 0:
            return self.text
        return self.text[:max(0, len(self.text) - self._hold_back)]
