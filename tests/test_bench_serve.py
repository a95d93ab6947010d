"""`pagedllm bench serve` against a real test server: the report, the JSON, and the metric arithmetic."""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
import types

import pytest

from pagedllm.bench import serving
from pagedllm.bench.serving import (RequestResult, parse_goodput, percentile, random_requests, run_benchmark,
                                    summarize)
from pagedllm.cli import main
from tests.conftest import QWEN3_TOKENIZER
from tests.server_fixtures import ServerThread, need_stories


@pytest.fixture(scope="module")
def server():
    server = ServerThread(need_stories(), served_model_name="stories")
    yield server
    server.stop()


def test_run_benchmark_counts_every_token(server):
    result = run_benchmark(server.base_url, "stories", need_stories(), num_prompts=12, random_input_len=30,
                           random_output_len=16, request_rate=math.inf, goodput=["ttft:60000", "e2el:60000"],
                           percentiles=[50, 99], disable_tqdm=True)
    assert result["completed"] == 12 and result["failed"] == 0 and not result["errors"]
    assert result["total_output_tokens"] == 12 * 16  # ignore_eos + max_tokens: every output is as long as asked
    assert result["total_input_tokens"] >= 12 * 30
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # generous SLOs: all good
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"median_{name}_ms"] <= result[f"p99_{name}_ms"] + 1e-9
    assert result["mean_ttft_ms"] < result["mean_e2el_ms"]
    assert len(result["per_request"]) == 12
    assert all(len(r["itl"]) >= 1 for r in result["per_request"])
    assert server.wait_idle()


def test_cli_report_and_json(server, tmp_path, capsys):
    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as exited:
        main(["bench", "serve", "--base-url", server.base_url, "--tokenizer", need_stories(), "--num-prompts", "8",
              "--random-input-len", "20", "--random-output-len", "10", "--random-range-ratio", "0.5",
              "--request-rate", "40", "--burstiness", "0.5", "--max-concurrency", "4", "--goodput", "ttft:0.001",
              "--disable-tqdm", "--save-result", "--result-filename", str(out)])
    assert exited.value.code == 0
    report = capsys.readouterr().out
    for line in ("Serving Benchmark Result", "Successful requests:", "Request goodput (req/s):",
                 "Output token throughput (tok/s):", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):",
                 "Mean E2EL (ms):"):
        assert line in report
    saved = json.loads(out.read_text())
    assert saved["completed"] == 8 and saved["model"] == "stories"  # the model name came from /v1/models
    assert saved["request_goodput"] == 0.0  # a 1-microsecond TTFT SLO is never met
    assert saved["burstiness"] == 0.5 and saved["max_concurrency"] == 4


def test_cli_errors_are_reported(server, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "serve", "--base-url", server.base_url, "--tokenizer", need_stories(),
              "--goodput", "latency:5", "--disable-tqdm"])
    assert exited.value.code == 2 and "goodput" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["bench", "serve", "--base-url", server.base_url, "--model", "not-served", "--tokenizer",
              need_stories(), "--num-prompts", "1", "--disable-tqdm"])
    assert exited.value.code == 2 and "404" in capsys.readouterr().out


