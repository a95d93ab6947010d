"""One sampler for the whole batch, on the model's device: penalties, temperature, min_p, top_k, top_p, seeds,
min_tokens, and top-k logprobs of the raw model output. No Python loop over requests except one per seeded row.

On CUDA, given per-row seeds, the draw itself (temperature, softmax, random choice, greedy argmax) is one fused
Triton kernel (triton_sample.py), as is the argmax of an all-greedy batch; elsewhere it is torch code: inverse-CDF
sampling with torch generators."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor | None  # float32 [B]; greedy rows hold 1.0 (unused); may be None if all_greedy
    greedy: torch.Tensor | None  # bool [B]; may be None if all_greedy
    all_greedy: bool
    any_greedy: bool = True
    top_k: torch.Tensor | None = None  # int64 [B]; vocab_size where disabled
    top_p: torch.Tensor | None = None  # float32 [B]
    min_p: torch.Tensor | None = None  # float32 [B]
    presence_penalty: torch.Tensor | None = None  # float32 [B] (all three set together, or None)
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    prompt_token_ids: torch.Tensor | None = None  # int64 [B, P], padded with vocab_size
    output_token_ids: torch.Tensor | None = None  # int64 [B, O], padded with vocab_size
    banned_token_ids: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, ids) for min_tokens
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> the request's own generator
    max_num_logprobs: int | None = None  # the largest logprobs asked for in the batch
    # int64 [B] on the logits' device: this step's per-row Philox seed; set by the runner on CUDA, where the fused
    # kernel samples (generators are then unused)
    seeds: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B]
    sampled_logprobs: torch.Tensor | None = None  # float32 [B]: logprob of the sampled token
    sampled_ranks: torch.Tensor | None = None  # int64 [B]: its rank (1 = most likely)
    top_logprobs: torch.Tensor | None = None  # float32 [B, k]
    top_token_ids: torch.Tensor | None = None  # int64 [B, k]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt + output tokens (divide positive logits, multiply negative),
    frequency (times count) and presence (once) over output tokens only."""
    batch, vocab = logits.shape
    output_counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=logits.device)
    output_counts.scatter_add_(1, meta.output_token_ids, torch.ones_like(meta.output_token_ids, dtype=logits.dtype))
    output_counts = output_counts[:, :vocab]
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, meta.prompt_token_ids, True)
    seen = seen[:, :vocab] | (output_counts > 0)
    rep = meta.repetition_penalty[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalty[:, None] * output_counts
    return logits - meta.presence_penalty[:, None] * (output_counts > 0).to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).clamp(max=logits.shape[1] - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = mass_before > top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator],
                  default_generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform number per row, located in the row's cumulative distribution. A seeded row
    draws its number from its own generator, so its tokens do not depend on the rest of the batch."""
    uniform = torch.rand(probs.shape[0], 1, generator=default_generator, device=probs.device)
    for row, generator in generators.items():
        uniform[row] = torch.rand(1, generator=generator, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    return tokens.clamp_(max=probs.shape[1] - 1).squeeze(1)


class Sampler:
    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # the fused kernel: given seeds, or for a batch of greedy rows only (argmax_rows)
        fused = logits.is_cuda and (meta.seeds is not None or meta.all_greedy)
        filtered = not meta.all_greedy and (meta.min_p is not None or meta.top_k is not None
                                            or meta.top_p is not None)
        if not fused or filtered or meta.banned_token_ids or meta.repetition_penalty is not None:
            logits = logits.float()
        if fused:
            from pagedllm.sampling.triton_sample import argmax_rows, gumbel_sample  # triton: the CUDA path only
        raw_logprobs = logits.float().log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        for row, token_ids in meta.banned_token_ids:
            logits[row, token_ids] = float("-inf")
        if meta.repetition_penalty is not None:
            logits = apply_penalties(logits, meta)
        if meta.all_greedy:
            tokens = argmax_rows(logits) if fused else logits.argmax(dim=-1)
        elif fused and not filtered:
            tokens = gumbel_sample(logits, meta.temperature, meta.greedy, meta.seeds)
        else:
            greedy_tokens = logits.argmax(dim=-1) if meta.any_greedy else None
            logits = logits / meta.temperature[:, None]
            if meta.min_p is not None:
                logits = apply_min_p(logits, meta.min_p)
            if meta.top_k is not None or meta.top_p is not None:
                logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
            if fused:
                tokens = gumbel_sample(logits, torch.ones_like(meta.temperature), meta.greedy, meta.seeds)
            else:
                tokens = random_sample(logits.softmax(dim=-1), meta.generators, self.default_generator)
            if greedy_tokens is not None:
                tokens = torch.where(meta.greedy, greedy_tokens, tokens)
        output = SamplerOutput(token_ids=tokens)
        if raw_logprobs is not None:
            output.sampled_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0]
            output.sampled_ranks = (raw_logprobs > output.sampled_logprobs[:, None]).sum(dim=-1) + 1
            if meta.max_num_logprobs > 0:
                output.top_logprobs, output.top_token_ids = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)
        return output
