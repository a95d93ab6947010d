"""Plumbing shared by the completion endpoints: merging request streams, disconnects, SSE, logprobs."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from pydantic import BaseModel

from pagedllm.engine.async_engine import EngineDeadError, RequestStream
from pagedllm.outputs import CompletionOutput, Logprob
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob, Usage

logger = logging.getLogger(__name__)

_DONE = object()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """(index of the stream, output) from several streams as they come; an error in one is raised."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def abort_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def abort_on_disconnect(raw_request, streams: list[RequestStream]) -> None:
    """Abort the streams when the client goes away (run as a task; cancel it when the response is done)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            if any(not s.finished for s in streams):
                logger.info("client disconnected: aborting %s", ", ".join(s.request_id for s in streams))
            abort_all(streams)
            return


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_body(events: AsyncIterator[str], streams: list[RequestStream], raw_request) -> AsyncIterator[str]:
    """A streamed response: the endpoint's events, then [DONE]. A dead engine ends it with a 503 error event;
    the client leaving, or the end of the response, aborts the requests (freeing their blocks)."""
    watcher = asyncio.create_task(abort_on_disconnect(raw_request, streams))
    try:
        async for event in events:
            yield event
        yield SSE_DONE
    except EngineDeadError as error:
        yield sse(engine_dead(error).body())
        yield SSE_DONE
    finally:
        watcher.cancel()
        abort_all(streams)
        await events.aclose()


def engine_dead(error: EngineDeadError) -> APIError:
    return APIError(503, f"The engine failed while serving this request: {error}", code="engine_dead")


def usage(num_prompt: int, num_generated: int) -> Usage:
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_generated, total_tokens=num_prompt + num_generated)


def token_text(token_id: int, logprob: Logprob, tokenizer) -> str:
    if logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(completion: CompletionOutput, start: int, end: int, text_offset: int,
                        tokenizer) -> CompletionLogprobs:
    """The legacy completions logprobs of generated positions [start, end), offsets from text_offset."""
    out = CompletionLogprobs()
    entries = completion.logprobs or []
    for position in range(start, min(end, len(entries))):
        token_id = completion.token_ids[position]
        entry = entries[position]
        sampled = entry.get(token_id)
        text = token_text(token_id, sampled, tokenizer) if sampled else tokenizer.decode([token_id])
        out.tokens.append(text)
        out.token_logprobs.append(_finite(sampled.logprob) if sampled else None)
        out.top_logprobs.append({token_text(t, lp, tokenizer): _finite(lp.logprob) for t, lp in entry.items()})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(completion: CompletionOutput, start: int, end: int, top_k: int,
                  tokenizer) -> list[ChatTokenLogprob]:
    """Chat logprobs of generated positions [start, end): the sampled token and the top_k most likely."""
    out = []
    entries = completion.logprobs or []
    for position in range(start, min(end, len(entries))):
        token_id = completion.token_ids[position]
        entry = entries[position]
        sampled = entry.get(token_id)
        text = token_text(token_id, sampled, tokenizer) if sampled else tokenizer.decode([token_id])
        ranked = sorted(((lp.rank if lp.rank is not None else 1 << 30, t, lp) for t, lp in entry.items()),
                        key=lambda item: item[0])
        tops = [TopLogprob(token=token_text(t, lp, tokenizer), logprob=_finite(lp.logprob),
                           bytes=list(token_text(t, lp, tokenizer).encode()))
                for _, t, lp in ranked[:top_k]]
        out.append(ChatTokenLogprob(token=text, logprob=_finite(sampled.logprob) if sampled else -9999.0,
                                    bytes=list(text.encode()), top_logprobs=tops))
    return out


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number. -9999 is what OpenAI-compatible servers use.
    return max(float(value), -9999.0)
