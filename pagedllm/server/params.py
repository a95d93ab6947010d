"""From an OpenAI request to SamplingParams: defaults, structured-output constraints, unsupported fields."""
from __future__ import annotations

import logging

from pagedllm.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from pagedllm.server.errors import bad_request, engine_value_error
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingRequest

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def completion_sampling_params(request: CompletionRequest) -> SamplingParams:
    _refuse_unsupported(request)
    if request.suffix:
        raise bad_request("suffix is not supported.", param="suffix", code="unsupported")
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request("best_of is not supported (it must be equal to n when given).", param="best_of",
                          code="unsupported")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {request.logprobs}.",
                          param="logprobs")
    if request.echo and request.logprobs is not None:
        raise bad_request("echo together with logprobs needs prompt logprobs, which are not supported.",
                          param="echo", code="unsupported")
    return _build(request, request.max_tokens, request.logprobs, {"max_tokens": "max_tokens",
                                                                   "logprobs": "logprobs"})


def beam_search_params(request: CompletionRequest, params: SamplingParams) -> BeamSearchParams:
    """use_beam_search: n beams (each returned as a choice) ranked by cumulative log-probability over length **
    length_penalty. Sampling fields that beam search would not honour are refused, not ignored. A streamed beam
    search sends its beams when the search ends (before that, no beam is final)."""
    unsupported = {"temperature": request.temperature not in (None, 0), "top_p": params.top_p != 1.0,
                   "top_k": params.top_k > 0, "min_p": params.min_p != 0.0,
                   "repetition_penalty": params.repetition_penalty != 1.0,
                   "presence_penalty": params.presence_penalty != 0.0,
                   "frequency_penalty": params.frequency_penalty != 0.0, "stop": bool(params.stop),
                   "stop_token_ids": bool(params.stop_token_ids), "min_tokens": params.min_tokens > 0,
                   "logprobs": params.logprobs is not None, "structured_outputs": params.structured_outputs is not None}
    for name, is_set in unsupported.items():
        if is_set:
            raise bad_request(f"{name} cannot be used with use_beam_search (beam search is deterministic and "
                              "ranks beams by their log-probabilities).", param=name, code="unsupported")
    try:
        return BeamSearchParams(beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                                length_penalty=request.length_penalty)
    except ValueError as error:
        raise bad_request(str(error), param="length_penalty") from error


def chat_sampling_params(request: ChatCompletionRequest) -> SamplingParams:
    _refuse_unsupported(request)
    if request.tools and request.tool_choice != "none":
        raise bad_request("tool calling is not supported.", param="tools", code="unsupported")
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both.", param="max_completion_tokens")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true.", param="top_logprobs")
        if not 0 <= request.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {request.top_logprobs}.",
                              param="top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _build(request, max_tokens, logprobs, {"max_tokens": max_param, "logprobs": "top_logprobs"})


def _refuse_unsupported(request: _SamplingRequest) -> None:
    if request.logit_bias:
        raise bad_request("logit_bias is not supported.", param="logit_bias", code="unsupported")
    if request.model_extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))


def _build(request: _SamplingRequest, max_tokens: int | None, logprobs: int | None,
           renamed: dict[str, str]) -> SamplingParams:
    fields = {name: name for name in SamplingParams.__dataclass_fields__}
    fields.update(renamed, structured_outputs=structured_param(request))
    structured = structured_outputs(request)
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            min_p=0.0 if request.min_p is None else request.min_p,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            structured_outputs=structured,
        )
    except ValueError as error:
        raise engine_value_error(error, fields, "prompt") from error


def structured_outputs(request: _SamplingRequest) -> StructuredOutputsParams | None:
    """The one output constraint the request asks for (response_format, structured_outputs or guided_*)."""
    found: list[tuple[str, dict]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema.",
                              param="response_format.json_schema")
        found.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if request.structured_outputs is not None:
        unknown = sorted(set(request.structured_outputs) - set(_STRUCTURED_KEYS))
        if unknown:
            raise bad_request(f"structured_outputs has unknown keys {unknown}; use one of {list(_STRUCTURED_KEYS)}.",
                              param="structured_outputs")
        given = {k: v for k, v in request.structured_outputs.items() if v not in (None, False)}
        if not given:
            raise bad_request(f"structured_outputs needs one of {list(_STRUCTURED_KEYS)}.", param="structured_outputs")
        found.append(("structured_outputs", given))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        value = getattr(request, name)
        if value is not None:
            found.append((name, {key: value}))
    if not found:
        return None
    sources = [name for name, _ in found]
    if len(found) > 1 or len(found[0][1]) != 1:
        raise bad_request("give at most one output constraint (response_format, structured_outputs, guided_json, "
                          f"guided_regex, guided_choice, guided_grammar), got {_describe(found)}.",
                          param=sources[-1])
    try:
        return StructuredOutputsParams(**found[0][1])
    except (ValueError, TypeError) as error:
        raise bad_request(str(error), param=sources[0]) from error


def structured_param(request: _SamplingRequest) -> str:
    """The request field that carries the output constraint, named by errors about it (e.g. an invalid regex)."""
    if request.response_format is not None and request.response_format.type != "text":
        return "response_format"
    if request.structured_outputs is not None:
        return "structured_outputs"
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(request, name) is not None:
            return name
    return "structured_outputs"


def _describe(found: list[tuple[str, dict]]) -> str:
    return ", ".join(f"{name}.{key}" if name == "structured_outputs" else name
                     for name, given in found for key in (given or {"(empty)": None}))

