"""The offline API: LLM(...).generate / chat / beam_search, in vLLM's shape."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from tqdm.auto import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 kv_cache_memory: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, block_size: int = 16, seed: int = 0,
                 enforce_eager: bool = False, load_format: str = "auto", skip_tokenizer_init: bool = False,
                 device: str = "auto", **kwargs: Any) -> None:
        args = EngineArgs(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory=kv_cache_memory,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          block_size=block_size, seed=seed, enforce_eager=enforce_eager, load_format=load_format,
                          skip_tokenizer_init=skip_tokenizer_init, device=device, **kwargs)
        self.llm_engine = LLMEngine(args, stream_outputs=False)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts: give one, "
                                 "or one per prompt.")
        return self._run(prompts, params_list, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given).")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools, tokenize=True, return_dict=False,
                **(chat_template_kwargs or {}))
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search over each prompt; the beams share KV blocks by reference count as they fork and drop."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        outputs = self._run(list(prompts), [params] * len(prompts), use_tqdm,
                            add=self.llm_engine.add_beam_search_request)
        results = []
        for output in outputs:
            sequences = [BeamSearchSequence(
                tokens=output.prompt_token_ids + c.token_ids, logprobs=[], cum_logprob=c.cumulative_logprob,
                score=c.cumulative_logprob / max(1, len(c.token_ids)) ** params.length_penalty, text=c.text,
                finish_reason=c.finish_reason) for c in output.outputs]
            results.append(BeamSearchOutput(sequences))
        return results

    def _run(self, prompts: list, params_list: list, use_tqdm: bool, add=None) -> list[RequestOutput]:
        engine = self.llm_engine
        add = add or engine.add_request
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = str(next(self._counter))
                add(request_id, prompt, params)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                engine.wait_for_work()
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]
