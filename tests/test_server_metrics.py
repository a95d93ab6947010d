"""/metrics in Prometheus' format with counters that move, and clients that leave mid-request get their
requests aborted and their KV blocks freed."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_fixtures import ServerThread, need_stories

LONG = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    server = ServerThread(need_stories(), served_model_name="stories")
    yield server
    server.stop()


def _metrics(server: ServerThread) -> dict[str, float]:
    """Every sample of /metrics by name and labels (model_name left out)."""
    response = httpx.get(server.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _get(samples: dict[str, float], key: str) -> float:
    return samples.get(key, 0.0)


def test_metrics_parse_and_counters_move(server):
    before = _metrics(server)
    for name in ("pagedllm:num_requests_running{}", "pagedllm:num_requests_waiting{}",
                 "pagedllm:kv_cache_usage_perc{}"):
        assert name in before
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    assert httpx.post(server.base_url + "/v1/completions", json=body, timeout=30).status_code == 200
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stop": "Lily"}
    assert httpx.post(server.base_url + "/v1/completions", json=body, timeout=30).status_code == 200
    assert httpx.post(server.base_url + "/v1/completions", json={"prompt": 5}).status_code == 400
    after = _metrics(server)

    def delta(key: str) -> float:
        return _get(after, key) - _get(before, key)

    assert delta("pagedllm:request_finished_total{finished_reason=length}") == 1
    assert delta("pagedllm:request_finished_total{finished_reason=stop}") == 1
    assert delta("pagedllm:prompt_tokens_total{}") == 10
    assert delta("pagedllm:generation_tokens_total{}") >= 41
    assert delta("pagedllm:request_rejected_total{status=400}") == 1
    assert delta("pagedllm:time_to_first_token_seconds_count{}") == 2
    assert delta("pagedllm:time_per_output_token_seconds_count{}") == 2
    assert delta("pagedllm:e2e_request_latency_seconds_count{}") == 2
    assert delta("pagedllm:request_generation_tokens_sum{}") == delta("pagedllm:generation_tokens_total{}")
    assert _get(after, "pagedllm:num_requests_running{}") == 0
    assert _get(after, "pagedllm:kv_cache_usage_perc{}") == 0


def test_prefix_cache_counters(server):
    """Prompt tokens looked up and found in the prefix cache, counted as vLLM does (prefix_cache_queries/hits)."""
    prompt = [1] + [300 + i for i in range(39)]  # 40 tokens: two full blocks of 16, then 8 more
    before = _metrics(server)
    for _ in range(2):
        body = {"model": "stories", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        assert httpx.post(server.base_url + "/v1/completions", json=body, timeout=30).status_code == 200
    after = _metrics(server)

    def delta(key: str) -> float:
        return _get(after, key) - _get(before, key)

    assert delta("pagedllm:prefix_cache_queries_total{}") == 80
    # The first request finds nothing; the second finds the two full blocks of the first.
    assert delta("pagedllm:prefix_cache_hits_total{}") == 32
    stats = server.llm_engine.get_stats()
    assert stats.prefix_cache_hit_rate == stats.prefix_cache_hits / stats.prefix_cache_queries
    assert _get(after, "pagedllm:prefix_cache_hit_rate{}") == pytest.approx(stats.prefix_cache_hit_rate)


def _wait_for_abort(server: ServerThread, before: dict[str, float]) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _metrics(server)
        if _get(after, "pagedllm:request_finished_total{finished_reason=abort}") > _get(
                before, "pagedllm:request_finished_total{finished_reason=abort}"):
            return after
        time.sleep(0.05)
    raise AssertionError("the request was not aborted")


def test_client_disconnecting_mid_stream_aborts_the_request(server):
    before = _metrics(server)
    for path, body in (("/v1/completions", LONG),
                       ("/v1/completions", {**LONG, "prompt": ["Once upon a time", "The dog"], "n": 2})):
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", server.base_url + path, json={**body, "stream": True}) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                chunks = [next(lines) for _ in range(6)]
                assert any(c.startswith("data: {") for c in chunks)
            # leaving the block closes the connection with the generation far from done
        after = _wait_for_abort(server, before)
        assert server.wait_idle(), "KV blocks were not freed after the disconnect"
        after = _metrics(server)
        assert _get(after, "pagedllm:kv_cache_usage_perc{}") == 0
        assert _get(after, "pagedllm:num_requests_running{}") == 0
        before = after


def test_client_giving_up_on_a_non_streaming_request_aborts_it(server):
    before = _metrics(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    after = _wait_for_abort(server, before)
    assert _get(after, "pagedllm:generation_tokens_total{}") - _get(before, "pagedllm:generation_tokens_total{}") < 500
    assert server.wait_idle()


def test_client_giving_up_on_a_beam_search_aborts_every_beam(server):
    before = _metrics(server)
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 500, "n": 6, "use_beam_search": True,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    _wait_for_abort(server, before)
    # Within a step or two, not after the search's remaining hundreds of steps: every beam's blocks came back.
    assert server.wait_idle(timeout=1.0)


def test_chat_stream_disconnect_aborts(server):
    # stories260K has no chat template: this server needs one, so use a fresh one with a template
    from tests.server_fixtures import CHAT_TEMPLATE
    chat_server = ServerThread(need_stories(), served_model_name="stories", chat_template=CHAT_TEMPLATE)
    try:
        before = _metrics(chat_server)
        body = {"model": "stories", "messages": [{"role": "user", "content": "Once upon a time"}],
                "max_tokens": 450, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", chat_server.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            [next(lines) for _ in range(4)]
        _wait_for_abort(chat_server, before)
        assert chat_server.wait_idle()
    finally:
        chat_server.stop()


def test_preemptions_are_counted_and_gauges_move_under_load():
    """A KV cache of 12 blocks of 16 tokens: one 130-token request fits, four at once do not, so the scheduler
    preempts (and recomputes). /metrics counts the preemptions and shows requests running and waiting while they
    run; the outputs are still the greedy ones of the requests sent one at a time."""
    config = json.loads((Path(need_stories()) / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    block_bytes = 2 * config["num_hidden_layers"] * 16 * config["num_key_value_heads"] * head_dim * 4  # fp32
    server = ServerThread(need_stories(), served_model_name="stories", block_size=16,
                          kv_cache_memory=12 * block_bytes)
    try:
        assert server.llm_engine.kv_cache.num_blocks == 12
        prompts = ["Once upon a time", "Lily and Tom went to the park", "The dog", "One day, a bird"]

        def complete(prompt: str) -> str:
            body = {**LONG, "prompt": prompt, "max_tokens": 120}
            response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        start = _metrics(server)
        alone = [complete(p) for p in prompts]
        after_alone = _metrics(server)
        assert _get(after_alone, "pagedllm:num_preemptions_total{}") == _get(start, "pagedllm:num_preemptions_total{}")
        seen_running, seen_waiting, seen_usage = 0.0, 0.0, 0.0
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(complete, p) for p in prompts]
            while not all(f.done() for f in futures):
                samples = _metrics(server)
                seen_running = max(seen_running, _get(samples, "pagedllm:num_requests_running{}"))
                seen_waiting = max(seen_waiting, _get(samples, "pagedllm:num_requests_waiting{}"))
                seen_usage = max(seen_usage, _get(samples, "pagedllm:kv_cache_usage_perc{}"))
                time.sleep(0.02)
            together = [f.result() for f in futures]
        assert together == alone
        end = _metrics(server)
        assert _get(end, "pagedllm:num_preemptions_total{}") > _get(after_alone, "pagedllm:num_preemptions_total{}")
        assert seen_running >= 2 and seen_waiting >= 1 and seen_usage > 0.5
        assert server.wait_idle()
        idle = _metrics(server)
        assert _get(idle, "pagedllm:num_requests_running{}") == _get(idle, "pagedllm:num_requests_waiting{}") == 0
    finally:
        server.stop()
