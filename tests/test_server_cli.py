"""`pagedllm serve` as a user runs it: a real subprocess, found healthy over HTTP, answering the openai client."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from pagedllm.cli import main
from tests.server_fixtures import STORIES_GREEDY, free_port, need_stories, stop_process, wait_healthy

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
        wait_healthy(process, base)
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


def test_serve_engine_options_and_api_key_flag_take_effect():
    """Every engine flag reaches the engine: the startup lines name the dtype, the load format and the KV blocks
    (on the CPU: max_num_seqs full sequences of max_model_len, in blocks of block_size); /v1/models and the 400s
    carry the served name, max_model_len and max_num_seqs; --seed makes the dummy weights, so the served greedy
    text is the one of an offline LLM with the same options and seed (and not with another seed). --api-key wins
    over $PAGEDLLM_API_KEY."""
    from pagedllm import LLM, SamplingParams
    port = free_port()
    options = {"max_model_len": 96, "max_num_seqs": 2, "block_size": 32, "dtype": "bfloat16",
               "max_num_batched_tokens": 48, "load_format": "dummy", "gpu_memory_utilization": 0.5}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    process = _serve([need_stories(), "--port", str(port), "--device", "cpu", "--api-key", "from-flag",
                      "--served-model-name", "story-cli", "--seed", "1234", "--log-level", "info", *flags],
                     env={"PAGEDLLM_API_KEY": "from-env"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base)  # /health needs no key
        assert httpx.get(base + "/v1/models").status_code == 401
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer from-env"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=base + "/v1", api_key="from-flag", max_retries=0, timeout=60)
        card = client.models.list().data[0]
        assert card.id == "story-cli" and card.model_extra["max_model_len"] == 96
        with pytest.raises(openai.BadRequestError) as too_long:
            client.completions.create(model="story-cli", prompt=[5] * 96, max_tokens=1)
        assert "maximum context length is 96 tokens" in too_long.value.body["message"]
        with pytest.raises(openai.BadRequestError) as no_room:
            client.completions.create(model="story-cli", prompt=[5] * 90, max_tokens=10)
        assert "96" in no_room.value.body["message"] and no_room.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError) as too_many:
            client.completions.create(model="story-cli", prompt="Once upon a time", n=3, max_tokens=2)
        assert "max_num_seqs (2)" in too_many.value.body["message"]
        served = client.completions.create(model="story-cli", prompt="Once upon a time", max_tokens=20,
                                           temperature=0).choices[0].text
        # A prompt longer than --max-num-batched-tokens is prefilled in chunks and still answered.
        long_prompt = client.completions.create(model="story-cli", prompt=[1] + [300 + i for i in range(70)],
                                                max_tokens=5, temperature=0)
        assert long_prompt.usage.prompt_tokens == 71 and long_prompt.usage.completion_tokens == 5
    finally:
        output = stop_process(process)
    assert process.returncode == 0, output
    assert "loaded LlamaForCausalLM weights (dummy)" in output, output
    assert "model story-cli, bfloat16, 8 KV blocks of 32 tokens" in output, output
    assert "at max_model_len 96" in output, output
    assert f"serving 'story-cli' at http://127.0.0.1:{port}/v1 (API key required)" in output

    def offline(seed: int) -> str:
        llm = LLM(need_stories(), device="cpu", seed=seed, **options)
        return llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20),
                            use_tqdm=False)[0].outputs[0].text

    assert served == offline(1234)
    assert served != offline(0) and not STORIES_GREEDY.startswith(served)  # the seed and the dummy weights count


@pytest.mark.parametrize("flags,message", [
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["--max-num-batched-tokens", "0"], "max_num_batched_tokens must be >= 1, got 0"),
    (["--load-format", "npz"], "load_format must be one of"),
    (["--max-model-len", "4096"], "max_model_len (4096) is larger than the model allows (512"),
    (["--block-size", "24"], "block_size must be a power of two"),
    (["--dtype", "int8"], "dtype must be 'auto' or one of"),
])
def test_serve_refuses_bad_engine_options(flags, message, capsys):
    """The CLI's own entry point (no server starts): a bad engine option is a one-line error and exit code 2."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", need_stories(), "--port", str(free_port()), "--device", "cpu", *flags])
    assert exited.value.code == 2
    output = capsys.readouterr().out
    assert output.startswith("error: ") and message in output, output
