"""A request as the scheduler sees it: token ids, progress, status. Plain Python, no torch."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # SamplingParams (kept untyped: core imports nothing above it)
    arrival_time: float
    arrival_index: int  # order of arrival: the scheduler's priority (smaller goes first)
    max_tokens: int  # already resolved against max_model_len
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    cache_salt: str | None = None  # extra prefix-cache key for anything that changes K/V (e.g. a LoRA adapter)
    block_keys: list = field(default_factory=list)  # prefix-cache keys of its full blocks, computed lazily
    num_registered_blocks: int = 0  # full blocks already offered to the prefix cache
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_in_flight: int = 0  # sampled tokens not yet known to the host (async scheduling: 0 or 1)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
