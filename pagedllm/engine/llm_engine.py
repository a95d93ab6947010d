"""LLMEngine: takes requests, steps the scheduler and the model runner, and turns sampled tokens into outputs."""
from __future__ import annotations

import atexit
import dataclasses
import gc
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable

from pagedllm.config import EngineArgs, EngineConfig, ModelConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.beam_search import BeamState
from pagedllm.engine.detokenizer import IncrementalDetokenizer, check_unicode
from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams
from pagedllm.worker.model_runner import ModelRunner, PendingStep, RunnerOutput

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_blocks: int
    prefix_cache_hit_rate: float = 0.0  # prompt tokens found in the prefix cache / prompt tokens looked up
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found there
    num_computed_prompt_tokens: int = 0  # prompt tokens actually run through the model (cache hits excluded)
    kv_fragmentation: float = 0.0  # mean over steps: allocated slots of running sequences holding no token
    kv_sharing_savings: float = 0.0  # mean over steps: 1 - physical blocks / blocks in sequences' tables
    kv_waste_if_contiguous: float = 0.0  # mean over steps, had each running sequence reserved max_model_len slots
    num_swaps: int = 0


@dataclass
class _KVSums:
    """Sums over steps of the KV-cache figures that EngineStats reports as means."""
    fragmentation: float = 0.0
    sharing_savings: float = 0.0
    contiguous_waste: float = 0.0
    steps: int = 0
    computed_prompt_tokens: int = 0


@dataclass
class _Sequence:
    """Engine-side state of one generated sequence (one Request in the scheduler)."""
    request: Request
    index: int
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None


@dataclass
class _BeamGroup:
    """A beam-search request: its live beams are sequences in the scheduler, forked from their parents."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: BeamSearchParams
    state: BeamState
    beams: list[Request]  # in the state's beam order
    metrics: RequestMetrics
    reported: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # beam id -> its top 2k
    num_forks: int = 0


@dataclass
class _Group:
    """A user request: its prompt and its n sequences."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    pending_forks: list[_Sequence] = field(default_factory=list)  # n > 1: siblings waiting for the prompt
    late_sampling: bool = False  # penalties: sampling needs the previous token processed (async scheduling)

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.sequences)


