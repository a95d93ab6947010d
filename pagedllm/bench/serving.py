"""`pagedllm bench serve`: load any OpenAI-compatible /v1/completions endpoint and report serving metrics.

Requests arrive as a Poisson process at --request-rate (or a gamma process, --burstiness < 1 burstier, > 1 more
regular; inf sends all at once); prompts are random token ids from a tokenizer's vocabulary, decoded to text, and
ignore_eos + max_tokens make every output as long as asked. Per request: TTFT, TPOT = (latency - TTFT) /
(output tokens - 1), ITL (every gap between streamed chunks) and end-to-end latency (E2EL); then mean, median,
std and percentiles, request and token throughput, and goodput (requests/s meeting every --goodput SLO).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_METRIC_NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RandomRequest:
    prompt: str
    prompt_len: int  # by the tokenizer, without special tokens (the server's usage is preferred when it gives one)
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_requests(tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[RandomRequest]:
    """Prompts of random token ids (no special tokens), lengths uniform in [len * (1 - r), len * (1 + r)]."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random range ratio must be in [0, 1), got {range_ratio}.")
    if input_len < 1 or output_len < 1 or num_prompts < 1:
        raise ValueError("input length, output length and the number of prompts must be >= 1.")
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    # Byte-fallback pieces (<0xE2>) decode alone to U+FFFD, which re-encodes longer: leave them out.
    vocab = [t for t, piece in enumerate(pieces)
             if t not in special and not (isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece))]
    requests = []
    for _ in range(num_prompts):
        n_in = rng.randint(max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio))))
        n_out = rng.randint(max(1, int(output_len * (1 - range_ratio))),
                            max(1, int(output_len * (1 + range_ratio))))
        ids = [rng.choice(vocab) for _ in range(n_in)]
        text = tokenizer.decode(ids)
        for _ in range(4):  # decode -> encode is not the identity: trim or pad until the length holds
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) == n_in:
                break
            ids = ids[:n_in] + [rng.choice(vocab) for _ in range(n_in - len(ids))]
            text = tokenizer.decode(ids)
        prompt_len = len(tokenizer(text, add_special_tokens=False).input_ids)
        requests.append(RandomRequest(text, prompt_len, n_out))
    return requests


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput SLO {item!r} must be ttft:MS, tpot:MS or e2el:MS.")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of milliseconds.") from None
        if slos[name] <= 0:
            raise ValueError(f"goodput SLO {item!r} must be positive.")
    return slos


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def _send(session, url: str, headers: dict, payload: dict, fallback_prompt_len: int, tokenizer,
                ) -> RequestResult:
    result = RequestResult(prompt_len=fallback_prompt_len)
    start = time.perf_counter()
    last = start
    text_parts: list[str] = []
    usage = None
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            async for raw_line in response.content:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    if not text_parts:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    text_parts.append(choices[0]["text"])
        result.latency = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - one failed request is a counted failure, not a crash
        result.error = f"{type(error).__name__}: {error}"
        return result
    if not text_parts:
        result.error = "the stream carried no text"
        return result
    if usage is not None:
        result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
        result.output_len = usage.get("completion_tokens", 0)
    else:
        result.output_len = len(tokenizer("".join(text_parts), add_special_tokens=False).input_ids)
    result.success = True
    return result


