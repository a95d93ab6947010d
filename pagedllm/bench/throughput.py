"""`pagedllm bench throughput`: offline throughput on the reference workload (design.md section 5), with the
roofline bound of the device and, optionally, Hugging Face transformers run side by side."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import time
from dataclasses import dataclass

from pagedllm.entrypoints.generate_cli import add_engine_args, engine_kwargs

logger = logging.getLogger(__name__)
REFERENCE_TOTAL_OUTPUT_TOKENS = 133_966


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def total_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_requests: int = 256, min_input: int = 100, max_input: int = 1024, min_output: int = 100,
                  max_output: int = 1024, vocab_limit: int = 10000, seed: int = 0) -> Workload:
    """The reference workload (nano-vllm's bench): all prompts first, then all output lengths."""
    random.seed(seed)
    prompts = [[random.randint(0, vocab_limit) for _ in range(random.randint(min_input, max_input))]
               for _ in range(num_requests)]
    max_tokens = [random.randint(min_output, max_output) for _ in range(num_requests)]
    return Workload(prompts, max_tokens)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("throughput", help="offline throughput on the reference workload")
    parser.add_argument("--model", required=True, help="model directory, or a directory holding only config.json "
                                                       "(benchmarks/configs/...) with --load-format dummy")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-input-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--min-output-len", type=int, default=100)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--vocab-limit", type=int, default=10000, help="token ids are drawn from [0, this]")
    parser.add_argument("--compare-hf", action="store_true", help="also run HF transformers on a subset")
    parser.add_argument("--hf-num-requests", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s ceiling (default: measured)")
    parser.add_argument("--matmul-flops", type=float, default=None, help="flop/s ceiling (default: measured)")
    parser.add_argument("--step-trace", action="store_true",
                        help="also print where the time went: steps by phase, each against its bound")
    parser.add_argument("--output-json", default=None)
    add_engine_args(parser)
    parser.set_defaults(func=run, max_model_len=4096)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result, workload, device = run_benchmark(args)
    print(format_result(result), flush=True)  # before the (slow) HF runs, so that a time limit keeps our figures
    if args.compare_hf:
        result.update(compare_hf_with(result, args, workload, device))
        print(format_hf(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def run_benchmark(args: argparse.Namespace) -> tuple[dict, Workload, object]:
    """Our run of the workload: (figures, the workload, the torch device it ran on); the engine is gone after."""
    import torch

    from pagedllm import LLM, SamplingParams
    from pagedllm.bench.roofline import Ceilings, decode_read_bytes, measure_ceilings, workload_bound_seconds
    from pagedllm.bench.step_trace import StepTrace

    kwargs = engine_kwargs(args)
    has_tokenizer = os.path.isfile(os.path.join(args.model, "tokenizer_config.json")) or args.tokenizer
    start = time.perf_counter()
    llm = LLM(args.model, skip_tokenizer_init=not has_tokenizer, **kwargs)
    ready_s = time.perf_counter() - start
    engine = llm.llm_engine
    vocab = engine.config.model.vocab_size
    workload = make_workload(args.num_requests, args.min_input_len, args.max_input_len, args.min_output_len,
                             args.max_output_len, min(args.vocab_limit, vocab - 1))
    sampling = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in workload.max_tokens]
    # Warm-up: the kernels' variants for the workload's shapes compile here, not inside the timed run (a cold
    # Triton cache added about 3 s to an 8B run on an H200). Reversed prompts: the same lengths, no prefix-cache hits.
    warm = [{"prompt_token_ids": [1, 2, 3]}] + [{"prompt_token_ids": p[::-1]} for p in workload.prompts[:8]]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    trace = None
    if args.step_trace:
        trace = StepTrace()
        trace.attach(engine.scheduler)
    _sync(engine)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=True)
    _sync(engine)
    elapsed = time.perf_counter() - start
    if trace is not None:
        trace.end = start + elapsed
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == workload.total_output_tokens, (generated, workload.total_output_tokens)
    device = engine.config.device
    measured = measure_ceilings(device)
    ceilings = Ceilings(args.bandwidth or measured.bandwidth, args.matmul_flops or measured.matmul_flops)
    dtype_bytes = torch.empty((), dtype=engine.config.dtype).element_size()
    bound = functools.partial(workload_bound_seconds, engine.config.model, [len(p) for p in workload.prompts],
                              workload.max_tokens, ceilings, dtype_bytes, args.max_num_seqs)
    bound_s = bound()
    read_bound_s = bound(weight_bytes=decode_read_bytes(engine.config.model, dtype_bytes))
    serial_bound_s = bound(overlap=False)
    result = dict(
        model=args.model, device=_device_name(device), dtype=str(engine.config.dtype), requests=args.num_requests,
        output_tokens=generated, reference_workload=generated == REFERENCE_TOTAL_OUTPUT_TOKENS,
        seconds=elapsed, output_tok_s=generated / elapsed, ready_s=ready_s,
        bandwidth_gb_s=ceilings.bandwidth / 1e9, matmul_tflops=ceilings.matmul_flops / 1e12,
        bound_tok_s=generated / bound_s, efficiency=bound_s / elapsed,
        read_bound_tok_s=generated / read_bound_s, read_efficiency=read_bound_s / elapsed,
        serial_bound_tok_s=generated / serial_bound_s, serial_efficiency=serial_bound_s / elapsed,
        preemptions=engine.scheduler.num_preemptions, kv_blocks=engine.kv_cache.num_blocks)
    if trace is not None:
        result["phases"] = trace.phases(engine.config.model, ceilings, dtype_bytes)
        result["first_steps"] = trace.first_steps()
    stats = engine.get_stats()
    result.update(kv_fragmentation=stats.kv_fragmentation, kv_waste_if_contiguous=stats.kv_waste_if_contiguous)
    return result, workload, device


def compare_hf_with(result: dict, args: argparse.Namespace, workload: Workload, device) -> dict:
    """HF transformers on a subset of the same workload, on the same device; adds the ratios to ours."""
    _free(device)
    out = compare_hf(args, workload, device)
    for key in ("hf_generate_tok_s", "hf_generate_batch_tok_s"):
        if out.get(key):
            out[key.replace("_tok_s", "_ratio")] = result["output_tok_s"] / out[key]
    return out


def compare_hf(args, workload: Workload, device) -> dict:
    """HF transformers on the first hf_num_requests requests: generate() in padded static batches, and its own
    continuous batching (generate_batch) where this transformers has it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedllm.config import EngineConfig, EngineArgs, ModelConfig

    n = min(args.hf_num_requests, len(workload.prompts))
    prompts, max_tokens = workload.prompts[:n], workload.max_tokens[:n]
    model_cfg = ModelConfig.from_path(args.model)
    dtype = EngineConfig.create(EngineArgs(model=args.model, dtype=args.dtype, device=args.device,
                                           max_model_len=args.max_model_len), model_cfg).dtype
    if args.load_format == "dummy":
        config = AutoConfig.from_pretrained(args.model)
        with torch.device(device):  # random init on the GPU: an 8B model's on the CPU takes minutes
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    model.eval()
    out = {"hf_requests": n, "hf_output_tokens": sum(max_tokens)}
    start = time.perf_counter()
    for i in range(0, n, args.hf_batch_size):
        batch, lens = prompts[i:i + args.hf_batch_size], max_tokens[i:i + args.hf_batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=True, temperature=0.6, top_p=1.0, top_k=0, pad_token_id=0)
    _free(device)
    out["hf_generate_tok_s"] = sum(max_tokens) / (time.perf_counter() - start)
    if hasattr(model, "generate_batch"):
        from transformers import GenerationConfig
        try:
            gen_cfg = GenerationConfig(max_new_tokens=max(max_tokens), do_sample=True, temperature=0.6, top_k=0,
                                       top_p=1.0, eos_token_id=-1, pad_token_id=0)
            start = time.perf_counter()
            results = model.generate_batch(inputs=prompts, generation_config=gen_cfg)
            _free(device)
            elapsed = time.perf_counter() - start
            generated = [len(getattr(r, "generated_tokens", None) or []) for r in results.values()]
            if len(results) != n or min(generated) == 0:
                raise RuntimeError(f"generate_batch returned {len(results)} results, {sum(generated)} tokens")
            # It takes one max_new_tokens for the whole batch: count what it generated.
            out["hf_generate_batch_tok_s"] = sum(generated) / elapsed
        except Exception as error:  # noqa: BLE001 - report, do not hide
            out["hf_generate_batch_error"] = f"{type(error).__name__}: {error}"
    return out


def _sync(engine) -> None:
    import torch
    if engine.config.device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import gc

    import torch
    gc.unfreeze()  # the engine froze its startup heap (LLMEngine): let the cycles of a finished engine go
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _device_name(device) -> str:
    import platform

    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_result(r: dict) -> str:
    lines = [f"model {r['model']} on {r['device']} ({r['dtype']}), ready in {r['ready_s']:.1f} s",
             f"requests {r['requests']}, output tokens {r['output_tokens']} "
             f"(reference workload: {'yes' if r['reference_workload'] else 'no'}), {r['seconds']:.2f} s",
             f"throughput {r['output_tok_s']:.0f} output tok/s; bound {r['bound_tok_s']:.0f} tok/s "
             f"(copy {r['bandwidth_gb_s']:.0f} GB/s, matmul {r['matmul_tflops']:.1f} TFLOP/s); "
             f"efficiency {100 * r['efficiency']:.1f}%; preemptions {r['preemptions']}",
             *([f"  on the bytes a decode step reads (all weights but the untied input embedding table): bound "
                f"{r['read_bound_tok_s']:.0f} tok/s; efficiency {100 * r['read_efficiency']:.1f}%"]
               if r.get("read_bound_tok_s", r["bound_tok_s"]) > r["bound_tok_s"] else []),
             *([f"  with attention's KV reads and the matmuls one after the other, each at its ceiling: bound "
                f"{r['serial_bound_tok_s']:.0f} tok/s ({100 * r['serial_bound_tok_s'] / r['bound_tok_s']:.1f}% of the "
                f"bound); efficiency {100 * r['serial_efficiency']:.1f}%"] if "serial_bound_tok_s" in r else []),
             f"KV waste: {100 * r['kv_fragmentation']:.1f}% of allocated slots empty (mean over steps); contiguous "
             f"reservation of max_model_len per sequence would leave {100 * r['kv_waste_if_contiguous']:.1f}% empty"]
    if r.get("phases"):
        from pagedllm.bench.step_trace import format_phases
        lines.append(format_phases(r["phases"], r.get("first_steps", ())))
    return "\n".join(lines)


def format_hf(r: dict) -> str:
    lines = []
    if "hf_generate_tok_s" in r:
        lines.append(f"HF generate (padded batches, {r['hf_requests']} requests): {r['hf_generate_tok_s']:.0f} tok/s "
                     f"-> pagedllm is {r['hf_generate_ratio']:.1f}x")
    if r.get("hf_generate_batch_tok_s"):
        lines.append(f"HF generate_batch (continuous batching): {r['hf_generate_batch_tok_s']:.0f} tok/s -> "
                     f"pagedllm is {r['hf_generate_batch_ratio']:.1f}x")
    if r.get("hf_generate_batch_error"):
        lines.append(f"HF generate_batch failed: {r['hf_generate_batch_error']}")
    return "\n".join(lines)
