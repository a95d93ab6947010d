"""Model files in their several forms: sharded safetensors with an index, pytorch_model.bin, transformers 4 and 5
config forms, dummy weights; and chat through the tokenizer's chat template."""
import json

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.conftest import QWEN3_TOKENIZER, build_tiny_model, hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _ours(path, prompts, **kwargs):
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                          use_tqdm=False)]


@pytest.mark.parametrize("form", ["sharded_safetensors", "pytorch_bin"])
def test_checkpoint_forms(tmp_path, form):
    from transformers import AutoModelForCausalLM
    source = build_tiny_model("qwen2", tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    path = tmp_path / form
    if form == "sharded_safetensors":
        model.save_pretrained(path, max_shard_size="100KB")
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("*.safetensors"))) > 2
    else:
        model.save_pretrained(path, safe_serialization=False)
        if not list(path.glob("pytorch_model*.bin")):  # transformers 5 always writes safetensors
            torch.save(model.state_dict(), path / "pytorch_model.bin")
            for f in path.glob("*.safetensors"):
                f.unlink()
        assert not list(path.glob("*.safetensors"))
    prompts = random_prompts(3, seed=60)
    assert _ours(path, prompts) == hf_greedy(source, prompts, 16)


def test_transformers4_config_form(tmp_path):
    path = build_tiny_model("llama3-mqa", tmp_path / "model")
    prompts = random_prompts(3, seed=61)
    expected = _ours(path, prompts)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(config))
    assert "rope_parameters" not in (path / "config.json").read_text()
    assert _ours(path, prompts) == expected


def test_dummy_weights_are_deterministic_and_finite(tmp_path):
    path = build_tiny_model("qwen3", tmp_path / "model")
    prompts = random_prompts(3, seed=62)
    a = _ours(path, prompts, load_format="dummy", seed=1)
    b = _ours(path, prompts, load_format="dummy", seed=1)
    c = _ours(path, prompts, load_format="dummy", seed=2)
    assert a == b and a != c
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, load_format="dummy")
    out = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=4, logprobs=2, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert all(torch.isfinite(torch.tensor(lp.logprob)) for entry in out.logprobs for lp in entry.values())


def test_chat_uses_the_chat_template(tmp_path):
    if not QWEN3_TOKENIZER.exists():
        pytest.skip("../shared/tokenizers/qwen3 is not here")
    from transformers import AutoTokenizer
    path = build_tiny_model("qwen3", tmp_path / "model", vocab_size=151936)
    tokenizer = AutoTokenizer.from_pretrained(QWEN3_TOKENIZER)
    tokenizer.save_pretrained(path)
    llm = LLM(str(path), dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(expected, dict):
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    assert "<|im_start|>assistant" in tokenizer.decode(out.prompt_token_ids)
    both = llm.chat([messages, messages[1:]], GREEDY, use_tqdm=False)
    assert len(both) == 2 and both[0].prompt_token_ids == out.prompt_token_ids
    assert out.metrics.arrival_time <= out.metrics.first_token_time <= out.metrics.finished_time
