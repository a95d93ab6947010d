"""`pagedllm serve [MODEL]`: load a model and serve the OpenAI-compatible API with uvicorn.

The host defaults to 127.0.0.1 (this machine only), not vLLM's 0.0.0.0: exposing the server to the network is a
choice to make explicitly with --host 0.0.0.0 (and, then, --api-key).
"""
from __future__ import annotations

import argparse
import logging
import os

from pagedllm.entrypoints.generate_cli import add_engine_args, engine_kwargs

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    parser.add_argument("model", nargs="?", default=None,
                        help="a model directory, .gguf file or name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients use (default: derived "
                        "from MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for "
                        "every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes "
                        "(default: $PAGEDLLM_API_KEY)")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template (file or text) replacing the "
                        "tokenizer's")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pagedllm.config import EngineArgs
    from pagedllm.engine.async_engine import AsyncEngine
    from pagedllm.model_resolution import resolve_model
    from pagedllm.server.api import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get("PAGEDLLM_API_KEY") or None
    try:
        resolved = resolve_model(args.model)
        served_name = args.served_model_name or resolved.name
        engine = AsyncEngine.from_engine_args(EngineArgs(model=resolved.path, served_model_name=served_name,
                                                         **engine_kwargs(args)))
        app = build_app(engine, served_name, api_key=api_key, chat_template=args.chat_template)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    print(f"pagedllm: serving {served_name!r} at http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0
