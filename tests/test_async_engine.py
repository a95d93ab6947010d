"""AsyncEngine on the real stories260K engine: streaming, concurrency, validation, aborts, a dying engine."""
from __future__ import annotations

import asyncio

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError
from pagedllm.sampling_params import SamplingParams
from tests.server_fixtures import STORIES_GREEDY, need_stories

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


def _make_engine() -> AsyncEngine:
    return AsyncEngine.from_engine_args(EngineArgs(model=need_stories(), device="cpu", kv_cache_memory=32 << 20))


@pytest.fixture(scope="module")
def engine():
    engine = _make_engine()
    yield engine
    engine.shutdown()


def _blocks_free(engine: AsyncEngine) -> bool:
    async def check():
        return await engine.run_in_engine_thread(
            lambda e: e.kv_cache.pool.num_free_blocks == e.kv_cache.num_blocks and not e.has_unfinished_requests())
    return asyncio.run(check())


async def _collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id: str):
    outputs = [out async for out in engine.generate(prompt, params, request_id)]
    return outputs


def test_generate_streams_cumulative_outputs(engine):
    outputs = asyncio.run(_collect(engine, "Once upon a time", GREEDY, "a"))
    texts = [o.outputs[0].text for o in outputs]
    assert texts[-1] == STORIES_GREEDY
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert len(outputs) > 1  # it streamed
    assert _blocks_free(engine)


def test_concurrent_requests_match_single(engine):
    prompts = ["Once upon a time", "Lily and Tom went to the park", "The cat", "One day"]

    async def run_all():
        return await asyncio.gather(*[_collect(engine, prompts[i % 4], GREEDY, f"c{i}") for i in range(32)])

    alone = [asyncio.run(_collect(engine, p, GREEDY, f"alone{i}"))[-1].outputs[0].token_ids
             for i, p in enumerate(prompts)]
    together = asyncio.run(run_all())
    for i, outputs in enumerate(together):
        assert outputs[-1].outputs[0].token_ids == alone[i % 4]
    assert _blocks_free(engine)


def test_bad_requests_raise_to_the_caller_only(engine):
    async def run():
        with pytest.raises(ValueError, match="512"):
            await engine.add_request("long", "a " * 600, GREEDY)
        with pytest.raises(ValueError, match="out of range"):
            await engine.add_request("bad-ids", [1, 99999], GREEDY)
        stream = await engine.add_request("dup", "Once upon a time", GREEDY)
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("dup", "Once upon a time", GREEDY)
        outputs = [out async for out in stream]
        return outputs[-1].outputs[0].text

    assert asyncio.run(run()) == STORIES_GREEDY
    assert engine.is_healthy and not engine.errored
    assert _blocks_free(engine)


def test_consumer_leaving_early_aborts_and_frees_blocks(engine):
    async def run():
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        agen = engine.generate("Once upon a time", long, "leaver")
        first = await agen.__anext__()
        await agen.aclose()
        stats = await engine.get_stats()
        return first, stats

    first, stats = asyncio.run(run())
    assert not first.finished
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert _blocks_free(engine)


def test_abort_ends_the_stream_with_abort(engine):
    async def run():
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = await engine.add_request("aborted", "Once upon a time", long)
        outputs = []
        async for out in stream:
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort("aborted")
        return outputs

    outputs = asyncio.run(run())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert 0 < len(outputs[-1].outputs[0].token_ids) < 400
    assert _blocks_free(engine)


def test_metrics_follow_the_requests(engine):
    before = engine.metrics.render().decode()
    asyncio.run(_collect(engine, "Once upon a time", GREEDY, "metrics"))
    after = engine.metrics.render().decode()

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name)]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert value(after, "pagedllm:generation_tokens_total") - value(before, "pagedllm:generation_tokens_total") == 40
    assert value(after, "pagedllm:e2e_request_latency_seconds_count") > value(
        before, "pagedllm:e2e_request_latency_seconds_count")


def test_a_failing_step_kills_the_engine_and_fails_streams():
    engine = _make_engine()
    llm_engine = engine.engine
    real_step = llm_engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_step()

    llm_engine.step = failing_step  # fault injection into the real engine

    async def run():
        stream = await engine.add_request("doomed", "Once upon a time", GREEDY)
        with pytest.raises(EngineDeadError, match="injected failure"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("after", "Once upon a time", GREEDY)

    try:
        asyncio.run(run())
        assert engine.errored and not engine.is_healthy
    finally:
        engine.shutdown()


def test_shutdown_refuses_new_requests():
    engine = _make_engine()
    engine.shutdown()
    assert not engine.is_healthy

    async def run():
        with pytest.raises(EngineDeadError, match="shut down"):
            await engine.add_request("x", "Once upon a time", GREEDY)

    asyncio.run(run())
