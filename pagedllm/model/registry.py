"""Which architectures we run, and the model class for each."""
from __future__ import annotations

from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


def resolve_architecture(hf_config: dict[str, Any]) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if not archs and hf_config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf_config["model_type"]]
    raise ValueError(f"Model architecture {archs or hf_config.get('model_type')!r} is not supported. "
                     f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}.")


def get_model_class(architecture: str):
    from pagedllm.model.llama import DecoderForCausalLM
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"Model architecture {architecture!r} is not supported. "
                         f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    return DecoderForCausalLM
