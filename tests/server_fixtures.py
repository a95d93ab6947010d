"""Helpers for the server tests: a real uvicorn server on a loopback port, in a thread of the test process.

The server runs in-process so tests can read the engine's own state (KV blocks, stats) next to what HTTP says.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import STORIES, build_tiny_model

STORIES_GREEDY = (", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a "
                  "big, red ball.")
# A small ChatML-like template for models whose tokenizer has none (stories260K, the tiny random models).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_stories() -> str:
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not here")
    return str(STORIES)


def build_tiny_chat_model(path: Path) -> str:
    """A tiny random Qwen3 with stories260K's tokenizer and a chat template in its tokenizer_config.json."""
    need_stories()
    build_tiny_model("qwen3", path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return str(path)


def wait_healthy(process, base: str, timeout: float = 90) -> None:
    """Wait until a server started as a subprocess answers /health (failing with its output if it exits)."""
    import httpx
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.2)


def stop_process(process) -> str:
    """SIGINT, as a user's Ctrl-C. Returns everything the server printed."""
    import signal
    import subprocess
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return output


class ServerThread:
    """uvicorn serving build_app(...) on 127.0.0.1:<free port> until stop()."""

    def __init__(self, model: str, api_key: str | None = None, served_model_name: str | None = None,
                 chat_template: str | None = None, **engine_kwargs) -> None:
        import uvicorn

        from pagedllm.config import EngineArgs
        from pagedllm.engine.async_engine import AsyncEngine
        from pagedllm.server.api import build_app

        engine_kwargs.setdefault("device", "cpu")
        engine_kwargs.setdefault("kv_cache_memory", 64 << 20)
        self.engine = AsyncEngine.from_engine_args(EngineArgs(model=model, served_model_name=served_model_name,
                                                              **engine_kwargs))
        self.app = build_app(self.engine, served_model_name, api_key=api_key, chat_template=chat_template)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def llm_engine(self):
        return self.engine.engine

    def blocks_all_free(self) -> bool:
        kv = self.llm_engine.kv_cache
        return kv.pool.num_free_blocks == kv.num_blocks and not kv.block_tables

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the engine holds no request and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.llm_engine.has_unfinished_requests() and self.blocks_all_free():
                return True
            time.sleep(0.02)
        return False

    def client(self, api_key: str = "none", **kwargs):
        import openai
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.shutdown()
