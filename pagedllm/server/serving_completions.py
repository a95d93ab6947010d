"""POST /v1/completions: one or many prompts (text or token ids), n choices each, streamed or not."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.engine.async_engine import EngineDeadError, RequestStream
from pagedllm.sampling_params import SamplingParams
from pagedllm.server.context import ServerContext
from pagedllm.server.errors import bad_request, engine_value_error
from pagedllm.server.params import beam_search_params, completion_sampling_params, structured_param
from pagedllm.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from pagedllm.server.streams import (abort_all, abort_on_disconnect, completion_logprobs, engine_dead, merge, sse,
                                     sse_body, usage)

_PARAM_NAMES = {name: name for name in SamplingParams.__dataclass_fields__}


async def create_completion(ctx: ServerContext, request: CompletionRequest, raw_request):
    arrival_time = time.time()
    ctx.check_alive()
    ctx.check_model(request.model)
    params = completion_sampling_params(request)
    engine_params = beam_search_params(request, params) if request.use_beam_search else params
    prompts = await _prompt_inputs(ctx, request, params)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            streams.append(await ctx.engine.add_request(f"{request_id}-{i}", prompt, engine_params, arrival_time))
    except ValueError as error:
        abort_all(streams)
        names = dict(_PARAM_NAMES, structured_outputs=structured_param(request))
        raise engine_value_error(error, names, "prompt") from error
    except BaseException:
        abort_all(streams)
        raise
    echo_texts = [await _echo_text(ctx, p) for p in prompts] if request.echo else None
    if request.stream:
        num_prompt = sum(len(p["prompt_token_ids"]) for p in prompts)
        return StreamingResponse(sse_body(_stream(ctx, request, params, request_id, streams, num_prompt, echo_texts),
                                          streams, raw_request), media_type="text/event-stream")
    watcher = asyncio.create_task(abort_on_disconnect(raw_request, streams))
    try:
        finals = {}
        async for index, output in merge(streams):
            finals[index] = output
    except EngineDeadError as error:
        raise engine_dead(error) from error
    finally:
        watcher.cancel()
        abort_all(streams)
    return JSONResponse(_response(ctx, request, params, request_id, finals, echo_texts).model_dump())


async def _prompt_inputs(ctx: ServerContext, request: CompletionRequest, params: SamplingParams) -> list[dict]:
    """Each prompt as the engine's {'prompt', 'prompt_token_ids'}, tokenized and length-checked."""
    prompt = request.prompt
    batched = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    if not prompt:
        raise bad_request("prompt must not be empty.", param="prompt")
    items: list = list(prompt) if batched else [prompt]
    inputs = []
    for i, item in enumerate(items):
        param = f"prompt[{i}]" if batched else "prompt"
        where = f"prompt[{i}]: " if batched else ""
        if isinstance(item, str):
            ids = await ctx.prompts.encode(item, param)
            inputs.append({"prompt": item, "prompt_token_ids": ids})
        else:
            if not item:
                raise bad_request("a token-id prompt must not be empty.", param=param)
            inputs.append({"prompt_token_ids": list(item)})
        ctx.prompts.check_length(len(inputs[-1]["prompt_token_ids"]), params.max_tokens, param, where=where)
    return inputs


async def _echo_text(ctx: ServerContext, prompt: dict) -> str:
    if "prompt" in prompt:
        return prompt["prompt"]
    return await ctx.prompts.decode(prompt["prompt_token_ids"])


def _response(ctx: ServerContext, request: CompletionRequest, params: SamplingParams, request_id: str,
              finals: dict, echo_texts: list[str] | None) -> CompletionResponse:
    choices = []
    num_prompt = num_generated = 0
    for index in sorted(finals):
        output = finals[index]
        num_prompt += len(output.prompt_token_ids)
        prefix = echo_texts[index] if echo_texts else ""
        for completion in output.outputs:
            num_generated += len(completion.token_ids)
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(completion, 0, len(completion.token_ids), len(prefix),
                                               ctx.prompts.tokenizer)
            choices.append(CompletionChoice(index=index * params.n + completion.index, text=prefix + completion.text,
                                            logprobs=logprobs, finish_reason=completion.finish_reason,
                                            stop_reason=completion.stop_reason))
    return CompletionResponse(id=request_id, model=ctx.served_model_name, choices=choices,
                              usage=usage(num_prompt, num_generated))


async def _stream(ctx: ServerContext, request: CompletionRequest, params: SamplingParams, request_id: str,
                  streams: list[RequestStream], num_prompt: int, echo_texts: list[str] | None) -> AsyncIterator[str]:
    created = int(time.time())
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    text_offset: dict[int, int] = {}
    finished: set[int] = set()

    def chunk(choices: list[CompletionChoice], usage_: Usage | None = None) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=ctx.served_model_name,
                                      choices=choices, usage=usage_))

    if echo_texts:
        yield chunk([CompletionChoice(index=i * params.n + j, text=text)
                     for i, text in enumerate(echo_texts) for j in range(params.n)])
        text_offset = {i * params.n + j: len(text) for i, text in enumerate(echo_texts) for j in range(params.n)}
    async for index, output in merge(streams):
        choices = []
        for completion in output.outputs:
            choice_index = index * params.n + completion.index
            if choice_index in finished:
                continue
            old_text, old_tokens = sent_text.get(choice_index, 0), sent_tokens.get(choice_index, 0)
            delta = completion.text[old_text:]
            new_tokens = len(completion.token_ids)
            if not delta and new_tokens == old_tokens and completion.finish_reason is None:
                continue
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(completion, old_tokens, new_tokens,
                                               text_offset.get(choice_index, 0), ctx.prompts.tokenizer)
                text_offset[choice_index] = text_offset.get(choice_index, 0) + sum(map(len, logprobs.tokens))
            sent_text[choice_index], sent_tokens[choice_index] = len(completion.text), new_tokens
            if completion.finish_reason is not None:
                finished.add(choice_index)
            choices.append(CompletionChoice(index=choice_index, text=delta, logprobs=logprobs,
                                            finish_reason=completion.finish_reason,
                                            stop_reason=completion.stop_reason))
        if choices:
            yield chunk(choices)
    if request.stream_options is not None and request.stream_options.include_usage:
        yield chunk([], usage(num_prompt, sum(sent_tokens.values())))