class LLMEngine:
    def __init__(self, args: EngineArgs, stream_outputs: bool = True) -> None:
        start = time.perf_counter()
        _thaw_heap()  # an earlier engine's cycles (and their GPU memory) go before this one measures memory
        from pagedllm.model_resolution import resolve_model
        resolved = resolve_model(args.model)  # a local directory, a .gguf file, or a hub id from the cache
        tokenizer_path = args.tokenizer
        if tokenizer_path and not os.path.isdir(tokenizer_path):  # a directory of tokenizer files is used as is
            tokenizer_path = resolve_model(tokenizer_path).path
        served_name = args.served_model_name or resolved.name
        args = dataclasses.replace(args, model=resolved.path, tokenizer=tokenizer_path, served_model_name=served_name)
        self.args = args
        self.stream_outputs = stream_outputs  # False: step() returns only finished requests (offline use)
        self.tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(args)
        model_config = _load_model_config(args)
        self.config = EngineConfig.create(args, model_config)
        self.max_model_len = self.config.max_model_len
        self.model_name = args.served_model_name or args.model
        self.eos_token_ids = frozenset(_eos_token_ids(args, model_config, self.tokenizer))
        self.runner = ModelRunner(self.config)
        num_blocks = self.runner.determine_num_blocks()
        if num_blocks < 1:
            raise ValueError("The KV cache budget is smaller than one block: raise kv_cache_memory or "
                             "gpu_memory_utilization.")
        num_host_blocks = 0
        if args.preemption_mode == "swap":
            num_host_blocks = int(args.swap_space * 2**30) // self.runner.kv_bytes_per_block()
        self.runner.allocate_kv_cache(num_blocks, num_host_blocks)
        self.kv_cache = KVCacheManager(num_blocks, self.config.block_size, args.enable_prefix_caching,
                                       num_host_blocks)
        self.scheduler = Scheduler(self.kv_cache, args.max_num_seqs, self.config.max_num_batched_tokens,
                                   args.preemption_mode)
        self._kv_sums = _KVSums()
        self.async_scheduling = self.config.async_scheduling
        self._in_flight: PendingStep | None = None  # async scheduling: the launched step not yet processed
        self.structured = None  # StructuredOutputManager, created on first use
        self._groups: dict[str, _Group] = {}
        self._sequences: dict[str, tuple[_Group, _Sequence]] = {}
        self._arrivals = itertools.count()
        self._compiling: list[Request] = []  # structured-output requests whose grammar is still compiling
        self._beam_groups: dict[str, _BeamGroup] = {}  # by user request id
        self._beam_of: dict[str, _BeamGroup] = {}  # by beam sequence id
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        tokens = num_blocks * self.config.block_size
        logger.info("pagedllm ready: model %s, %s, %d KV blocks of %d tokens (%d tokens, %.2f GiB), max concurrency "
                    "%.1fx at max_model_len %d, ready in %.1f s", self.model_name, str(self.config.dtype)[6:],
                    num_blocks, self.config.block_size, tokens,
                    num_blocks * self.runner.kv_bytes_per_block() / 2**30,
                    tokens / self.max_model_len, self.max_model_len, time.perf_counter() - start)
        _freeze_heap()

    # -- requests in -----------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}.")
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use.")
        if params.n > self.config.args.max_num_seqs:
            raise ValueError(f"n must be at most max_num_seqs ({self.config.args.max_num_seqs}), got {params.n}.")
        vocab_size = self.config.model.vocab_size
        if params.logprobs is not None and params.logprobs > vocab_size:
            raise ValueError(f"logprobs must be at most the vocabulary size ({vocab_size}), got {params.logprobs}.")
        prompt_text, prompt_ids, max_tokens = self._check_prompt(prompt, params.max_tokens)
        if params.structured_outputs is not None:
            self._structured().validate(params.structured_outputs)
        now = time.time() if arrival_time is None else arrival_time
        group = _Group(request_id, prompt_text, prompt_ids, params, [], RequestMetrics(arrival_time=now))
        group.late_sampling = (params.repetition_penalty != 1.0 or bool(params.presence_penalty)
                               or bool(params.frequency_penalty))
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                if params.seed is not None:
                    child_params.seed = (params.seed + index) % 2**64  # a torch seed is 64 bits
            seq_id = request_id if params.n == 1 else f"{index}_{request_id}"
            request = Request(seq_id, prompt_ids, child_params, now, next(self._arrivals), max_tokens,
                              frozenset() if params.ignore_eos else self.eos_token_ids)
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop,
                                               params.include_stop_str_in_output)
            want_logprobs = params.logprobs is not None
            group.sequences.append(_Sequence(request, index, detok, [] if want_logprobs else None,
                                             0.0 if want_logprobs else None))
        self._groups[request_id] = group
        for seq in group.sequences:
            self._sequences[seq.request.request_id] = (group, seq)
        # n > 1: the first sequence computes the prompt; the others fork from it (sharing its blocks) once it has.
        group.pending_forks = group.sequences[1:]
        for seq in group.sequences[:1]:
            if params.structured_outputs is not None:
                # Held back until its grammar is compiled (in the background), so nobody else waits for it.
                self._structured().add_request(seq.request.request_id, params.structured_outputs)
                self._compiling.append(seq.request)
            else:
                self.scheduler.add_request(seq.request)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar is ready join the scheduler; one whose grammar failed to compile ends (abort,
        with the error as its stop_reason) without touching anyone else."""
        if not self._compiling:
            return []
        still, failed = [], []
        for request in self._compiling:
            if request.request_id not in self._sequences:
                continue  # aborted while compiling
            try:
                ready = self.structured.is_ready(request.request_id)
            except ValueError as error:
                failed.append(self._fail(self._sequences[request.request_id][0], str(error)))
                continue
            if ready:
                self.scheduler.add_request(request)
            else:
                still.append(request)
        self._compiling = still
        return failed

    def _fail(self, group: _Group, message: str) -> RequestOutput:
        for seq in group.sequences:
            seq.request.stop_reason = message
            self._drop_sequence(seq, RequestStatus.FINISHED_ABORTED)
        group.pending_forks = []
        self._groups.pop(group.request_id, None)
        group.metrics.finished_time = time.time()
        return self._make_output(group, True)

    def _check_prompt(self, prompt, max_tokens: int | None) -> tuple[str | None, list[int], int]:
        """Tokenize and check that the prompt, and its longest output, fit the model and the cache."""
        prompt_text, prompt_ids = self._tokenize(prompt)
        num_prompt = len(prompt_ids)
        if num_prompt >= self.max_model_len:
            raise ValueError(f"The prompt has {num_prompt} tokens, but max_model_len is {self.max_model_len}: "
                             f"it must be at most {self.max_model_len - 1} tokens to leave room for output.")
        limit = self.max_model_len - num_prompt
        max_tokens = limit if max_tokens is None else min(limit, max_tokens)
        most_tokens = num_prompt + max_tokens
        if self.kv_cache.blocks_needed(most_tokens) > self.kv_cache.num_blocks:
            raise ValueError(f"The request needs up to {most_tokens} tokens of KV cache "
                             f"({self.kv_cache.blocks_needed(most_tokens)} blocks), but the whole cache holds "
                             f"{self.kv_cache.num_blocks} blocks of {self.config.block_size}: it can never fit.")
        return prompt_text, prompt_ids, max_tokens

    def add_beam_search_request(self, request_id: str, prompt: str | list[int] | dict,
                                params: BeamSearchParams, arrival_time: float | None = None) -> None:
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam search needs BeamSearchParams, got {type(params).__name__}.")
        if request_id in self._groups or request_id in self._beam_groups:
            raise ValueError(f"request id {request_id!r} is already in use.")
        if 2 * params.beam_width > self.config.model.vocab_size:
            raise ValueError(f"beam_width {params.beam_width} is too large for a vocabulary of "
                             f"{self.config.model.vocab_size}.")
        prompt_text, prompt_ids, max_tokens = self._check_prompt(prompt, params.max_tokens)
        now = time.time() if arrival_time is None else arrival_time
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        state = BeamState(params.beam_width, max_tokens, params.length_penalty, eos)
        # Each beam computes its tokens and reports the 2k most likely next ones (raw logprobs, greedy).
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2 * params.beam_width,
                                  ignore_eos=True, detokenize=False)
        root = Request(f"{request_id}#0", prompt_ids, sampling, now, next(self._arrivals), max_tokens)
        group = _BeamGroup(request_id, prompt_text, prompt_ids, params, state, [root], RequestMetrics(now))
        self._beam_groups[request_id] = group
        self._beam_of[root.request_id] = group
        self.scheduler.add_request(root)

    def _beam_reported(self, group: _BeamGroup, request: Request, info) -> RequestOutput | None:
        _, _, top_ids, top_lps = info
        group.reported[request.request_id] = list(zip(top_ids, top_lps))
        if len(group.reported) < len(group.beams):
            return None
        old = group.beams
        chosen = group.state.step([group.reported[b.request_id] for b in old])
        group.reported = {}
        group.beams = []
        if not group.state.done:
            for parent_index, beam in chosen:
                parent = old[parent_index]
                group.num_forks += 1
                child = Request(f"{group.request_id}#{group.num_forks}", group.prompt_token_ids,
                                parent.sampling_params, parent.arrival_time, parent.arrival_index, parent.max_tokens)
                child.output_token_ids = list(beam.tokens)
                child.token_ids = group.prompt_token_ids + beam.tokens
                if parent.request_id in self.kv_cache.block_tables:  # share its blocks: fork, no copy
                    self.kv_cache.fork(parent, child, parent.num_computed_tokens)
                    child.num_computed_tokens = parent.num_computed_tokens
                self._beam_of[child.request_id] = group
                self.scheduler.add_forked_request(child)
                group.beams.append(child)
        for request in old:  # dropped or replaced by their children: references go back
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
            del self._beam_of[request.request_id]
        if not group.state.done:
            return None
        del self._beam_groups[group.request_id]
        group.metrics.finished_time = time.time()
        completions = []
        for index, (score, beam, reason) in enumerate(group.state.results()):
            text = self.tokenizer.decode(beam.tokens, skip_special_tokens=True) if self.tokenizer else ""
            completions.append(CompletionOutput(index, text, beam.tokens, beam.cum_logprob, None, reason))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, True, group.metrics)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True): give token ids.")
            if not prompt:
                raise ValueError("the prompt is empty.")
            check_unicode(prompt, "prompt")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}.")

    def _check_ids(self, ids) -> list[int]:
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty.")
        vocab = self.config.model.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is out of range [0, {vocab}).")
        return ids

    def _structured(self):
        if self.structured is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer.")
            from pagedllm.sampling.structured import StructuredOutputManager
            self.structured = StructuredOutputManager(self.tokenizer, self.config.model.vocab_size,
                                                      stop_token_ids=sorted(self.eos_token_ids))
        return self.structured

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            beam_group = self._beam_groups.pop(request_id, None)
            if beam_group is not None:
                for request in beam_group.beams:
                    self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
                    self._beam_of.pop(request.request_id, None)
            group = self._groups.pop(request_id, None)
            if group is None:
                continue
            for seq in group.sequences:
                self._drop_sequence(seq, RequestStatus.FINISHED_ABORTED)

    def _drop_sequence(self, seq: _Sequence, status: RequestStatus) -> None:
        self.scheduler.finish_request(seq.request, status)
        self._sequences.pop(seq.request.request_id, None)
        if self.structured is not None:
            self.structured.remove_request(seq.request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or bool(self._beam_groups)

    def wait_for_work(self) -> None:
        """Block briefly when only grammar compilation is pending (the offline loop would otherwise spin)."""
        if self._compiling and not self.scheduler.has_unfinished_requests():
            time.sleep(0.001)

    def get_stats(self) -> EngineStats:
        sums = self._kv_sums
        steps = sums.steps or 1
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache.usage, num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens, num_generation_tokens=self.num_generation_tokens,
            num_blocks=self.kv_cache.num_blocks, prefix_cache_hit_rate=self.kv_cache.hit_rate,
            prefix_cache_queries=self.kv_cache.num_queried_tokens, prefix_cache_hits=self.kv_cache.num_hit_tokens,
            num_computed_prompt_tokens=sums.computed_prompt_tokens, kv_fragmentation=sums.fragmentation / steps,
            kv_sharing_savings=sums.sharing_savings / steps, kv_waste_if_contiguous=sums.contiguous_waste / steps,
            num_swaps=self.scheduler.num_swaps)

    def _account(self, sched) -> None:
        """Called after a step's tokens are in the cache: KV waste over the running sequences, and the prompt
        tokens this step computed (prefix-cache hits excluded)."""
        sums = self._kv_sums
        used, allocated, physical = self.kv_cache.waste(self.scheduler.running)
        if allocated:
            sums.fragmentation += 1 - used / allocated
            sums.sharing_savings += 1 - physical / allocated
            sums.contiguous_waste += 1 - used / (len(self.scheduler.running) * self.max_model_len)
            sums.steps += 1
        sums.computed_prompt_tokens += sum(min(n, max(0, r.num_prompt_tokens - (r.num_computed_tokens - n)))
                                           for r, n in zip(sched.requests, sched.num_new_tokens))

    # -- one step --------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduled step. With async scheduling, the step is launched on the device before the previous
        one's tokens are processed, so that the host's work overlaps the device's: the outputs returned are the
        previous step's, and a request learns it has stopped one step late (that step's token is dropped)."""
        failed = self._admit_compiled()
        in_flight, self._in_flight = self._in_flight, None
        overlap = self.async_scheduling and self._may_overlap()
        if in_flight is not None and not overlap:
            return failed + self._process(in_flight.result())  # drain: the next step needs every token known
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.runner.prepare(sched)  # a swap-out or a finished request's state must not be lost
            return failed + (self._process(in_flight.result()) if in_flight is not None else [])
        now = time.time()
        for request in sched.requests:
            group = self._beam_of[request.request_id] if request.request_id in self._beam_of else \
                self._sequences[request.request_id][0]
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
                self.num_prompt_tokens += len(group.prompt_token_ids)
        bitmask_fn = self._apply_grammar if self.structured is not None else None
        launched = self.runner.forward(sched, self.kv_cache.block_tables)
        self.scheduler.update_after_step(sched)
        self._account(sched)
        outputs = failed
        if in_flight is not None and self._sample_late():
            # Grammars and penalties need the previous token on the host before this step samples: process it
            # while the device runs this step's forward pass.
            outputs += self._process(in_flight.result())
            in_flight = None
        pending = self.runner.sample(launched, bitmask_fn)
        if not overlap:
            return outputs + self._process(pending.result())
        for request in pending.requests:
            request.num_in_flight += 1
        self._in_flight = pending
        return outputs + (self._process(in_flight.result()) if in_flight is not None else [])

    def _may_overlap(self) -> bool:
        """Whether the next step may be launched before the tokens in flight are known: not while a grammar is
        compiling or any live request forks sequences from its tokens (n > 1, beam search)."""
        if self._beam_groups or self._compiling:
            return False
        return not any(group.params.n > 1 for group in self._groups.values())

    def _sample_late(self) -> bool:
        """Whether a live request's sampling needs the previous token processed first (grammar, penalties)."""
        if self.structured is not None and self.structured.num_requests():
            return True
        return any(group.late_sampling for group in self._groups.values())

    def _apply_grammar(self, logits, requests: list[Request]) -> None:
        ids = [r.request_id if r.sampling_params.structured_outputs is not None and not r.status.finished else None
               for r in requests]
        bitmask = self.structured.fill_bitmask(ids)
        if bitmask is not None:
            self.structured.apply_bitmask(logits, bitmask)

    def _process(self, output: RunnerOutput) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Group] = {}
        outputs = []
        for i, (request, token_id) in enumerate(zip(output.sampled_requests, output.token_ids)):
            if request.num_in_flight:
                request.num_in_flight -= 1
            if request.status.finished:  # stopped or aborted while this token was in flight
                continue
            beam_group = self._beam_of.get(request.request_id)
            if beam_group is not None:
                finished_beams = self._beam_reported(beam_group, request, output.logprobs[i])
                if finished_beams is not None:
                    outputs.append(finished_beams)
                continue
            group, seq = self._sequences[request.request_id]
            if group.pending_forks:
                self._fork(group, request)
            request.append_output_token(token_id)
            self.num_generation_tokens += 1
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
            group.metrics.last_token_time = now
            if output.logprobs is not None and seq.logprobs is not None:
                self._record_logprobs(seq, token_id, output.logprobs[i])
            if self.structured is not None and request.sampling_params.structured_outputs is not None:
                if not self.structured.accept_token(request.request_id, token_id):
                    request.stop_reason = f"token {token_id} is not allowed by the structured-output grammar"
                    self._drop_sequence(seq, RequestStatus.FINISHED_ABORTED)
                    touched[group.request_id] = group
                    continue
            status = self._check_stop(seq, token_id)
            if status is not None:
                self._drop_sequence(seq, status)
            touched[group.request_id] = group
        for group in touched.values():
            finished = group.finished
            if finished:
                group.metrics.finished_time = now
                group.metrics.num_preemptions = sum(s.request.num_preemptions for s in group.sequences)
                self._groups.pop(group.request_id, None)
            if finished or self.stream_outputs:
                outputs.append(self._make_output(group, finished))
        return outputs

    def _fork(self, group: _Group, first: Request) -> None:
        """The prompt is computed: the other n - 1 sequences share its blocks and recompute only its last token
        (to sample their own first token); the first write into a shared partial block copies it."""
        for seq in group.pending_forks:
            if seq.request.status.finished:
                continue
            self.kv_cache.fork(first, seq.request, first.num_prompt_tokens - 1)
            seq.request.num_computed_tokens = first.num_prompt_tokens - 1
            if self.structured is not None and group.params.structured_outputs is not None:
                self._structured().add_request(seq.request.request_id, group.params.structured_outputs)
            self.scheduler.add_forked_request(seq.request)
        group.pending_forks = []

    def _check_stop(self, seq: _Sequence, token_id: int) -> RequestStatus | None:
        request = seq.request
        params = request.sampling_params
        may_stop = request.num_output_tokens >= params.min_tokens
        is_eos = may_stop and token_id in request.eos_token_ids
        is_stop_id = may_stop and not is_eos and token_id in params.stop_token_ids
        stop_string = None
        # As vLLM: the text of a stop token (EOS or stop_token_ids) is left out unless include_stop_str_in_output.
        if seq.detokenizer is not None and not ((is_eos or is_stop_id) and not params.include_stop_str_in_output):
            stop_string = seq.detokenizer.append(token_id)
        if (self.structured is not None and params.structured_outputs is not None
                and self.structured.is_terminated(request.request_id)):
            return RequestStatus.FINISHED_STOPPED  # the structure is complete (min_tokens cannot extend it)
        if is_eos:
            return RequestStatus.FINISHED_STOPPED
        if is_stop_id:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if may_stop and stop_string is not None:
            request.stop_reason = stop_string
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _record_logprobs(self, seq: _Sequence, token_id: int, info) -> None:
        logprob, rank, top_ids, top_lps = info
        k = seq.request.sampling_params.logprobs
        entry = {token_id: Logprob(logprob, rank, self._token_text(token_id))}
        for r, (tid, lp) in enumerate(zip(top_ids[:k], top_lps[:k]), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, r, self._token_text(tid))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += logprob

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, group: _Group, finished: bool) -> RequestOutput:
        completions = []
        for seq in group.sequences:
            request = seq.request
            status = request.status
            done = status.finished
            text = seq.detokenizer.visible_text(done) if seq.detokenizer is not None else ""
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(request.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=status.value if done else None, stop_reason=request.stop_reason))
        cached = min(s.request.num_cached_tokens for s in group.sequences)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             group.metrics, num_cached_tokens=cached)


