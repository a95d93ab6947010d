"""`pagedllm serve` as a user runs it: a real subprocess, found healthy over HTTP, answering the openai client."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from tests.server_fixtures import STORIES_GREEDY, free_port, need_stories

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pagedllm.cli", "serve", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_serve_subprocess_end_to_end():
    port = free_port()
    process = _serve([need_stories(), "--port", str(port), "--device", "cpu", "--kv-cache-memory", str(64 << 20),
                      "--served-model-name", "stories", "--log-level", "warning"],
                     env={"PAGEDLLM_API_KEY": "from-env"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.2)
        assert httpx.get(base + "/v1/models").status_code == 401  # the key came from PAGEDLLM_API_KEY
        client = openai.OpenAI(base_url=base + "/v1", api_key="from-env", max_retries=0)
        assert client.models.list().data[0].id == "stories"
        response = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=40,
                                             temperature=0)
        assert response.choices[0].text == STORIES_GREEDY
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    output = process.stdout.read()
    assert f"serving 'stories' at http://127.0.0.1:{port}/v1 (API key required)" in output
    assert process.returncode == 0, output


def test_serve_reports_a_bad_model_cleanly(tmp_path):
    process = _serve([str(tmp_path / "no-such-model"), "--port", str(free_port())])
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "error:" in output and "no-such-model" in output
    assert "Traceback" not in output
