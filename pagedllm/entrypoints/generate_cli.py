"""`pagedllm generate`: offline generation from the command line."""
from __future__ import annotations

import argparse
import logging


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options with vLLM's flag names (shared by generate and bench throughput)."""
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV cache (CPU default: 2 GiB)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each step before the previous one's tokens reach the host (default: on CUDA)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, seed=args.seed, enforce_eager=args.enforce_eager,
                load_format=args.load_format, device=args.device, enable_prefix_caching=args.enable_prefix_caching,
                async_scheduling=args.async_scheduling)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text offline")
    parser.add_argument("--model", required=True, help="a Hugging Face model directory or .gguf file")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--ignore-eos", action="store_true")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                seed=args.sampling_seed, stop=args.stop, max_tokens=args.max_tokens,
                                ignore_eos=args.ignore_eos)
        llm = LLM(args.model, **engine_kwargs(args))
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
        else:
            outputs = llm.generate(args.prompt, params, use_tqdm=False)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    for prompt, output in zip(args.prompt, outputs):
        for completion in output.outputs:
            print(f"--- prompt: {prompt!r} (sequence {completion.index}, {completion.finish_reason})")
            print(prompt + completion.text if not args.chat else completion.text)
    return 0
