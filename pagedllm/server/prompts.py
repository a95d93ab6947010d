"""Prompts for the engine: tokenization and chat templating, off the event loop, with length checks.

The server tokenizes itself (with its own tokenizer copy, in one worker thread) so that it can check lengths
against max_model_len and tokenize chat prompts without adding a second BOS: chat templates write their own.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from typing import Any

from pagedllm.engine.detokenizer import check_unicode
from pagedllm.server.errors import bad_request
from pagedllm.server.protocol import ChatMessage, ChatCompletionRequest

logger = logging.getLogger(__name__)


class PromptProcessor:
    def __init__(self, tokenizer, max_model_len: int, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chat_template = load_chat_template(chat_template)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedllm-tokenizer")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _need_tokenizer(self, param: str) -> None:
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer (skip_tokenizer_init): give prompts as token ids.",
                              param=param)

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        self._need_tokenizer(param)
        if not text:
            raise bad_request("the prompt is empty.", param=param)
        _check_unicode(text, param)
        return await self._run(lambda: list(self.tokenizer(text).input_ids))

    async def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return await self._run(lambda: self.tokenizer.decode(token_ids))

    async def render_chat(self, request: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The chat prompt as text and as token ids (the template's own special tokens, no extra BOS)."""
        self._need_tokenizer("messages")
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise bad_request("this model has no chat template: use /v1/completions, or start the server with "
                              "--chat-template.", param="messages", code="no_chat_template")
        if request.add_generation_prompt and request.continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both be true.",
                              param="continue_final_message")
        messages = [_template_message(m, i) for i, m in enumerate(request.messages)]
        if request.continue_final_message and messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs the last message to be the assistant's.",
                              param="continue_final_message")
        kwargs = dict(request.chat_template_kwargs or {})
        for reserved in ("conversation", "chat_template", "tokenize", "add_generation_prompt",
                         "continue_final_message"):
            if reserved in kwargs:
                raise bad_request(f"chat_template_kwargs may not set {reserved!r}.", param="chat_template_kwargs")

        def render() -> tuple[str, list[int]]:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=False,
                    add_generation_prompt=request.add_generation_prompt,
                    continue_final_message=request.continue_final_message, **kwargs)
            except Exception as error:  # noqa: BLE001 - jinja raises whatever the template raises
                raise bad_request(f"could not apply the chat template: {error}", param="messages") from error
            _check_unicode(text, "messages")
            return text, list(self.tokenizer(text, add_special_tokens=False).input_ids)

        return await self._run(render)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str,
                     max_tokens_param: str = "max_tokens", where: str = "") -> None:
        """Refuse prompts that leave no room for output, and prompt + max_tokens beyond the context."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise bad_request(f"{where}This model's maximum context length is {limit} tokens, but the prompt has "
                              f"{num_prompt_tokens} tokens: it must be at most {limit - 1} tokens to leave room "
                              "for output.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise bad_request(f"{where}This model's maximum context length is {limit} tokens, but "
                              f"{num_prompt_tokens} prompt tokens + {max_tokens} {max_tokens_param} = "
                              f"{num_prompt_tokens + max_tokens} tokens were asked for: lower "
                              f"{max_tokens_param} or shorten the prompt.", param=max_tokens_param,
                              code="context_length_exceeded")

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def _check_unicode(text: str, param: str) -> None:
    try:
        check_unicode(text, param)
    except ValueError as error:
        raise bad_request(str(error), param=param) from None


def _template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"content part type {part.type!r} is not supported (only 'text' parts with "
                                  "a 'text' field).", param=f"messages[{index}].content[{j}]")
            texts.append(part.text)
        content = "\n".join(texts)
    if content is None and message.role != "assistant":
        raise bad_request(f"a {message.role} message needs content.", param=f"messages[{index}].content")
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": content or ""}
    for key in ("name", "tool_call_id", "tool_calls"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    return out


def load_chat_template(template: str | None) -> str | None:
    """A chat template given as a file path or as the Jinja text itself."""
    if template is None:
        return None
    if os.path.isfile(template):
        with open(template) as f:
            return f.read()
    if "{" not in template:
        raise ValueError(f"chat template {template!r} is neither a file nor a Jinja template.")
    return template
