"""Memory saved by sharing KV blocks: parallel sampling (n) and beam search (width), and the speed-up of prefix
caching on a shared-system-prompt workload.

python benchmarks/bench_sharing.py sharing --model ../shared/models/stories260K
python benchmarks/bench_sharing.py prefix --model benchmarks/configs/qwen3-0.6b --load-format dummy
"""
import argparse
import random
import time

from pagedllm import LLM, BeamSearchParams, SamplingParams


def _prompts(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randint(3, vocab - 1) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


def sharing(args):
    rows = []
    for kind, width in [("parallel sampling n", w) for w in (2, 4, 6)] + [("beam search width", w) for w in (2, 4, 6)]:
        llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, enable_prefix_caching=False,
                  max_model_len=args.max_model_len)
        vocab = llm.llm_engine.config.model.vocab_size
        prompts = _prompts(args.num_prompts, args.min_input_len, args.max_input_len, vocab)
        if kind.startswith("parallel"):
            llm.generate(prompts, SamplingParams(n=width, temperature=1.0, max_tokens=args.output_len,
                                                 ignore_eos=True, seed=0), use_tqdm=False)
        else:
            llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=args.output_len, ignore_eos=True))
        stats = llm.llm_engine.get_stats()
        rows.append((kind, width, stats.kv_sharing_savings, stats.kv_fragmentation))
        print(f"{kind} {width}: {100 * stats.kv_sharing_savings:.1f}% of KV memory saved by sharing "
              f"(fragmentation {100 * stats.kv_fragmentation:.1f}%)", flush=True)


def prefix(args):
    rng = random.Random(0)
    system = [rng.randint(3, 10000) for _ in range(args.system_len)]
    prompts = [{"prompt_token_ids": system + [rng.randint(3, 10000) for _ in range(rng.randint(16, 64))]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.6, max_tokens=args.output_len, ignore_eos=True)
    times = {}
    for caching in (False, True):
        llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, enable_prefix_caching=caching,
                  max_model_len=args.max_model_len)
        # Warm-up at the workload's shapes (long prefills, large decode batches) on prompts that share nothing with
        # it, so that kernel compilation is out of both timings and the cache holds nothing useful.
        warm = [{"prompt_token_ids": [rng.randint(10001, 20000) for _ in range(args.system_len + 32)]}
                for _ in range(8)]
        llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times[caching] = time.perf_counter() - start
        stats = llm.llm_engine.get_stats()
        print(f"prefix caching {'on ' if caching else 'off'}: {times[caching]:.2f} s, hit rate "
              f"{100 * stats.prefix_cache_hit_rate:.1f}%, prompt tokens computed {stats.num_computed_prompt_tokens}",
              flush=True)
        del llm
    print(f"speed-up {times[False] / times[True]:.2f}x on {args.num_prompts} requests sharing a "
          f"{args.system_len}-token system prompt, {args.output_len} output tokens each")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["sharing", "prefix"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--min-input-len", type=int, default=50)
    parser.add_argument("--max-input-len", type=int, default=150)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--system-len", type=int, default=1024)
    args = parser.parse_args()
    {"sharing": sharing, "prefix": prefix}[args.what](args)
