"""Shared fixtures: tiny random Hugging Face models built and saved by the tests, and ../shared's real model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PAGEDLLM_SHARED", REPO.parent / "shared"))  # the GPU machine carries a copy
STORIES = SHARED / "models" / "stories260K"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"

# Architecture -> (transformers config class name, extra config fields). Head counts give MHA, GQA and MQA.
TINY_CONFIGS = {
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
}


def build_tiny_model(kind: str, path: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Save a tiny random model of the given kind with save_pretrained (weights scaled up so logits are peaked)."""
    import transformers
    config_class_name, extra = TINY_CONFIGS[kind]
    config = getattr(transformers, config_class_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.1, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    if STORIES.exists():  # a real tokenizer of the same vocabulary size, when ../shared is there
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(STORIES).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: build_tiny_model(kind, root / kind) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama-gqa"]


@pytest.fixture(scope="session")
def stories_path():
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not here")
    return str(STORIES)


def hf_greedy(model_path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt by Hugging Face transformers (fp32, CPU, one prompt at a time)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    outs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


def random_prompts(n: int, vocab_size: int = 512, min_len: int = 3, max_len: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (length,), generator=g).tolist() for length in lengths]


def all_blocks_free(llm) -> bool:
    engine = llm.llm_engine
    return engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks and not engine.kv_cache.block_tables


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
