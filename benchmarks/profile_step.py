"""Where a decode step's time goes: host time of scheduling, launching the forward pass, sampling (metadata and
launch) and output processing (which waits for the step's tokens), and the graph's device time (CUDA events).
Medians of each part; the step's mean (the period that throughput sees) and p90 too.
On a CUDA machine:

    python benchmarks/profile_step.py --model benchmarks/configs/qwen3-0.6b --batch 256 [--no-async-scheduling]

--gaps: after the timed steps, --steps more under torch.profiler; from the device's timeline (kernels, copies,
memsets), the time the device sat idle between them, the largest idle gaps with the operations on each side, and
the operations that ran outside the CUDA graph.
"""
import argparse
import statistics
import time

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.bench.throughput import make_workload

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--prompt-len", type=int, default=512)
parser.add_argument("--workload", action="store_true",
                    help="the reference workload's first --batch prompts (100-1024 tokens) instead of --prompt-len each")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy, as `pagedllm bench latency` samples")
parser.add_argument("--structured", action="store_true",
                    help="every request constrained by bench_structured.py's JSON schema (needs --tokenizer)")
parser.add_argument("--tokenizer", default=None)
parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
parser.add_argument("--gaps", action="store_true", help="also trace the device's idle time between steps")
args = parser.parse_args()

llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=args.tokenizer is None, tokenizer=args.tokenizer,
          max_model_len=4096, async_scheduling=args.async_scheduling)
engine = llm.llm_engine
prompts = make_workload().prompts[:args.batch] if args.workload else \
    [[(i * 31 + j) % 10000 + 3 for j in range(args.prompt_len)] for i in range(args.batch)]
params = SamplingParams(temperature=args.temperature, max_tokens=10000 - args.prompt_len, ignore_eos=True)
if args.structured:
    from bench_structured import SCHEMA

    from pagedllm.sampling_params import StructuredOutputsParams
    params = SamplingParams(temperature=1.0, max_tokens=3000, structured_outputs=StructuredOutputsParams(json=SCHEMA))
for i, prompt in enumerate(prompts):
    engine.add_request(str(i), prompt, params)
while engine._compiling or engine.scheduler.num_waiting or \
        any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
    engine.step()

# host time of each part of engine.step(); the graph's device time from CUDA events read at the end
timings = {k: [] for k in ("schedule", "forward", "sample", "fill", "process", "total")}
events = []
runner = engine.runner


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        timings[name].append(time.perf_counter() - t)
        return out
    return wrapper


if runner.graphs is not None:
    graphs_run = runner.graphs.run

    def graph_with_events(step):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = graphs_run(step)
        end.record()
        events.append((start, end))
        return out
    runner.graphs.run = graph_with_events
engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
engine._process = timed("process", engine._process)
runner.forward = timed("forward", runner.forward)
runner.sample = timed("sample", runner.sample)
if engine.structured is not None:
    engine.structured.fill_bitmask = timed("fill", engine.structured.fill_bitmask)
step = timed("total", engine.step)
loop_start = time.perf_counter()
for _ in range(args.steps):
    step()
if torch.cuda.is_available():
    torch.cuda.synchronize()
# With async scheduling the last launched step finishes after the loop: the mean of the calls misses about one step's
# device time over --steps, the wall time to the final sync includes it (and the rest of a step in flight before).
wall_per_step = (time.perf_counter() - loop_start) / args.steps
timings["gpu_forward"] = [start.elapsed_time(end) / 1e3 for start, end in events]
context = "the workload's prompts" if args.workload else f"~{args.prompt_len}"
context += "+" + (", every request JSON-schema constrained" if args.structured else "")
print(f"decode step at batch {args.batch}, context {context}, async scheduling "
      f"{engine.async_scheduling}: " + ", ".join(
          f"{k} {1e3 * statistics.median(v):.2f} ms" for k, v in timings.items() if v)
      + f"; step mean {1e3 * statistics.fmean(timings['total']):.2f} ms, p90 "
        f"{1e3 * sorted(timings['total'])[int(0.9 * len(timings['total']))]:.2f} ms; wall to the final sync "
        f"{1e3 * wall_per_step:.2f} ms a step")


def device_gaps(steps: int) -> None:
    """Idle time of the device over `steps` engine steps, from a torch.profiler trace (see the module's doc)."""
    import collections
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    ops = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and
                  e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not ops:
        print("no device operations in the trace")
        return
    span = ops[-1]["ts"] + ops[-1]["dur"] - ops[0]["ts"]
    gaps, end = [], ops[0]["ts"]
    for before, op in zip([None] + ops[:-1], ops):
        if before is not None and op["ts"] > end:
            gaps.append((op["ts"] - end, before["name"], op["name"]))
        end = max(end, op["ts"] + op["dur"])
    idle = sum(g for g, _, _ in gaps)
    print(f"device timeline over {steps} steps: {span / 1e3:.2f} ms, idle {idle / 1e3:.2f} ms "
          f"({100 * idle / span:.1f}%), {span / steps / 1e3:.3f} ms a step")
    by_pair = collections.defaultdict(lambda: [0, 0.0])
    for g, a, b in gaps:
        key = (a[:50], b[:50])
        by_pair[key][0] += 1
        by_pair[key][1] += g
    print("idle gaps by the operations around them (count, total us):")
    for (a, b), (n, total) in sorted(by_pair.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {n:5d} {total:9.1f} us  after {a}  before {b}")
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in ops:
        totals[e["name"][:70]][0] += 1
        totals[e["name"][:70]][1] += e["dur"]
    print("device operations, count and total us:")
    for name, (n, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:16]:
        print(f"  {n:5d} {total:9.1f} us  {name}")
    # the last two steps' operations that run fewer than 10 times a step (not the layers' kernels), in order,
    # with the idle time before each and the layers' kernels between them counted
    print("the last two steps, without the layers' kernels (idle before, duration, name):")
    rare = {name for name, (n, _) in totals.items() if n < 10 * steps}
    shown, skipped, end = 0, 0, None
    tail = ops[-(len(ops) * 2 // steps):]
    for e in tail:
        idle = 0.0 if end is None else max(0.0, e["ts"] - end)
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
        if e["name"][:70] in rare or idle > 5:
            if skipped:
                print(f"      ... {skipped} layer kernels")
                skipped = 0
            print(f"  {idle:7.1f} {e['dur']:8.1f}  {e['name'][:80]}")
            shown += 1
        else:
            skipped += 1
    if skipped:
        print(f"      ... {skipped} layer kernels")


if args.gaps:
    device_gaps(args.steps)