async def _arrivals(count: int, rate: float, burstiness: float, rng: random.Random):
    for index in range(count):
        yield index
        if math.isinf(rate) or index == count - 1:
            continue
        # A gamma process with mean interval 1/rate; burstiness 1 is Poisson.
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def _run(base_url: str, endpoint: str, model: str, requests: list[RandomRequest], request_rate: float,
               burstiness: float, max_concurrency: int | None, headers: dict, extra_body: dict, seed: int,
               tokenizer, disable_tqdm: bool) -> tuple[list[RequestResult], float]:
    import aiohttp
    url = base_url.rstrip("/") + endpoint

    def payload(req: RandomRequest, max_tokens: int) -> dict:
        body = {"model": model, "prompt": req.prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        body.update(extra_body)
        return body

    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        probe = await _send(session, url, headers, payload(requests[0], min(2, requests[0].output_len)),
                            requests[0].prompt_len, tokenizer)
        if not probe.success:
            raise RuntimeError(f"the test request to {url} failed: {probe.error}")
        progress = None
        if not disable_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(requests), desc="requests")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(req: RandomRequest) -> RequestResult:
            if semaphore is None:
                result = await _send(session, url, headers, payload(req, req.output_len), req.prompt_len, tokenizer)
            else:
                async with semaphore:
                    result = await _send(session, url, headers, payload(req, req.output_len), req.prompt_len,
                                         tokenizer)
            if progress is not None:
                progress.update(1)
            return result

        rng = random.Random(seed)
        start = time.perf_counter()
        tasks = []
        async for index in _arrivals(len(requests), request_rate, burstiness, rng):
            tasks.append(asyncio.create_task(one(requests[index])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    return list(results), duration


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float],
              percentiles: list[float]) -> dict[str, Any]:
    """The benchmark's figures from per-request results (times in milliseconds)."""
    done = [r for r in results if r.success]
    ttfts = [r.ttft * 1000 for r in done]
    tpots = [(r.latency - r.ttft) * 1000 / (r.output_len - 1) for r in done if r.output_len > 1]
    itls = [gap * 1000 for r in done for gap in r.itl]
    e2els = [r.latency * 1000 for r in done]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    good = 0
    for r in done:
        tpot = (r.latency - r.ttft) * 1000 / (r.output_len - 1) if r.output_len > 1 else 0.0
        if (r.ttft * 1000 <= goodput.get("ttft", math.inf) and tpot <= goodput.get("tpot", math.inf)
                and r.latency * 1000 <= goodput.get("e2el", math.inf)):
            good += 1
    out: dict[str, Any] = {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration, "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "request_goodput": good / duration if goodput else None,
        "errors": sorted({r.error for r in results if not r.success})[:10],
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out[f"mean_{name}_ms"] = statistics.fmean(values) if values else 0.0
        out[f"median_{name}_ms"] = statistics.median(values) if values else 0.0
        out[f"std_{name}_ms"] = statistics.pstdev(values) if values else 0.0
        for p in percentiles:
            out[f"p{_pct_name(p)}_{name}_ms"] = percentile(values, p)
    return out


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def run_benchmark(base_url: str, model: str | None, tokenizer: str | Any, *, num_prompts: int = 100,
                  random_input_len: int = 1024, random_output_len: int = 128, random_range_ratio: float = 0.0,
                  request_rate: float = math.inf, burstiness: float = 1.0, max_concurrency: int | None = None,
                  goodput: list[str] | None = None, percentiles: list[float] = (99.0,), seed: int = 0,
                  endpoint: str = "/v1/completions", api_key: str | None = None, temperature: float = 0.0,
                  ignore_eos: bool = True, disable_tqdm: bool = False) -> dict[str, Any]:
    """Run the serving benchmark against an OpenAI-compatible server; returns the figures and the setup."""
    if endpoint != "/v1/completions":
        raise ValueError(f"only the /v1/completions endpoint is supported, got {endpoint!r}.")
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (inf for all at once), got {request_rate}.")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}.")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max concurrency must be >= 1, got {max_concurrency}.")
    slos = parse_goodput(goodput)
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        model = asyncio.run(_first_model(base_url, headers))
    requests = random_requests(tokenizer, num_prompts, random_input_len, random_output_len, random_range_ratio,
                               seed)
    extra_body = {"temperature": temperature}
    if ignore_eos:
        extra_body["ignore_eos"] = True
    results, duration = asyncio.run(_run(base_url, endpoint, model, requests, request_rate, burstiness,
                                         max_concurrency, headers, extra_body, seed, tokenizer, disable_tqdm))
    figures = summarize(results, duration, slos, list(percentiles))
    setup = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base_url": base_url,
             "endpoint": endpoint, "model": model, "num_prompts": num_prompts, "random_input_len": random_input_len,
             "random_output_len": random_output_len, "random_range_ratio": random_range_ratio,
             "request_rate": "inf" if math.isinf(request_rate) else request_rate, "burstiness": burstiness,
             "max_concurrency": max_concurrency, "goodput_slos_ms": slos, "seed": seed, "temperature": temperature,
             "ignore_eos": ignore_eos}
    return {**setup, **figures, "per_request": [asdict(r) for r in results]}


async def _first_model(base_url: str, headers: dict) -> str:
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"GET /v1/models failed with HTTP {response.status}: give --model.")
            data = await response.json()
    return data["data"][0]["id"]


def format_report(result: dict[str, Any], percentiles: list[float] = (99.0,)) -> str:
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value) -> None:
        if isinstance(value, float):
            value = f"{value:.2f}"
        lines.append(f"{label:<46}{value:>14}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Request rate configured (RPS):", result["request_rate"] if isinstance(result["request_rate"], str)
        else float(result["request_rate"]))
    row("Benchmark duration (s):", result["duration_s"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    for name in METRICS:
        lines.append("{s:{c}^60}".format(s=f" {_METRIC_NAMES[name]} ", c="-"))
        row(f"Mean {name.upper()} (ms):", result[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", result[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{_pct_name(p)} {name.upper()} (ms):", result[f"p{_pct_name(p)}_{name}_ms"])
    lines.append("=" * 60)
    if result["errors"]:
        lines.append("errors: " + "; ".join(result["errors"]))
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="load an OpenAI-compatible server and report serving metrics")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (without /v1)")
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the random prompts (default: --model)")
    parser.add_argument("--api-key", default=None, help="default: $PAGEDLLM_API_KEY or $OPENAI_API_KEY")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 is Poisson")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--goodput", nargs="+", default=None, metavar="SLO", help="e.g. ttft:500 tpot:50 e2el:5000")
    parser.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--save-result", action="store_true", help="write the result JSON")
    parser.add_argument("--result-filename", default=None, help="default: serving-<model>-<rate>-<date>.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tokenizer = args.tokenizer or args.model
    if tokenizer is None:
        print("error: give --tokenizer (or --model as a path to a tokenizer).")
        return 2
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
        if not all(0 < p < 100 for p in percentiles):
            raise ValueError(f"metric percentiles must be in (0, 100), got {args.metric_percentiles!r}.")
        api_key = args.api_key or os.environ.get("PAGEDLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        result = run_benchmark(args.base_url, args.model, tokenizer, num_prompts=args.num_prompts,
                               random_input_len=args.random_input_len, random_output_len=args.random_output_len,
                               random_range_ratio=args.random_range_ratio, request_rate=args.request_rate,
                               burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                               goodput=args.goodput, percentiles=percentiles, seed=args.seed,
                               endpoint=args.endpoint, api_key=api_key, temperature=args.temperature,
                               ignore_eos=args.ignore_eos, disable_tqdm=args.disable_tqdm)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}")
        return 2
    print(format_report(result, percentiles))
    if args.save_result:
        name = args.result_filename or "serving-{}-{}-{}.json".format(
            os.path.basename(str(result["model"]).rstrip("/")) or "model", result["request_rate"],
            datetime.now().strftime("%Y%m%d-%H%M%S"))
        with open(name, "w") as f:
            json.dump(result, f, indent=2)
        print(f"result saved to {name}")
    return 0
