"""Executes one scheduled step: builds the batch tensors, runs the model, samples. Knows token ids, not text."""
from __future__ import annotations

import bisect
import logging
import random
import time
from dataclasses import dataclass

import torch

from pagedllm.attention.backend import AttentionMetadata, get_attention_backend
from pagedllm.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.request import Request
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.model.registry import get_model_class
from pagedllm.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata
from pagedllm.sampling.seeds import mix_seed
from pagedllm.worker.cuda_graphs import DecodeGraphs, capture_sizes
from pagedllm.worker.input_batch import InputBuffers, StepInputs, aligned_offsets, slots_of
from pagedllm.worker.loader import init_dummy_weights, iterate_checkpoint
from pagedllm.worker.token_history import TokenHistory

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled_requests: list[Request]  # the requests that got a new token this step (prefill chunks that end early don't)
    token_ids: list[int]
    logprobs: list[tuple[float, int, list[int], list[float]]] | None = None  # per sampled request: (logprob, rank,
    # top ids, top logprobs); None when nobody asked


@dataclass
class LaunchedForward:
    """A step's forward pass queued on the device: the requests that sample and their logits (rows in order)."""
    requests: list[Request]
    logits: torch.Tensor | None


class PendingStep:
    """A launched step whose sampled tokens are on their way to the host: result() waits for them (the step's one
    device-to-host sync) and returns them as Python values."""

    def __init__(self, requests: list[Request], output: SamplerOutput | None) -> None:
        self.requests = requests
        self._result: RunnerOutput | None = RunnerOutput([], []) if output is None else None
        self._host: list[torch.Tensor] = []
        self._ready: torch.cuda.Event | None = None
        if output is not None:
            tensors = [output.token_ids]
            if output.sampled_logprobs is not None:
                tensors += [output.sampled_logprobs, output.sampled_ranks]
                if output.top_token_ids is not None:
                    tensors += [output.top_token_ids, output.top_logprobs]
            if output.token_ids.is_cuda:  # written into pinned memory by a kernel (host_io.to_host: no memcpy)
                from pagedllm.worker.host_io import to_host
                self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
                for host, device in zip(self._host, tensors):
                    to_host(device, host)
                self._ready = torch.cuda.Event()
                self._ready.record()
            else:
                self._host = tensors

    def result(self) -> RunnerOutput:
        if self._result is None:
            if self._ready is not None:
                self._ready.synchronize()
            values = [t.tolist() for t in self._host]
            self._result = RunnerOutput(self.requests, values[0])
            if len(values) > 1:
                lp, ranks = values[1], values[2]
                top_ids, top_lps = values[3:5] if len(values) > 3 else ([[] for _ in lp], [[] for _ in lp])
                self._result.logprobs = [(lp[i], ranks[i], top_ids[i], top_lps[i]) for i in range(len(lp))]
            self._host = []
        return self._result


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.dtype = config.dtype
        self.block_size = config.block_size
        self.vocab_size = config.model.vocab_size
        self.backend = get_attention_backend(self.device)
        self.model = self._load_model()
        self.kv_caches: list[torch.Tensor] = []
        self.host_caches: list[torch.Tensor] = []
        self.generators: dict[str, torch.Generator] = {}
        self.token_history = TokenHistory(pad_id=self.vocab_size)  # for penalties
        max_seqs = config.args.max_num_seqs
        self.buffers = InputBuffers(max(config.max_num_batched_tokens, max_seqs), max_seqs,
                                    cdiv(config.max_model_len, self.block_size), self.device)
        self.graphs: DecodeGraphs | None = None
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.args.seed))
        # the previous launch's sampled ids on the device, and each request's row in them (async scheduling)
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None
        self._step_seeds = random.Random(config.args.seed)  # the fused sampler's per-step seed (CUDA)

    # -- startup ---------------------------------------------------------------------------------------------------
    def _load_model(self) -> torch.nn.Module:
        cfg, args = self.config.model, self.config.args
        start = time.perf_counter()
        model_class = get_model_class(cfg.architecture)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_class(cfg, self.backend, max_position=max(self.config.max_model_len,
                                                                        cfg.max_position_embeddings))
        finally:
            torch.set_default_dtype(previous)
        if args.load_format == "dummy":
            init_dummy_weights(model, args.seed)
        else:
            model.load_weights(iterate_checkpoint(args.model, args.load_format))
        model.eval()
        logger.info("loaded %s weights (%s) in %.2f s", cfg.architecture, args.load_format,
                    time.perf_counter() - start)
        return model

    def kv_bytes_per_block(self) -> int:
        cfg = self.config.model
        return (2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim
                * torch.empty((), dtype=self.dtype).element_size())

    def determine_num_blocks(self) -> int:
        args = self.config.args
        per_block = self.kv_bytes_per_block()
        if args.kv_cache_memory is not None:
            return args.kv_cache_memory // per_block
        if self.device.type == "cuda":
            return self._profile_gpu_blocks(per_block)
        # CPU: a fixed budget, but no more than max_num_seqs full-length sequences could ever use.
        most_useful = args.max_num_seqs * (cdiv(self.config.max_model_len, self.block_size) + 1)
        return min(DEFAULT_CPU_KV_CACHE_MEMORY // per_block, most_useful)

    @torch.inference_mode()
    def _profile_gpu_blocks(self, per_block: int) -> int:
        """Run the largest step once to learn peak activation memory; the KV cache gets what is left under
        gpu_memory_utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        cfg = self.config.model
        dummy_cache = torch.zeros(2, 1, self.block_size, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype,
                                  device=self.device)
        self.model.bind_kv_caches([dummy_cache] * cfg.num_layers)
        num_tokens = self.config.max_num_batched_tokens
        seq_len = min(num_tokens, self.config.max_model_len)
        num_seqs = cdiv(num_tokens, seq_len)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(num_seqs, cdiv(seq_len, self.block_size), dtype=torch.int32,
                                     device=self.device),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            num_decodes=0, max_query_len=seq_len, max_seq_len=seq_len, query_start_loc_cpu=starts, seq_lens_cpu=lens)
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, torch.arange(num_tokens, device=self.device) % seq_len, meta)
        rows = min(self.config.args.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows])
        self.sampler(logits, self._profile_sampling_metadata(rows))
        # the fused sampler's two kernel variants (seeded draws, all-greedy batches) on the model's logits: compiled
        # now, not in the first request's step (about a second each on a cold cache)
        ones, zeros = torch.ones(rows, device=self.device), torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.sampler(logits, SamplingMetadata(temperature=ones, greedy=zeros.bool(), all_greedy=False, seeds=zeros))
        greedy = self.sampler(logits[:1], SamplingMetadata(temperature=None, greedy=None, all_greedy=True))
        # and the kernels that stage a step's inputs in from the host and write its tokens out (host_io.py)
        self.buffers.load(StepInputs([0], [0], [-1], [0, 1], [1], [[0]], 1, 1))
        PendingStep([], greedy).result()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        del hidden, logits, dummy_cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        activation = peak - allocated
        budget = total * self.config.args.gpu_memory_utilization - (total - free) - activation
        logger.info("GPU memory: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB, KV budget %.2f GiB",
                    total / 2**30, (total - free) / 2**30, activation / 2**30, budget / 2**30)
        if budget < per_block:
            raise ValueError("No GPU memory left for the KV cache: raise gpu_memory_utilization or lower "
                             "max_num_batched_tokens / max_num_seqs.")
        return int(budget // per_block)

    def _profile_sampling_metadata(self, rows: int) -> SamplingMetadata:
        ones = torch.ones(rows, device=self.device)
        return SamplingMetadata(
            temperature=ones, greedy=torch.zeros(rows, dtype=torch.bool, device=self.device), all_greedy=False,
            top_k=torch.full((rows,), 50, device=self.device), top_p=ones * 0.9, min_p=ones * 0.1,
            max_num_logprobs=20)

    def allocate_kv_cache(self, num_blocks: int, num_host_blocks: int = 0) -> None:
        cfg = self.config.model
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.model.bind_kv_caches(self.kv_caches)
        host_shape = (2, num_host_blocks, *shape[2:])
        pin = self.device.type == "cuda"
        self.host_caches = [torch.zeros(host_shape, dtype=self.dtype, pin_memory=pin)
                            for _ in range(cfg.num_layers)] if num_host_blocks else []
        if self.device.type == "cuda":  # with and without graphs alike, so that both run the same kernels
            start = time.perf_counter()
            self.model.tune_matmuls(capture_sizes(self.config.args.max_num_seqs))
            logger.info("timed cuBLAS against cuBLASLt in %.1f s", time.perf_counter() - start)
        if self.device.type == "cuda" and not self.config.args.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.buffers, self.config.args.max_num_seqs)
            self.graphs.capture()

    def prepare(self, sched: SchedulerOutput) -> None:
        """What a step does before its forward pass, also for a step that computes nothing (every running request
        preempted): forget finished requests, move blocks."""
        for request_id in sched.finished_request_ids:
            self.generators.pop(request_id, None)
            self.token_history.forget(request_id)
        self.move_blocks(sched)

    def move_blocks(self, sched: SchedulerOutput) -> None:
        """Swaps out, then swaps in, then copy-on-write copies: all before the step's forward writes anything."""
        if sched.blocks_to_swap_out:
            src, dst = self._index_pair(sched.blocks_to_swap_out)
            for cache, host in zip(self.kv_caches, self.host_caches):
                host[:, dst.cpu()] = cache[:, src].to("cpu")
        if sched.blocks_to_swap_in:
            src, dst = self._index_pair(sched.blocks_to_swap_in)
            for cache, host in zip(self.kv_caches, self.host_caches):
                cache[:, dst] = host[:, src.cpu()].to(self.device, non_blocking=True)
        if sched.blocks_to_copy:
            src, dst = self._index_pair(sched.blocks_to_copy)
            for cache in self.kv_caches:
                cache[:, dst] = cache[:, src]

    def _index_pair(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = zip(*pairs)
        return self._to_device(list(src), torch.int64), self._to_device(list(dst), torch.int64)

    # -- one step --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]) -> LaunchedForward:
        """Queue the step's forward pass and logits. A decode whose input token was sampled by the previous launch
        and is not yet on the host (async scheduling) reads it from that launch's output on the device."""
        self.prepare(sched)
        step, sample_requests, sample_rows = self._build_step(sched, block_tables)
        num_seqs = len(step.seq_lens)
        padded = self._decode_batch_size(step)
        if padded is not None:
            # Decode-only on the GPU: padded to a captured size, replayed as a graph that ends with the logits (or,
            # with enforce_eager, run as the same padded batch, so that graphs and eager compute exactly the same
            # thing).
            step.pad_decode_batch(padded)
            if self.graphs is not None:
                logits = self.graphs.run(step)
            else:
                input_ids, positions, meta = self.buffers.load(step, full_width=True)
                logits = self.model.compute_logits(self.model(input_ids, positions, meta))
            if not sample_requests:
                return LaunchedForward([], None)
            rows = slice(0, num_seqs) if len(sample_rows) == num_seqs else self._to_device(sample_rows, torch.int64)
            return LaunchedForward(sample_requests, logits[rows])
        input_ids, positions, meta = self.buffers.load(step)
        hidden = self.model(input_ids, positions, meta)
        if not sample_requests:
            return LaunchedForward([], None)
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[self._to_device(sample_rows, torch.int64)]
        return LaunchedForward(sample_requests, self.model.compute_logits(hidden))

    @torch.inference_mode()
    def sample(self, launched: LaunchedForward, grammar_bitmask_fn=None) -> PendingStep:
        """Queue the sampling of a launched forward. Its metadata (penalties' token history, min_tokens, the
        grammar's bitmask) is read now, so an engine may first process the tokens of the step before it."""
        requests = launched.requests
        if not requests:
            self._last_sampled = None
            return PendingStep([], None)
        sampling = self._sampling_metadata(requests)
        if grammar_bitmask_fn is not None:
            grammar_bitmask_fn(launched.logits, requests)
        output = self.sampler(launched.logits, sampling)
        self._last_sampled = (output.token_ids, {r.request_id: i for i, r in enumerate(requests)})
        return PendingStep(requests, output)

    def _to_device(self, values, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Host values (a list or a numpy array) on the device without waiting for the device: a copy from pageable
        memory would first wait for everything queued before it (the step in flight), so it goes through pinned
        memory."""
        tensor = torch.from_numpy(values) if dtype is None else torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _decode_batch_size(self, step: StepInputs) -> int | None:
        num_seqs = len(step.seq_lens)
        if self.device.type != "cuda" or step.num_decodes != num_seqs:
            return None
        sizes = capture_sizes(self.config.args.max_num_seqs)
        index = bisect.bisect_left(sizes, num_seqs)
        return sizes[index] if index < len(sizes) else None

    def _build_step(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]):
        bs = self.block_size
        step = StepInputs([], [], [], [0], [], [], sched.num_decodes, max(sched.num_new_tokens))
        step.deferred_ids = self._last_sampled[0] if self._last_sampled is not None else None
        sample_requests, sample_rows = [], []
        scheduled = list(zip(sched.requests, sched.num_new_tokens))
        # Decodes longest context first: decode attention then launches its longest programs first, and the short
        # ones fill the last wave's tail (triton_decode.py). Sampled rows follow the batch, so nothing else changes.
        scheduled[:sched.num_decodes] = sorted(scheduled[:sched.num_decodes], key=lambda s: -s[0].num_computed_tokens)
        for request, num_new in scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            table = block_tables[request.request_id]
            if num_new == 1:
                if start < request.num_tokens:
                    step.input_ids.append(request.token_ids[start])
                else:  # sampled by the step in flight: its id is copied on the device
                    step.deferred_rows.append(len(step.input_ids))
                    step.deferred_sources.append(self._last_sampled[1][request.request_id])
                    step.input_ids.append(0)
                step.positions.append(start)
            else:
                step.input_ids.extend(request.token_ids[start:end])
                step.positions.extend(range(start, end))
            step.slot_mapping.extend(slots_of(table, start, end, bs))
            step.query_start_loc.append(step.query_start_loc[-1] + num_new)
            step.seq_lens.append(end)
            step.block_tables.append(table)
            if end >= request.num_tokens:  # > only for a decode of a token in flight
                sample_requests.append(request)
                sample_rows.append(step.query_start_loc[-1] - 1)
        return step, sample_requests, sample_rows

    def _sampling_metadata(self, requests: list[Request]) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        meta = SamplingMetadata(temperature=None, greedy=None, all_greedy=all_greedy, any_greedy=any(greedy))
        columns: dict[str, tuple[list, torch.dtype]] = {}  # per-row values, to the device in one copy
        if not all_greedy:
            columns["temperature"] = ([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32)
            columns["greedy"] = (greedy, torch.bool)
            if any(p.top_k > 0 for p in params):
                # top_k beyond the vocabulary keeps every token, as -1 does
                columns["top_k"] = ([min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size
                                     for p in params], torch.int64)
            if any(p.top_p < 1.0 for p in params):
                columns["top_p"] = ([p.top_p for p in params], torch.float32)
            if any(p.min_p > 0.0 for p in params):
                columns["min_p"] = ([p.min_p for p in params], torch.float32)
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
                columns[name] = ([getattr(p, name) for p in params], torch.float32)
            prompt_ids, output_ids = self.token_history.padded(requests)
            meta.prompt_token_ids = self._to_device(prompt_ids)
            meta.output_token_ids = self._to_device(output_ids)
        # On CUDA the draw is one fused kernel keyed by a seed per row: a seeded request's seed mixed with its
        # output position (so its tokens do not depend on the batch), the others this step's seed plus the row.
        seeds = [] if self.device.type == "cuda" and not all_greedy else None
        step_seed = self._step_seeds.getrandbits(62) if seeds is not None else 0
        for row, (request, p) in enumerate(zip(requests, params)):
            if seeds is not None:
                seeds.append(step_seed + row if p.seed is None else
                             mix_seed(p.seed, request.num_output_tokens + request.num_in_flight))
            # min_tokens bans the stop tokens; a grammar decides for itself when output may end.
            if request.num_output_tokens + request.num_in_flight < p.min_tokens and p.structured_outputs is None:
                stoppers = (*(() if p.ignore_eos else request.eos_token_ids), *p.stop_token_ids)
                banned = [t for t in stoppers if t < self.vocab_size]
                if banned:
                    meta.banned_token_ids.append((row, banned))
            if p.seed is not None and not p.greedy and seeds is None:
                generator = self.generators.get(request.request_id)
                if generator is None:
                    generator = torch.Generator(device=self.device).manual_seed(p.seed)
                    self.generators[request.request_id] = generator
                meta.generators[row] = generator
            if p.logprobs is not None:
                meta.max_num_logprobs = max(meta.max_num_logprobs or 0, p.logprobs)
        if seeds is not None:
            columns["seeds"] = (seeds, torch.int64)
        for name, tensor in zip(columns, self._columns_to_device(list(columns.values()))):
            setattr(meta, name, tensor)
        return meta

    def _columns_to_device(self, columns: list[tuple[list, torch.dtype]]) -> list[torch.Tensor]:
        """Lists of per-row values as device tensors of the given dtypes, in one copy through pinned memory."""
        if self.device.type != "cuda" or not columns:
            return [torch.tensor(values, dtype=dtype) for values, dtype in columns]
        sizes = [len(values) * dtype.itemsize for values, dtype in columns]
        offsets = aligned_offsets(sizes)  # aligned as the kernels' variants expect, as the step's inputs are
        spans = [(start, start + size) for start, size in zip(offsets, sizes)]
        host = torch.empty(offsets[-1], dtype=torch.uint8, pin_memory=True)
        for (start, stop), (values, dtype) in zip(spans, columns):
            host[start:stop].view(dtype).numpy()[:] = values
        device = host.to(self.device, non_blocking=True)
        return [device[start:stop].view(dtype) for (start, stop), (_, dtype) in zip(spans, columns)]
