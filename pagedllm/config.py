"""Engine configuration: the user's arguments (EngineArgs), the model's facts (ModelConfig) and derived sizes."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "gguf")
DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30  # bytes; further capped by what max_num_seqs full sequences can use


@dataclass
class EngineArgs:
    """The LLM(...) keyword arguments, with vLLM's names and defaults."""
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    seed: int = 0
    enforce_eager: bool = False
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    device: str = "auto"
    served_model_name: str | None = None
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    swap_space: float = 4.0  # GiB of host memory for swap preemption
    # Launch each step before the previous one's tokens reach the host, so that the host's work overlaps the
    # device's. None: the environment's PAGEDLLM_ASYNC_SCHEDULING (1 or 0) if set, else on for CUDA and off on the
    # CPU (where nothing runs asynchronously, so it only adds a step).
    async_scheduling: bool | None = None
    hf_config: dict | None = field(default=None, repr=False)  # a config dict given directly (dummy weights)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty path or name.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}.")
        if not isinstance(self.max_num_seqs, int) or not 1 <= self.max_num_seqs <= 65535:
            raise ValueError(f"max_num_seqs must be an integer in [1, 65535] (the GPU decode kernel's grid holds "
                             f"one sequence per row), got {self.max_num_seqs!r}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 1 or bs > 256 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two in [1, 256], got {bs!r}.")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}.")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}.")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}.")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}.")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}.")


@dataclass
class ModelConfig:
    """What the engine needs to know about the model, read from config.json (transformers 4 or 5 forms)."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: list[int]
    sliding_window: int | None
    hf_config: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        from pagedllm.model.registry import resolve_architecture
        arch = resolve_architecture(cfg)
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = rope
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu').")
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:
            window = None
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM", dtype=_DTYPES.get(str(dtype_name), torch.float32),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            sliding_window=window, hf_config=cfg)

    @classmethod
    def from_path(cls, path: str) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"No config.json in {path!r}: give a Hugging Face model directory.")
        with open(config_path) as f:
            return cls.from_dict(json.load(f))


@dataclass
class EngineConfig:
    """Everything derived once at startup from EngineArgs and the model."""
    args: EngineArgs
    model: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    max_num_batched_tokens: int
    block_size: int
    async_scheduling: bool = False

    @classmethod
    def create(cls, args: EngineArgs, model: ModelConfig) -> "EngineConfig":
        device = _pick_device(args.device)
        dtype = _pick_dtype(args.dtype, model.dtype, device)
        limit = model.max_position_embeddings
        if model.sliding_window is not None and model.sliding_window < limit:
            limit = model.sliding_window  # no sliding-window attention: stay inside the window
        if args.max_model_len is None:
            max_model_len = limit
        elif args.max_model_len > limit:
            raise ValueError(f"max_model_len ({args.max_model_len}) is larger than the model allows ({limit}: "
                             "max_position_embeddings or the sliding window).")
        else:
            max_model_len = args.max_model_len
        max_batched = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
        return cls(args=args, model=model, device=device, dtype=dtype, max_model_len=max_model_len,
                   max_num_batched_tokens=max_batched, block_size=args.block_size,
                   async_scheduling=_pick_async_scheduling(args.async_scheduling, device))


def _pick_async_scheduling(asked: bool | None, device: torch.device) -> bool:
    if asked is not None:
        return asked
    env = os.environ.get("PAGEDLLM_ASYNC_SCHEDULING", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"PAGEDLLM_ASYNC_SCHEDULING must be 1 or 0, got {env!r}.")
    return env == "1" if env else device.type == "cuda"


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available.")
    return torch.device(name)


def _pick_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu" and model_dtype == torch.float16:
        logger.info("float16 weights run as float32 on the CPU")
        return torch.float32
    if device.type == "cuda" and model_dtype == torch.float32:
        logger.info("float32 weights run as bfloat16 on the GPU (pass dtype='float32' to keep them)")
        return torch.bfloat16
    return model_dtype
