"""Where a throughput run's time goes: each scheduled step's shape (prefill tokens, decodes, context tokens) and the
wall time until the next step is scheduled, grouped into phases, each beside its roofline bound. With async
scheduling a step is scheduled while the one before runs, so the interval between two schedules is one step's
period on the device when the device is the bottleneck."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedllm.bench.roofline import Ceilings, model_sizes
from pagedllm.config import ModelConfig


@dataclass
class StepRecord:
    start: float
    prefill_tokens: int  # tokens of requests computing more than one token this step
    num_decodes: int
    context_tokens: int  # sum over the step's requests of the tokens they attend to


@dataclass
class StepTrace:
    steps: list[StepRecord] = field(default_factory=list)
    end: float = 0.0

    def attach(self, scheduler) -> None:
        """Record every schedule() of this scheduler (the benchmark's own instrument; the engine is unchanged)."""
        schedule = scheduler.schedule

        def traced():
            out = schedule()
            if not out.is_empty:
                prefill = sum(n for n in out.num_new_tokens[out.num_decodes:])
                context = sum(r.num_computed_tokens + n for r, n in zip(out.requests, out.num_new_tokens))
                self.steps.append(StepRecord(time.perf_counter(), prefill, out.num_decodes, context))
            return out

        scheduler.schedule = traced

    def _durations(self) -> list[float]:
        """Seconds from each step's schedule to the next one's (the last: to the end of the run)."""
        ends = [s.start for s in self.steps[1:]] + [self.end]
        return [end - s.start for s, end in zip(self.steps, ends)]

    def first_steps(self, count: int = 24) -> list[list]:
        """[milliseconds, prefill tokens, decodes] of the first steps (where compilation or a slow prefill shows)."""
        return [[round(seconds * 1e3, 2), s.prefill_tokens, s.num_decodes]
                for s, seconds in zip(self.steps[:count], self._durations())]

    def phases(self, cfg: ModelConfig, ceilings: Ceilings, dtype_bytes: int) -> list[dict]:
        """Steps grouped by kind (with prefill; decode-only by batch size): steps, seconds, bound seconds."""
        weight_bytes, flops_per_token, kv_per_token = model_sizes(cfg, dtype_bytes)
        attn_flops_per_ctx = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
        groups: dict[str, dict] = {}
        for step, seconds in zip(self.steps, self._durations()):
            tokens = step.prefill_tokens + step.num_decodes
            flops = tokens * flops_per_token + attn_flops_per_ctx * step.context_tokens  # decodes; prefill below
            if step.prefill_tokens:
                name = "with prefill"
                flops += attn_flops_per_ctx * step.prefill_tokens * 512  # a rough share of causal attention
            else:
                name = f"decode batch {_bucket(step.num_decodes)}"
            bound = max((weight_bytes + step.context_tokens * kv_per_token) / ceilings.bandwidth,
                        flops / ceilings.matmul_flops)
            g = groups.setdefault(name, dict(phase=name, steps=0, seconds=0.0, bound_seconds=0.0, tokens=0))
            g["steps"] += 1
            g["seconds"] += seconds
            g["bound_seconds"] += bound
            g["tokens"] += step.num_decodes
        order = ["with prefill"] + [f"decode batch {b}" for b in _BUCKET_NAMES]
        return [groups[name] for name in order if name in groups]


_BUCKETS = (1, 2, 8, 32, 64, 128, 192, 256)
_BUCKET_NAMES = ["1", "2-7", "8-31", "32-63", "64-127", "128-191", "192-255", "256+"]


def _bucket(n: int) -> str:
    name = _BUCKET_NAMES[0]
    for lower, label in zip(_BUCKETS, _BUCKET_NAMES):
        if n >= lower:
            name = label
    return name


def format_phases(phases: list[dict], first_steps: list[list] = ()) -> str:
    lines = []
    if first_steps:
        lines.append("first steps (ms, prefill tokens, decodes): " + " ".join(f"{ms:g}/{p}/{d}" for ms, p, d in
                                                                             first_steps))
    lines += ["phase            steps  seconds  bound s  efficiency  ms/step  bound ms/step"]
    for p in phases:
        lines.append(f"{p['phase']:<16} {p['steps']:>5}  {p['seconds']:>7.3f}  {p['bound_seconds']:>7.3f}  "
                     f"{100 * p['bound_seconds'] / max(p['seconds'], 1e-9):>9.1f}%  "
                     f"{1e3 * p['seconds'] / p['steps']:>7.2f}  {1e3 * p['bound_seconds'] / p['steps']:>13.2f}")
    return "\n".join(lines)
