"""Per-decode-step cost of structured output (JSON schema constraints) against the model's own step time.

For batch sizes 1, 16 and 64, every request constrained by the same JSON schema, it times what the engine adds to a
decode step: fill_bitmask (CPU, xgrammar), apply_bitmask (the host-to-device copy and the masking kernel on the
logits' device, synchronised so that its time is its own) and accept_token for every row. Each request writes a
valid document token by token, as a model would (random logits would wander in one free string for hundreds of
tokens); a finished document is replaced by a fresh request (its grammar cached).
Also: the grammar's cold compile time and a cached re-use; and, with --model, end to end: generate() with every
request constrained against the same requests free with the same output lengths.

The model step comes from --model-step-ms, or is measured with --model (a directory, e.g. one holding only a
config.json from benchmarks/configs/ with --load-format dummy): the decode time per step of a batch of the same size
(the difference of two generate calls of different lengths, which cancels the prefill).

    python benchmarks/bench_structured.py --tokenizer ../shared/tokenizers/qwen3 \\
        --model benchmarks/configs/qwen3-0.6b --load-format dummy [--output-json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm.sampling.structured import StructuredOutputManager  # noqa: E402
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

# a typical extraction schema: nested object, array, enum, numbers, free strings
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "status": {"enum": ["active", "inactive", "pending"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "address", "tags", "status", "score"],
}
_WORDS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
          "peggy", "trent", "victor", "walter", "london", "paris", "berlin", "madrid", "rome", "oslo", "vienna"]


def make_document(rng: random.Random) -> str:
    """A document valid under SCHEMA, as a model would write it (compact or indented): the path the matchers
    walk in the timing loop, so that every kind of grammar state is visited as in real use."""
    def words(count: int) -> str:
        return " ".join(rng.choice(_WORDS).capitalize() for _ in range(count))
    document = {
        "name": words(2), "age": rng.randint(0, 150),
        "email": f"{rng.choice(_WORDS)}.{rng.choice(_WORDS)}@example.com",
        "address": {"street": f"{rng.randint(1, 999)} {words(2)} Street", "city": words(1),
                    "zip": f"{rng.randint(0, 99999):05d}"},
        "tags": [rng.choice(_WORDS) for _ in range(rng.randint(0, 5))],
        "status": rng.choice(["active", "inactive", "pending"]),
        "score": round(rng.uniform(0, 100), rng.randint(0, 3)),
    }
    return json.dumps(document, indent=rng.choice([None, 2]))


def _stats(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {"mean": statistics.fmean(ordered), "p50": ordered[len(ordered) // 2],
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_constraints(manager: StructuredOutputManager, tokenizer, batch: int, steps: int, warmup: int,
                      device: torch.device, dtype: torch.dtype) -> dict:
    """Each request writes a valid document token by token (as a model would, teacher-forced); every step fills
    and applies the bitmask of the whole batch and accepts one token per row. A finished document is replaced by
    a fresh request (its grammar cached). Each forced token must be allowed by its row's mask: a check of the mask."""
    params = StructuredOutputsParams(json=SCHEMA)
    rng = random.Random(batch)
    counter = iter(range(10**9))
    stop = manager.stop_token_ids[0]

    def fresh() -> tuple[str, list[int]]:
        request_id = f"bench-{batch}-{next(counter)}"
        manager.add_request(request_id, params)
        while not manager.is_ready(request_id):
            time.sleep(0.001)
        return request_id, tokenizer.encode(make_document(rng)) + [stop]

    rows = [fresh() for _ in range(batch)]
    positions = [rng.randrange(len(tokens)) // 2 for _, tokens in rows]  # stagger the rows through their documents
    for (request_id, tokens), position in zip(rows, positions):
        for token in tokens[:position]:
            manager.accept_token(request_id, token)
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(batch, manager.vocab_size, device=device, dtype=dtype)
    fill, apply, accept, total = [], [], [], []
    completed = 0
    for step in range(warmup + steps):
        torch.randn(logits.shape, generator=generator, device=device, dtype=dtype, out=logits)
        ids = [request_id for request_id, _ in rows]
        forced = [tokens[position] for (_, tokens), position in zip(rows, positions)]
        _sync(device)
        start = time.perf_counter()
        bitmask = manager.fill_bitmask(ids)
        filled = time.perf_counter()
        manager.apply_bitmask(logits, bitmask)
        _sync(device)
        applied = time.perf_counter()
        for row, token in enumerate(forced):  # not timed: the mask must allow the document's next token
            if not (int(bitmask[row, token // 32]) >> (token % 32)) & 1:
                raise RuntimeError(f"row {row}: the mask forbids token {token} of a valid document")
        if step % 16 == 0 and not torch.isfinite(logits[torch.arange(batch), torch.tensor(forced)]).all():
            raise RuntimeError("apply_bitmask masked a token that the bitmask allows")
        accept_start = time.perf_counter()
        for request_id, token in zip(ids, forced):
            manager.accept_token(request_id, token)
        done = time.perf_counter()
        for row, (request_id, tokens) in enumerate(rows):
            positions[row] += 1
            if positions[row] == len(tokens):
                if not manager.is_terminated(request_id):
                    raise RuntimeError("a whole valid document did not terminate its matcher")
                manager.remove_request(request_id)
                rows[row], positions[row] = fresh(), 0
                completed += 1
        if step >= warmup:
            fill.append((filled - start) * 1e3)
            apply.append((applied - filled) * 1e3)
            accept.append((done - accept_start) * 1e3)
            total.append((applied - start + done - accept_start) * 1e3)
    for request_id, _ in rows:
        manager.remove_request(request_id)
    return {"batch": batch, "fill_ms": _stats(fill), "apply_ms": _stats(apply), "accept_ms": _stats(accept),
            "total_ms": _stats(total), "documents_completed": completed}


def bench_compile(tokenizer, vocab_size: int) -> dict:
    manager = StructuredOutputManager(tokenizer, vocab_size)
    params = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    manager.validate(params)
    validated = time.perf_counter()
    manager.add_request("cold", params)
    while not manager.is_ready("cold"):
        time.sleep(0.0005)
    compiled = time.perf_counter()
    manager.add_request("warm", params)
    manager.is_ready("warm")
    cached = time.perf_counter()
    manager.shutdown()
    return {"validate_ms": (validated - start) * 1e3, "cold_compile_ms": (compiled - validated) * 1e3,
            "cached_ms": (cached - compiled) * 1e3}


def measure_model_step(args: argparse.Namespace, batch: int) -> float:
    """Milliseconds per decode step of `batch` free requests (two lengths, so that the prefill cancels)."""
    llm = _llm(args)
    prompts = [{"prompt_token_ids": [100 + i + j for j in range(32)]} for i in range(batch)]
    short, long_ = 16, 16 + args.model_steps

    def run(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        _sync(_device(args))
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        _sync(_device(args))
        return time.perf_counter() - start

    run(short)  # warm-up (CUDA graphs, caches)
    return (run(long_) - run(short)) / (long_ - short) * 1e3


def measure_end_to_end(args: argparse.Namespace, batch: int) -> dict:
    """generate() of `batch` schema-constrained requests against `batch` free requests of the very same output
    lengths (ignore_eos), so that both runs schedule the same steps: the difference is the constraints' cost as
    the engine really pays it (the CPU fill overlaps the GPU's forward pass in flight)."""
    llm = _llm(args)
    prompts = [{"prompt_token_ids": [200 + i + j for j in range(32)]} for i in range(batch)]
    constrained = SamplingParams(temperature=1.0, seed=0, max_tokens=args.e2e_max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:1], constrained, use_tqdm=False)  # warm-up: compile the grammar
    device = _device(args)
    _sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, constrained, use_tqdm=False)
    _sync(device)
    constrained_s = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    valid = sum(_parses(o.outputs[0].text) for o in outputs)
    free = [SamplingParams(temperature=1.0, seed=0, max_tokens=n, ignore_eos=True) for n in lengths]
    _sync(device)
    start = time.perf_counter()
    llm.generate(prompts, free, use_tqdm=False)
    _sync(device)
    free_s = time.perf_counter() - start
    return {"batch": batch, "tokens": sum(lengths), "valid_json": valid, "constrained_s": constrained_s,
            "free_s": free_s, "overhead": constrained_s / free_s - 1}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


_LLM = None


def _llm(args: argparse.Namespace):
    global _LLM
    if _LLM is None:
        from pagedllm import LLM
        _LLM = LLM(_model_with_tokenizer(args.model, args.tokenizer), load_format=args.load_format,
                   dtype=args.model_dtype, max_model_len=512, max_num_seqs=max(args.batch_sizes), seed=0)
    return _LLM


def _model_with_tokenizer(model: str, tokenizer: str) -> str:
    """A temporary directory holding the model's files and the tokenizer's beside them (a config-only directory
    from benchmarks/configs/ has no tokenizer of its own)."""
    import tempfile
    directory = Path(tempfile.mkdtemp(prefix="bench_structured_"))
    for source in (Path(model), Path(tokenizer)):
        for path in source.iterdir():
            if path.is_file() and not (directory / path.name).exists():
                (directory / path.name).symlink_to(path.resolve())
    return str(directory)


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory (e.g. Qwen3's)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the logits width (default: the model config's vocab_size, else 151936)")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="auto", help="where the logits live: auto, cuda, cpu")
    parser.add_argument("--logits-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model-step-ms", default=None,
                        help="the model's decode step time in ms: one number, or one per batch size (1,16,64)")
    parser.add_argument("--model", default=None, help="measure the model step with this model instead")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--model-dtype", default="auto")
    parser.add_argument("--model-steps", type=int, default=64, help="decode steps per model-step measurement")
    parser.add_argument("--e2e-max-tokens", type=int, default=400, help="max_tokens of the end-to-end runs")
    parser.add_argument("--fill-threads", type=int, default=None, help="xgrammar fill threads (1: none)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = args.vocab_size
    if vocab_size is None and args.model is not None and (Path(args.model) / "config.json").exists():
        vocab_size = json.loads((Path(args.model) / "config.json").read_text()).get("vocab_size")
    vocab_size = vocab_size or 151936
    device = _device(args)
    dtype = getattr(torch, args.logits_dtype)

    step_ms: dict[int, float | None] = {b: None for b in args.batch_sizes}
    if args.model_step_ms is not None:
        given = [float(x) for x in args.model_step_ms.split(",")]
        step_ms = {b: given[i] if len(given) > 1 else given[0] for i, b in enumerate(args.batch_sizes)}
    elif args.model is not None:
        step_ms = {b: measure_model_step(args, b) for b in args.batch_sizes}

    end_to_end = [measure_end_to_end(args, b) for b in args.batch_sizes] if args.model is not None else []
    compile_stats = bench_compile(tokenizer, vocab_size)
    manager = StructuredOutputManager(tokenizer, vocab_size, fill_threads=args.fill_threads)
    rows = [bench_constraints(manager, tokenizer, b, args.steps, args.warmup, device, dtype)
            for b in args.batch_sizes]
    manager.shutdown()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"structured output cost per decode step: JSON schema on every request; vocab {vocab_size}; "
          f"logits {args.logits_dtype} on {device_name}; {args.steps} steps")
    print(f"compile: validate {compile_stats['validate_ms']:.2f} ms, cold compile "
          f"{compile_stats['cold_compile_ms']:.1f} ms, cached {compile_stats['cached_ms']:.3f} ms")
    header = (f"{'batch':>5} {'fill ms':>9} {'apply ms':>9} {'accept ms':>10} {'total ms':>9} {'p99 ms':>8} "
              f"{'model ms':>9} {'overhead':>9}")
    print(header)
    for row in rows:
        model = step_ms[row["batch"]]
        row["model_step_ms"] = model
        row["overhead"] = row["total_ms"]["mean"] / model if model else None
        overhead = f"{100 * row['overhead']:8.1f}%" if model else f"{'-':>9}"
        model_text = f"{model:9.2f}" if model else f"{'-':>9}"
        print(f"{row['batch']:>5} {row['fill_ms']['mean']:9.3f} {row['apply_ms']['mean']:9.3f} "
              f"{row['accept_ms']['mean']:10.3f} {row['total_ms']['mean']:9.3f} {row['total_ms']['p99']:8.3f} "
              f"{model_text} {overhead}")
    if end_to_end:
        print("end to end (generate, same output lengths; random weights mostly wander inside free strings, so few "
              "documents end within max_tokens):")
        print(f"{'batch':>5} {'tokens':>7} {'valid':>6} {'free s':>8} {'constrained s':>14} {'overhead':>9}")
        for row in end_to_end:
            print(f"{row['batch']:>5} {row['tokens']:>7} {row['valid_json']:>6} {row['free_s']:8.3f} "
                  f"{row['constrained_s']:14.3f} {100 * row['overhead']:8.1f}%")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": device_name, "vocab_size": vocab_size, "logits_dtype": args.logits_dtype,
                       "compile": compile_stats, "rows": rows, "end_to_end": end_to_end, "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
