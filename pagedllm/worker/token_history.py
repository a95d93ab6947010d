"""The token ids that penalties look at, kept per request across steps.

Repetition, presence and frequency penalties need every row's prompt and output ids as padded tensors. Converting
the requests' Python lists each step costs O(batch x length) Python work (7 ms a step at batch 256 and 400 tokens
on a 2-core CPU); here a prompt becomes an array once and an output array grows by the new tokens only, so a step
costs one row copy per request.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedllm.core.request import Request


@dataclass
class _History:
    request: Request  # the object it belongs to (request ids may be reused once a request has finished)
    prompt: np.ndarray
    output: np.ndarray  # capacity >= num_output
    num_output: int = 0


class TokenHistory:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id  # an id outside the vocabulary: the penalties' scatter drops it
        self._by_id: dict[str, _History] = {}

    def forget(self, request_id: str) -> None:
        self._by_id.pop(request_id, None)

    def padded(self, requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids [B, P], output ids [B, O]) of the requests, padded with pad_id."""
        histories = [self._update(r) for r in requests]
        return (self._pad([h.prompt for h in histories]),
                self._pad([h.output[:h.num_output] for h in histories]))

    def _update(self, request: Request) -> _History:
        history = self._by_id.get(request.request_id)
        ids = request.output_token_ids
        if history is None or history.request is not request or len(ids) < history.num_output:
            history = _History(request, np.asarray(request.prompt_token_ids, dtype=np.int64),
                               np.empty(max(16, 2 * len(ids)), dtype=np.int64))
            self._by_id[request.request_id] = history
        if len(ids) > history.output.size:
            grown = np.empty(2 * len(ids), dtype=np.int64)
            grown[:history.num_output] = history.output[:history.num_output]
            history.output = grown
        if len(ids) > history.num_output:
            history.output[history.num_output:len(ids)] = ids[history.num_output:]
            history.num_output = len(ids)
        return history

    def _pad(self, rows: list[np.ndarray]) -> np.ndarray:
        out = np.full((len(rows), max(1, max(len(r) for r in rows))), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out
