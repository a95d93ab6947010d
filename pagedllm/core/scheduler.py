"""Continuous batching: each step picks which requests run and how many tokens each computes.

Running requests go first (decodes and unfinished prefill chunks), then waiting ones, under a token budget
(max_num_batched_tokens) and max_num_seqs. Long prompts are prefilled in chunks across steps. When blocks run out the
most recently arrived running request is preempted, so the engine never deadlocks and never exceeds the pool: by
recompute (its blocks freed; it computes its tokens again later, helped by the prefix cache) or by swap (its blocks
copied to host memory and back). Plain Python, no torch.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    requests: list[Request]  # decodes (one new token) first, then the others
    num_new_tokens: list[int]  # tokens each computes this step (parallel to requests)
    num_decodes: int
    preempted: list[Request] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # finished since the last step
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst), after swaps

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute") -> None:
        self.kv_cache = kv_cache
        self.preemption_mode = preemption_mode
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # kept sorted by arrival_index
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_swaps = 0
        self._finished_ids: list[str] = []
        self._swap_out: list[tuple[int, int]] = []

    # -- requests in and out -------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Mark a request finished (stop, length or abort) and give its blocks back."""
        assert status.finished
        if request.status.finished:
            return
        if request.request_id not in self.requests:  # never reached the scheduler
            request.status = status
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one step ---------------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            # A token still in flight (async scheduling) is computed like a known one: its id stays on the device.
            num_new = min(request.num_tokens + request.num_in_flight - request.num_computed_tokens, budget)
            if num_new == 0 or (request.num_in_flight
                                and request.num_output_tokens + request.num_in_flight >= request.max_tokens):
                i += 1  # idle: a beam waiting for its siblings, or a request whose token in flight is its last
                continue
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1

        swap_in: list[tuple[int, int]] = []
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                if request.status == RequestStatus.SWAPPED:
                    if not self.kv_cache.can_swap_in(request, num_new):
                        break
                    swap_in.extend(self.kv_cache.swap_in(request))
                    assert self.kv_cache.allocate_slots(request, num_new)
                else:
                    cached = self.kv_cache.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
                    if cached:
                        num_new = min(request.num_tokens - len(cached) * self.kv_cache.block_size, budget)
                    if not self.kv_cache.allocate_slots(request, num_new, cached):
                        break
                    if request.num_computed_tokens == 0:
                        self.kv_cache.record_lookup(request, len(cached) * self.kv_cache.block_size)
                        if request.num_preemptions == 0:
                            request.num_cached_tokens = len(cached) * self.kv_cache.block_size
                    request.num_computed_tokens += len(cached) * self.kv_cache.block_size
                self.waiting.popleft()
                request.status = RequestStatus.RUNNING
                bisect.insort(self.running, request, key=lambda r: r.arrival_index)
                scheduled.append((request, num_new))
                budget -= num_new

        scheduled.sort(key=lambda item: item[1] != 1)  # stable: decodes first, arrival order kept
        finished, self._finished_ids = self._finished_ids, []
        swap_out, self._swap_out = self._swap_out, []
        return SchedulerOutput(
            requests=[r for r, _ in scheduled], num_new_tokens=[n for _, n in scheduled],
            num_decodes=sum(1 for _, n in scheduled if n == 1), preempted=preempted,
            finished_request_ids=finished, blocks_to_swap_out=swap_out, blocks_to_swap_in=swap_in,
            blocks_to_copy=self.kv_cache.take_pending_copies())

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.num_preemptions += 1
        request.num_registered_blocks = 0  # its tokens will live in other blocks
        self.num_preemptions += 1
        pairs = self.kv_cache.swap_out(request) if self.preemption_mode == "swap" else None
        if pairs is not None:
            self._swap_out.extend(pairs)
            request.status = RequestStatus.SWAPPED
            self.num_swaps += 1
        else:  # recompute (or the host is full)
            self.kv_cache.free(request)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
        self.waiting.appendleft(request)

    def add_forked_request(self, request: Request) -> None:
        """A sequence forked from another (parallel sampling): its blocks are already shared to it."""
        self.requests[request.request_id] = request
        self.waiting.appendleft(request)

    def update_after_step(self, output: SchedulerOutput) -> None:
        for request, num_new in zip(output.requests, output.num_new_tokens):
            request.num_computed_tokens += num_new
            self.kv_cache.cache_full_blocks(request)
