"""`pagedllm bench latency`: single-request decode latency (ms per output token after the first) and its bound,
(all weight bytes + the KV cache) / memory bandwidth; and, where they differ, the bound on the bytes a step reads
(without an untied input embedding table)."""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

from pagedllm.entrypoints.generate_cli import add_engine_args, engine_kwargs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("latency", help="batch-1 decode latency")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--output-json", default=None)
    add_engine_args(parser)
    parser.set_defaults(func=run, max_model_len=4096, max_num_seqs=16)


def run(args: argparse.Namespace) -> int:
    import torch

    from pagedllm import LLM, SamplingParams
    from pagedllm.bench.roofline import decode_read_bytes, measure_ceilings, model_sizes

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    llm = LLM(args.model, skip_tokenizer_init=True, **engine_kwargs(args))
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": [(7 * i) % 1000 + 10 for i in range(args.input_len)]}
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    per_token = []
    for _ in range(args.num_iters):
        engine.kv_cache.pool.reset_cache()  # time the prefill too, not a cache hit
        start = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        end = time.perf_counter()
        first = out.metrics.first_token_time - out.metrics.arrival_time
        per_token.append((end - start - first) / (args.output_len - 1))
    device = engine.config.device
    ceilings = measure_ceilings(device)
    dtype_bytes = torch.empty((), dtype=engine.config.dtype).element_size()
    weight_bytes, _, kv_per_token = model_sizes(engine.config.model, dtype_bytes)
    mean_ctx = args.input_len + args.output_len / 2
    bound_s = (weight_bytes + mean_ctx * kv_per_token) / ceilings.bandwidth
    read_bound_s = (decode_read_bytes(engine.config.model, dtype_bytes) + mean_ctx * kv_per_token) / ceilings.bandwidth
    result = dict(model=args.model, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  input_len=args.input_len, output_len=args.output_len,
                  ms_per_token=1e3 * statistics.median(per_token), bound_ms_per_token=1e3 * bound_s,
                  bandwidth_gb_s=ceilings.bandwidth / 1e9)
    result["efficiency"] = result["bound_ms_per_token"] / result["ms_per_token"]
    result["read_bound_ms_per_token"] = 1e3 * read_bound_s
    result["read_efficiency"] = result["read_bound_ms_per_token"] / result["ms_per_token"]
    print(f"batch-1 decode, {args.input_len}-token prompt: {result['ms_per_token']:.2f} ms/token; bound "
          f"{result['bound_ms_per_token']:.2f} ms (weights + KV / {result['bandwidth_gb_s']:.0f} GB/s); "
          f"efficiency {100 * result['efficiency']:.1f}%")
    if read_bound_s < bound_s:
        print(f"  on the bytes a step reads (all weights but the untied input embedding table): bound "
              f"{result['read_bound_ms_per_token']:.2f} ms; efficiency {100 * result['read_efficiency']:.1f}%")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
