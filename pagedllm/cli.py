"""The `pagedllm` command: generate (offline), serve (OpenAI-compatible server), bench throughput / serve."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: paged-attention LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    from pagedllm.entrypoints import generate_cli
    generate_cli.add_parser(sub)
    from pagedllm.server import cli as serve_cli
    serve_cli.add_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from pagedllm.bench import latency, serving, throughput
    throughput.add_parser(bench_sub)
    latency.add_parser(bench_sub)
    serving.add_parser(bench_sub)

    args = parser.parse_args(argv)
    sys.exit(args.func(args) or 0)


if __name__ == "__main__":
    main()
