"""The hardware's limit for a workload: measured ceilings (copy bandwidth, bf16 matmul rate) and a lower bound on
the time of a batch workload (prefill at the matmul rate; each decode step at least max(bytes / bandwidth,
flops / matmul rate), bytes = all weights + the KV cache of every active sequence)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.config import ModelConfig


@dataclass
class Ceilings:
    bandwidth: float  # bytes / s (read + write counted)
    matmul_flops: float  # flop / s, bf16


def measure_ceilings(device: torch.device) -> Ceilings:
    if device.type != "cuda":
        return _measure_cpu()
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_s = _time_cuda(lambda: y.copy_(x))
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_s = _time_cuda(lambda: a @ b)
    return Ceilings(bandwidth=2 * (2 << 30) / copy_s, matmul_flops=2 * 8192 ** 3 / mm_s)


def _time_cuda(fn, warmup: int = 3, repeat: int = 10) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _measure_cpu() -> Ceilings:
    import time
    x = torch.empty(256 << 20, dtype=torch.uint8)
    y = torch.empty_like(x)
    y.copy_(x)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    copy_s = (time.perf_counter() - start) / 5
    a = torch.randn(1024, 1024)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    mm_s = (time.perf_counter() - start) / 5
    return Ceilings(bandwidth=2 * x.numel() / copy_s, matmul_flops=2 * 1024 ** 3 / mm_s)


def model_sizes(cfg: ModelConfig, dtype_bytes: int) -> tuple[float, float, float]:
    """(weight bytes, matmul flops per token, KV bytes per token)."""
    h, inter, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    embed = cfg.vocab_size * h
    params = L * per_layer + embed + (0 if cfg.tie_word_embeddings else embed)
    flops_per_token = 2 * (L * per_layer + embed)  # the embedding lookup is free; lm_head is a matmul
    return params * dtype_bytes, flops_per_token, 2 * L * kv * dtype_bytes


def decode_read_bytes(cfg: ModelConfig, dtype_bytes: int) -> float:
    """The weight bytes a decode step reads: all weights but an untied input embedding table, of which a step reads
    only its tokens' rows. The roofline counts all weights (../shared/design.md); this is the stricter figure."""
    untied_embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * dtype_bytes
    return model_sizes(cfg, dtype_bytes)[0] - untied_embedding


def workload_bound_seconds(cfg: ModelConfig, prompt_lens: list[int], output_lens: list[int], ceilings: Ceilings,
                           dtype_bytes: int = 2, max_num_seqs: int = 256, weight_bytes: float | None = None,
                           overlap: bool = True) -> float:
    """Lower bound on the workload's time with every request admitted as early as max_num_seqs allows. A decode
    step moves weight_bytes (default: all weights, as design.md defines it; decode_read_bytes() is stricter).
    overlap=False bounds an engine that reads the KV cache (attention) and runs the matmuls one after the other,
    each at its ceiling: a step takes KV bytes / bandwidth + max(weight bytes / bandwidth, flops / matmul rate)
    instead of max(all bytes / bandwidth, flops / matmul rate)."""
    all_weight_bytes, flops_per_token, kv_per_token = model_sizes(cfg, dtype_bytes)
    weight_bytes = all_weight_bytes if weight_bytes is None else weight_bytes
    attn_flops_per_ctx = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # q.k and p.v per context token
    total = 0.0
    for start in range(0, len(prompt_lens), max_num_seqs):
        prompts, outputs = prompt_lens[start:start + max_num_seqs], output_lens[start:start + max_num_seqs]
        prefill_flops = sum(p * flops_per_token + attn_flops_per_ctx * p * p / 2 for p in prompts)
        total += prefill_flops / ceilings.matmul_flops
        for step in range(1, max(outputs)):  # the first token comes from prefill
            active = [(p, o) for p, o in zip(prompts, outputs) if o > step]
            ctx = sum(p + step for p, _ in active)
            kv_bytes = ctx * kv_per_token
            flops = len(active) * flops_per_token + attn_flops_per_ctx * ctx
            if overlap:
                total += max((weight_bytes + kv_bytes) / ceilings.bandwidth, flops / ceilings.matmul_flops)
            else:
                total += kv_bytes / ceilings.bandwidth + max(weight_bytes / ceilings.bandwidth,
                                                             flops / ceilings.matmul_flops)
    return total