def test_metric_arithmetic():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 99) == 0.0
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        parse_goodput(["ttft:-1"])
    results = [RequestResult(True, 10, 5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
               RequestResult(True, 10, 1, ttft=0.2, latency=0.2, itl=[]),
               RequestResult(False, error="HTTP 500")]
    figures = summarize(results, duration=2.0, goodput={"ttft": 150}, percentiles=[99])
    assert figures["completed"] == 2 and figures["failed"] == 1
    assert figures["mean_tpot_ms"] == pytest.approx(100.0)  # (500 - 100) / (5 - 1); one-token outputs have none
    assert figures["mean_itl_ms"] == pytest.approx(100.0)
    assert figures["request_goodput"] == pytest.approx(0.5)  # only the first meets ttft <= 150 ms
    assert figures["total_output_tokens"] == 6 and figures["output_throughput"] == pytest.approx(3.0)


def test_random_prompts_have_the_asked_lengths():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(need_stories())
    requests = random_requests(tokenizer, 20, 50, 7, range_ratio=0.2, seed=1)
    assert all(5 <= r.output_len <= 8 for r in requests)  # 7 * (1 -+ 0.2), rounded down
    assert all(40 - 2 <= r.prompt_len <= 60 + 2 for r in requests)
    assert len({r.output_len for r in requests}) > 1
    exact = random_requests(tokenizer, 10, 50, 7, seed=1)
    assert all(abs(r.prompt_len - 50) <= 2 and r.output_len == 7 for r in exact)
    assert [r.prompt for r in exact] == [r.prompt for r in random_requests(tokenizer, 10, 50, 7, seed=1)]


def _drawn_gaps(monkeypatch, count: int, rate: float, burstiness: float, seed: int = 0) -> list[float]:
    """The inter-arrival gaps serving._arrivals waits, recorded on their way to asyncio.sleep (which then yields
    without waiting, so that many thousands of arrivals take no time). Only the serving module's view of asyncio
    is changed: the test server's threads keep the real one."""
    gaps: list[float] = []

    async def recording_sleep(delay, *args, **kwargs):
        gaps.append(delay)
        await asyncio.sleep(0)

    monkeypatch.setattr(serving, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": recording_sleep}))

    async def consume() -> list[int]:
        return [index async for index in serving._arrivals(count, rate, burstiness, random.Random(seed))]

    assert asyncio.run(consume()) == list(range(count))
    return gaps


@pytest.mark.parametrize("rate", [4.0, 250.0])
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_are_gamma_with_the_asked_rate(monkeypatch, rate, burstiness):
    """Gaps are gamma(shape=burstiness, mean=1/rate): mean 1/rate whatever the burstiness, coefficient of variation
    1/sqrt(burstiness) (1 for Poisson arrivals; burstier below 1, more regular above)."""
    gaps = _drawn_gaps(monkeypatch, 20001, rate, burstiness)
    assert len(gaps) == 20000 and all(g > 0 for g in gaps)  # no wait after the last arrival
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.04)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)
    if burstiness == 1.0:  # exponential: P(gap < mean) = 1 - 1/e
        assert sum(g < 1 / rate for g in gaps) / len(gaps) == pytest.approx(1 - math.exp(-1), abs=0.01)


def test_arrivals_really_wait_and_infinite_rate_sends_all_at_once():
    """With the real asyncio.sleep: at a finite rate the arrivals are spread over about count/rate seconds, and
    other tasks run between them; at rate inf every arrival comes in the same event-loop turn (nothing awaited)."""
    async def arrival_times(count: int, rate: float) -> tuple[list[float], int]:
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        ticks = 0
        start = time.perf_counter()
        times = [time.perf_counter() - start async for _ in serving._arrivals(count, rate, 1.0, random.Random(0))]
        ticking.cancel()
        return times, ticks

    times, ticks = asyncio.run(arrival_times(1000, math.inf))
    assert len(times) == 1000 and ticks == 0
    rate = 40.0
    times, ticks = asyncio.run(arrival_times(41, rate))
    expected = sum(_replayed_gaps(40, rate))  # the same seeded draws: about 40 / rate = 1 s
    assert expected <= times[-1] <= expected + 0.5
    assert ticks >= 40


def _replayed_gaps(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(count)]


def test_qwen3_tokenizer_prompts_against_stories_with_tqdm(server, capsys):
    """Random prompts from the Qwen3 vocabulary (151,643 ids) against stories260K (512): prompts travel as text,
    so no id outside the served model's vocabulary is ever sent, and the input token counts are the server's
    (its own tokenizer's), not Qwen3's. The tqdm progress bar is on."""
    if not (QWEN3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("../shared/tokenizers/qwen3 is not here")
    from transformers import AutoTokenizer
    qwen3 = AutoTokenizer.from_pretrained(QWEN3_TOKENIZER)
    stories = AutoTokenizer.from_pretrained(need_stories())
    requests = random_requests(qwen3, 6, 16, 8, seed=0)
    assert all(isinstance(r.prompt, str) and r.prompt_len == 16 for r in requests)
    assert max(max(qwen3(r.prompt, add_special_tokens=False).input_ids) for r in requests) >= 512
    result = run_benchmark(server.base_url, None, str(QWEN3_TOKENIZER), num_prompts=6, random_input_len=16,
                           random_output_len=8, request_rate=math.inf, disable_tqdm=False)
    assert result["completed"] == 6 and result["failed"] == 0 and not result["errors"]
    assert result["model"] == "stories" and result["total_output_tokens"] == 6 * 8
    server_lens = [len(stories(r.prompt).input_ids) for r in requests]  # with the BOS the server adds
    assert [r["prompt_len"] for r in result["per_request"]] == server_lens
    assert result["total_input_tokens"] == sum(server_lens) > 6 * 16
    progress = capsys.readouterr().err
    assert "requests: 100%" in progress and "6/6" in progress
    assert server.wait_idle()
