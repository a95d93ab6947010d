"""Host work of a decode step (everything but the model's forward and logits), the cyclic GC's share of it, and
the sampling-metadata build, at a large batch on stories260K (the model is tiny, so the host's part shows).

    python benchmarks/host_overhead.py --model ../shared/models/stories260K --batch 256 [--penalties]
"""
import argparse
import gc
import statistics
import time

from pagedllm import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--prompt-len", type=int, default=64)
parser.add_argument("--steps", type=int, default=200, help="timed steps (prompt + steps + 101 <= the model's context)")
parser.add_argument("--penalties", action="store_true", help="every request has presence_penalty=0.5")
args = parser.parse_args()

llm = LLM(args.model, skip_tokenizer_init=True, dtype="float32", max_model_len=args.prompt_len + args.steps + 101)
engine, runner = llm.llm_engine, llm.llm_engine.runner
vocab = engine.config.model.vocab_size
params = SamplingParams(temperature=0.6, max_tokens=args.steps + 100, ignore_eos=True,
                        presence_penalty=0.5 if args.penalties else 0.0)
for i in range(args.batch):
    engine.add_request(str(i), [(i * 31 + j) % (vocab - 3) + 3 for j in range(args.prompt_len)], params)
while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
    engine.step()

model_s, meta_s, gc_s = [], [], [0.0]


def timed(fn, sink):
    def wrapper(*a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        sink.append(time.perf_counter() - start)
        return out
    return wrapper


runner.model.forward = timed(runner.model.forward, model_s)
runner.model.compute_logits = timed(runner.model.compute_logits, model_s)
runner._sampling_metadata = timed(runner._sampling_metadata, meta_s)
gc_start = [0.0]
gc.callbacks.append(lambda phase, info: gc_start.__setitem__(0, time.perf_counter()) if phase == "start"
                    else gc_s.__setitem__(0, gc_s[0] + time.perf_counter() - gc_start[0]))
host = []
for _ in range(args.steps):
    model_s.clear()
    start = time.perf_counter()
    engine.step()
    host.append(time.perf_counter() - start - sum(model_s))
print(f"batch {args.batch}, {'with' if args.penalties else 'no'} penalties: host work per decode step "
      f"{1e3 * statistics.mean(host):.2f} ms mean, {1e3 * statistics.median(host):.2f} ms median, "
      f"{1e3 * sorted(host)[int(0.99 * len(host))]:.2f} ms p99; "
      f"sampling metadata {1e3 * statistics.median(meta_s):.2f} ms; cyclic GC {1e3 * gc_s[0] / args.steps:.2f} ms "
      f"per step")
