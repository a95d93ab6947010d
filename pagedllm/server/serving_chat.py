"""POST /v1/chat/completions: messages through the model's chat template, n choices, streamed as deltas or not."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.engine.async_engine import EngineDeadError, RequestStream
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.server.context import ServerContext
from pagedllm.server.errors import engine_value_error
from pagedllm.server.params import chat_sampling_params, structured_param
from pagedllm.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                      ChatCompletionResponse, ChatLogprobs, ChatResponseMessage, DeltaMessage, Usage)
from pagedllm.server.streams import abort_on_disconnect, chat_logprobs, engine_dead, sse, sse_body, usage


async def create_chat_completion(ctx: ServerContext, request: ChatCompletionRequest, raw_request):
    arrival_time = time.time()
    ctx.check_alive()
    ctx.check_model(request.model)
    params = chat_sampling_params(request)
    max_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    text, token_ids = await ctx.prompts.render_chat(request)
    ctx.prompts.check_length(len(token_ids), params.max_tokens, "messages", max_param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    names = {name: name for name in SamplingParams.__dataclass_fields__}
    names.update(max_tokens=max_param, logprobs="top_logprobs", structured_outputs=structured_param(request))
    try:
        stream = await ctx.engine.add_request(request_id, {"prompt": text, "prompt_token_ids": token_ids}, params,
                                              arrival_time)
    except ValueError as error:
        raise engine_value_error(error, names, "messages") from error
    if request.stream:
        return StreamingResponse(sse_body(_stream(ctx, request, params, stream, len(token_ids)), [stream],
                                          raw_request), media_type="text/event-stream")
    watcher = asyncio.create_task(abort_on_disconnect(raw_request, [stream]))
    final = None
    try:
        async for output in stream:
            final = output
    except EngineDeadError as error:
        raise engine_dead(error) from error
    finally:
        watcher.cancel()
        stream.abort()
    return JSONResponse(_response(ctx, params, request_id, final).model_dump())


def _response(ctx: ServerContext, params: SamplingParams, request_id: str,
              output: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for completion in output.outputs:
        logprobs = None
        if params.logprobs is not None:
            logprobs = ChatLogprobs(content=chat_logprobs(completion, 0, len(completion.token_ids), params.logprobs,
                                                          ctx.prompts.tokenizer))
        choices.append(ChatChoice(index=completion.index, message=ChatResponseMessage(content=completion.text),
                                  logprobs=logprobs, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason))
    return ChatCompletionResponse(id=request_id, model=ctx.served_model_name, choices=choices,
                                  usage=usage(len(output.prompt_token_ids),
                                              sum(len(c.token_ids) for c in output.outputs)))


async def _stream(ctx: ServerContext, request: ChatCompletionRequest, params: SamplingParams, stream: RequestStream,
                  num_prompt: int) -> AsyncIterator[str]:
    created = int(time.time())
    sent_text = [0] * params.n
    sent_tokens = [0] * params.n
    finished: set[int] = set()

    def chunk(choices: list[ChatChunkChoice], usage_: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=stream.request_id, created=created, model=ctx.served_model_name,
                                   choices=choices, usage=usage_).model_dump()
        for choice in body["choices"]:  # OpenAI's deltas carry only the keys that are set
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(body)

    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(params.n)])
    async for output in stream:
        choices = []
        for completion in output.outputs:
            i = completion.index
            if i in finished:
                continue
            delta = completion.text[sent_text[i]:]
            new_tokens = len(completion.token_ids)
            if not delta and new_tokens == sent_tokens[i] and completion.finish_reason is None:
                continue
            logprobs = None
            if params.logprobs is not None:
                logprobs = ChatLogprobs(content=chat_logprobs(completion, sent_tokens[i], new_tokens,
                                                              params.logprobs, ctx.prompts.tokenizer))
            sent_text[i], sent_tokens[i] = len(completion.text), new_tokens
            if completion.finish_reason is not None:
                finished.add(i)
            choices.append(ChatChunkChoice(index=i, delta=DeltaMessage(content=delta), logprobs=logprobs,
                                           finish_reason=completion.finish_reason,
                                           stop_reason=completion.stop_reason))
        if choices:
            yield chunk(choices)
    if request.stream_options is not None and request.stream_options.include_usage:
        yield chunk([], usage(num_prompt, sum(sent_tokens)))
