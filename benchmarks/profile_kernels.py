"""Which kernels a decode step spends its GPU time in (torch.profiler, eager mode so every kernel is its own launch).

    python benchmarks/profile_kernels.py --model benchmarks/configs/qwen3-0.6b --batch 256 --prompt-len 512
Prints the top kernels by total device time over --steps decode steps, and the step's wall time. With --prefill,
the steps that prefill the reference workload's first --batch prompts (chunks of max_num_batched_tokens, no
decodes among them) instead, after a warm-up round of other prompts.
"""
import argparse
import time

from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams
from pagedllm.bench.throughput import make_workload

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--load-format", default="dummy")
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--prompt-len", type=int, default=512)
parser.add_argument("--workload", action="store_true",
                    help="the reference workload's first --batch prompts (100-1024 tokens) instead of --prompt-len each")
parser.add_argument("--prefill", action="store_true", help="profile prefill steps of the workload's prompts instead")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--top", type=int, default=20)
parser.add_argument("--max-model-len", type=int, default=4096)
args = parser.parse_args()

llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, max_model_len=args.max_model_len,
          enforce_eager=True)
engine = llm.llm_engine
vocab = engine.config.model.vocab_size
cuda = engine.config.device.type == "cuda"
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
sort = "cuda_time_total" if cuda else "cpu_time_total"
if args.prefill:
    workload = make_workload().prompts
    params = SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True)

    def prefill_steps(prompts: list, tag: str) -> int:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{tag}{i}", prompt, params)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return steps
    prefill_steps(workload[-args.batch:], "warm")  # a warm-up on other prompts (no prefix-cache hits after it)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        steps = prefill_steps(workload[:args.batch], "p")
        wall = time.perf_counter() - start
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    tokens = sum(len(p) for p in workload[:args.batch])
    print(f"prefill of {args.batch} workload prompts ({tokens} tokens): {steps} steps, {1e3 * wall / steps:.2f} ms "
          f"wall per step (eager, profiled)")
    raise SystemExit(0)
prompts = make_workload().prompts[:args.batch] if args.workload else \
    [[(i * 31 + j) % (vocab - 3) + 3 for j in range(args.prompt_len)] for i in range(args.batch)]
for i, prompt in enumerate(prompts):
    engine.add_request(str(i), prompt,
                       SamplingParams(temperature=0.6, max_tokens=args.max_model_len - args.prompt_len, ignore_eos=True))
while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
    engine.step()
for _ in range(3):
    engine.step()
start = time.perf_counter()
for _ in range(args.steps):  # unprofiled, for the wall time
    engine.step()
wall = (time.perf_counter() - start) / args.steps
with profile(activities=activities) as prof:
    for _ in range(args.steps):
        engine.step()
print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
context = "the workload's prompts" if args.workload else args.prompt_len
print(f"decode step at batch {args.batch}, context {context}+: {1e3 * wall:.2f} ms wall per step "
      f"(eager, unprofiled)")