def _load_model_config(args: EngineArgs) -> ModelConfig:
    if args.hf_config is not None:
        return ModelConfig.from_dict(args.hf_config)
    if args.model.endswith(".gguf"):
        from pagedllm.worker.gguf_loader import load_gguf
        return ModelConfig.from_dict(load_gguf(args.model).config.to_dict())
    return ModelConfig.from_path(args.model)


def _freeze_heap() -> None:
    """Move every object alive after startup (the model's modules, the tokenizer, ...) out of the cyclic garbage
    collector's sight: a full collection over them took about 10 ms every 20 steps on a 2-core CPU at batch 256,
    a stall of every stream. Objects still die by reference count; only cycles among them wait for _thaw_heap."""
    gc.collect()
    gc.freeze()
    atexit.unregister(_thaw_heap)
    atexit.register(_thaw_heap)  # at exit, so that extension modules see their objects collected


def _thaw_heap() -> None:
    gc.unfreeze()
    gc.collect()


def _load_tokenizer(args: EngineArgs):
    from transformers import AutoTokenizer
    path = args.tokenizer or args.model
    if path.endswith(".gguf"):
        from pagedllm.worker.gguf_loader import load_gguf
        return load_gguf(path).tokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds
        raise ValueError(f"could not load a tokenizer from {path!r}: {error}") from error


def _eos_token_ids(args: EngineArgs, model: ModelConfig, tokenizer) -> set[int]:
    ids = set(model.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_config = os.path.join(args.model, "generation_config.json")
    if os.path.isfile(generation_config):
        with open(generation_config) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return ids
