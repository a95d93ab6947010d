"""Prometheus metrics of a serving engine (names prefixed `pagedllm:`), in a registry of their own."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_STATS_LOG_INTERVAL_S = 10.0


@dataclass
class FinishedRequest:
    """What the metrics need to know about one request when it ends."""
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generation_tokens: int
    arrival_time: float
    first_token_time: float | None
    finished_time: float


class EngineMetrics:
    """Counters, gauges and histograms of one engine; updated from the engine thread, read by /metrics."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self._requests = Counter("pagedllm:request_finished", "Requests finished, by finish reason "
                                 "(stop, length, abort, error).", labels + ["finished_reason"], registry=r)
        self._rejected = Counter("pagedllm:request_rejected", "Requests refused before they reached the engine, "
                                 "by HTTP status.", labels + ["status"], registry=r)
        self._prompt_tokens = Counter("pagedllm:prompt_tokens", "Prompt tokens prefilled.", labels, registry=r)
        self._generation_tokens = Counter("pagedllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self._preemptions = Counter("pagedllm:num_preemptions", "Requests preempted (KV cache full).", labels,
                                    registry=r)
        self._running = Gauge("pagedllm:num_requests_running", "Sequences running in the batch.", labels,
                              registry=r)
        self._waiting = Gauge("pagedllm:num_requests_waiting", "Sequences waiting to be scheduled.", labels,
                              registry=r)
        self._kv_usage = Gauge("pagedllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", labels,
                               registry=r)
        self._prefix_queries = Counter("pagedllm:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                       "cache.", labels, registry=r)
        self._prefix_hits = Counter("pagedllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels,
                                    registry=r)
        self._prefix_hit = Gauge("pagedllm:prefix_cache_hit_rate", "Prefix-cache hit rate (0..1).", labels,
                                 registry=r)
        self._ttft = Histogram("pagedllm:time_to_first_token_seconds", "Time to first token.", labels,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._tpot = Histogram("pagedllm:time_per_output_token_seconds", "Mean time per output token after the "
                               "first, per request.", labels, buckets=_TPOT_BUCKETS, registry=r)
        self._e2e = Histogram("pagedllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._prompt_len = Histogram("pagedllm:request_prompt_tokens", "Prompt length per request.", labels,
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self._output_len = Histogram("pagedllm:request_generation_tokens", "Generated tokens per request.", labels,
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self._model_name = model_name
        # Create every series now, so a fresh server already exports zeros (dashboards, rate()).
        for metric in (self._prompt_tokens, self._generation_tokens, self._preemptions, self._prefix_queries,
                       self._prefix_hits, self._running,
                       self._waiting, self._kv_usage, self._prefix_hit, self._ttft, self._tpot, self._e2e,
                       self._prompt_len, self._output_len):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self._requests.labels(model_name, reason)
        self._counted: dict[str, int] = {}  # cumulative engine counts already added to each counter
        self._last_log = time.monotonic()
        self._last_log_tokens = (0, 0)

    def record_stats(self, stats) -> None:
        """Take an EngineStats (cumulative counts, current gauges) after a step."""
        m = self._model_name
        for name, counter in (("num_prompt_tokens", self._prompt_tokens),
                              ("num_generation_tokens", self._generation_tokens),
                              ("num_preemptions", self._preemptions),
                              ("prefix_cache_queries", self._prefix_queries),
                              ("prefix_cache_hits", self._prefix_hits)):
            total, already = getattr(stats, name), self._counted.get(name, 0)
            if total > already:
                counter.labels(m).inc(total - already)
                self._counted[name] = total
        self._running.labels(m).set(stats.num_running)
        self._waiting.labels(m).set(stats.num_waiting)
        self._kv_usage.labels(m).set(stats.kv_cache_usage)
        self._prefix_hit.labels(m).set(stats.prefix_cache_hit_rate)
        self._maybe_log(stats)

    def record_finished(self, request: FinishedRequest) -> None:
        m = self._model_name
        self._requests.labels(m, request.finish_reason).inc()
        self._prompt_len.labels(m).observe(request.num_prompt_tokens)
        self._output_len.labels(m).observe(request.num_generation_tokens)
        self._e2e.labels(m).observe(max(0.0, request.finished_time - request.arrival_time))
        if request.first_token_time is not None:
            self._ttft.labels(m).observe(max(0.0, request.first_token_time - request.arrival_time))
            if request.num_generation_tokens > 1:
                decode_time = max(0.0, request.finished_time - request.first_token_time)
                self._tpot.labels(m).observe(decode_time / (request.num_generation_tokens - 1))

    def record_rejected(self, status: int) -> None:
        self._rejected.labels(self._model_name, str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def _maybe_log(self, stats) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < _STATS_LOG_INTERVAL_S:
            return
        prompt, generation = stats.num_prompt_tokens, stats.num_generation_tokens
        last_prompt, last_generation = self._last_log_tokens
        logger.info("prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                    "KV cache %.1f%%, preemptions %d", (prompt - last_prompt) / elapsed,
                    (generation - last_generation) / elapsed, stats.num_running, stats.num_waiting,
                    100.0 * stats.kv_cache_usage, stats.num_preemptions)
        self._last_log = now
        self._last_log_tokens = (prompt, generation)
