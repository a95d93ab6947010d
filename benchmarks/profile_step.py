"""Where a decode step's time goes: scheduler, input building, GPU forward (CUDA events), sampling + the one sync,
output processing. python benchmarks/profile_step.py --model benchmarks/configs/qwen3-0.6b --batch 256"""
import argparse
import statistics
import time

import torch

from pagedllm import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--prompt-len", type=int, default=512)
parser.add_argument("--steps", type=int, default=50)
args = parser.parse_args()

llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096)
engine = llm.llm_engine
for i in range(args.batch):
    engine.add_request(str(i), [(i * 31 + j) % 10000 + 3 for j in range(args.prompt_len)],
                       SamplingParams(temperature=0.6, max_tokens=10000 - args.prompt_len, ignore_eos=True))
while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
    engine.step()

timings = {k: [] for k in ("schedule", "execute", "gpu_forward", "process", "total")}
runner = engine.runner
graphs_run = runner.graphs.run if runner.graphs else None
start_evt, end_evt = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def timed_run(step):
    start_evt.record()
    out = graphs_run(step)
    end_evt.record()
    return out


if graphs_run:
    runner.graphs.run = timed_run
schedule, process = engine.scheduler.schedule, engine._process


def t_schedule():
    t = time.perf_counter(); out = schedule(); timings["schedule"].append(time.perf_counter() - t); return out


def t_process(output):
    t = time.perf_counter(); out = process(output); timings["process"].append(time.perf_counter() - t); return out


execute = runner.execute


def t_execute(*a, **k):
    t = time.perf_counter(); out = execute(*a, **k); timings["execute"].append(time.perf_counter() - t)
    timings["gpu_forward"].append(start_evt.elapsed_time(end_evt) / 1e3)
    return out


engine.scheduler.schedule, engine._process, runner.execute = t_schedule, t_process, t_execute
for _ in range(args.steps):
    t = time.perf_counter()
    engine.step()
    timings["total"].append(time.perf_counter() - t)
print(f"decode step at batch {args.batch}, context ~{args.prompt_len}+: " + ", ".join(
    f"{k} {1e3 * statistics.median(v):.2f} ms" for k, v in timings.items()))
