"""GGUF checkpoints: a transformers config, a tokenizer and float32 tensors under Hugging Face names.

The file is read with the `gguf` package (GGUFReader, gguf.quants.dequantize); the tensor names are
mapped with gguf's own HF -> GGUF name table, applied to the parameter names of the transformers model
class that the config describes (built on the meta device, so no memory is spent). The tokenizer
comes from transformers' GGUF tokenizer conversion, chat template included.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

# general.architecture -> (transformers model_type, architecture class, q/k rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
_CONFIG_TENSORS = {"rope_freqs.weight"}  # tensors that describe the config, not parameters


@dataclass
class GGUFCheckpoint:
    """One GGUF file: `config` (eager), `tokenizer` (built on first use), `tensors()` (streamed)."""
    path: str
    config: Any  # transformers.PretrainedConfig
    _reader: Any = field(repr=False)
    _permute_qk: bool = field(repr=False, default=False)
    _name_map: dict[str, str] = field(repr=False, default_factory=dict)  # GGUF name -> HF name

    @functools.cached_property
    def tokenizer(self):
        """A transformers PreTrainedTokenizerFast built from the file's vocabulary, with its chat template."""
        from transformers import AutoTokenizer
        directory, filename = os.path.split(os.path.abspath(self.path))
        try:
            return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds
            raise ValueError(f"could not build a tokenizer from the GGUF file {self.path!r}: {error}") from error

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, float32 tensor) for every weight, dequantized one at a time."""
        from gguf.quants import dequantize
        heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        for tensor in self._reader.tensors:
            hf_name = self._name_map.get(tensor.name)
            if hf_name is None:  # read into the config (rope_freqs), not a parameter
                continue
            try:
                weights = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as error:
                raise ValueError(f"GGUF tensor {tensor.name} of {self.path!r} has type {tensor.tensor_type.name}, "
                                 f"which the gguf package cannot dequantize: {error}") from error
            if self._permute_qk and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                weights = _unpermute_rope_rows(weights, heads)
            elif self._permute_qk and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                weights = _unpermute_rope_rows(weights, kv_heads)
            if weights.dtype != np.float32 or not weights.flags.writeable:  # F32/F16 tensors are views of the file
                weights = np.array(weights, dtype=np.float32)
            yield hf_name, torch.from_numpy(np.ascontiguousarray(weights))


def load_gguf(path: str) -> GGUFCheckpoint:
    """Open a GGUF file and check that every tensor can be loaded. Raises ValueError for an unreadable file,
    an unsupported architecture or quantization type, or tensors that do not fit the architecture."""
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist.")
    stat = os.stat(path)
    # Cached: the engine asks for config, tokenizer and tensors separately, and parsing the metadata of a
    # real file (a vocabulary of ~50k strings) takes seconds.
    return _load_cached(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, size: int, mtime_ns: int) -> GGUFCheckpoint:
    del size, mtime_ns  # part of the cache key only
    import gguf
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (it does not start with the GGUF magic bytes).")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # noqa: BLE001 - the reader raises many kinds on a damaged file
        raise ValueError(f"could not read the GGUF file {path!r}: {error}") from error
    metadata = _scalar_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} of {path!r} is not supported; "
                         f"supported: {', '.join(sorted(_ARCHITECTURES))}.")
    _check_quant_types(reader, path)
    config = _build_config(reader, metadata, arch)
    name_map = _hf_name_map(reader, config, arch, path)
    logger.info("GGUF %s: %s, %d layers, %d tensors", os.path.basename(path), config.architectures[0],
                config.num_hidden_layers, len(reader.tensors))
    return GGUFCheckpoint(path=path, config=config, _reader=reader, _permute_qk=_ARCHITECTURES[arch][2],
                          _name_map=name_map)


def _scalar_metadata(reader) -> dict[str, Any]:
    """Every metadata value except long arrays (vocabulary, merges, scores), which are given as their length."""
    import gguf
    metadata = {}
    for key, value in reader.fields.items():
        is_array = bool(value.types) and value.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and (value.types[-1] == gguf.GGUFValueType.STRING or len(value.data) > 4096):
            metadata[key] = len(value.data)
        else:
            metadata[key] = value.contents()
    return metadata


def _check_quant_types(reader, path: str) -> None:
    """Fail at load time, not halfway through the weights, on a type the gguf package cannot dequantize."""
    import gguf
    import gguf.quants
    # gguf keeps its table of dequantizable block types private; without it, tensors() still raises per tensor
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:
        return
    supported = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits}
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in supported})
    if bad:
        raise ValueError(f"GGUF file {path!r} holds tensors of type {', '.join(bad)}, which the gguf package "
                         f"cannot dequantize; supported: {', '.join(sorted(t.name for t in supported))}.")


def _build_config(reader, metadata: dict[str, Any], arch: str):
    """A transformers config of the file's architecture, from llama.cpp's metadata keys."""
    from transformers import AutoConfig
    model_type, architecture, _ = _ARCHITECTURES[arch]

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF file is missing the metadata key {arch}.{name!r}.")
        return value

    tensor_shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # some files give one count per layer
        if len(set(kv_heads)) != 1:
            raise ValueError(f"GGUF file has a different number of KV heads per layer ({kv_heads}); not supported.")
        kv_heads = kv_heads[0]
    head_dim = metadata.get(f"{arch}.attention.key_length") or hidden // heads
    rotary_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"GGUF file rotates {rotary_dim} of {head_dim} head dimensions; partial rotary "
                         "embeddings are not supported.")
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor.")
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    rope.update(_rope_scaling(metadata, arch))
    if "rope_freqs.weight" in tensor_shapes:
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        rope = _llama3_rope(np.asarray(factors, dtype=np.float64), rope["rope_theta"], head_dim)
    config: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": tensor_shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": key("context_length"),
        "rope_parameters": rope,
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": metadata.get("tokenizer.ggml.unknown_token_id"),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    dtype = _file_dtype(reader)
    if dtype is not None:
        config["dtype"] = dtype
    return AutoConfig.for_model(model_type, **config)


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return {}
    if factor is None:
        raise ValueError(f"GGUF rope scaling {kind!r} has no {arch}.rope.scaling.factor.")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        yarn = {"rope_type": "yarn", "factor": float(factor)}
        for gguf_key, hf_key in (("rope.scaling.original_context_length", "original_max_position_embeddings"),
                                 ("rope.scaling.attn_factor", "attention_factor"),
                                 ("rope.scaling.yarn_beta_fast", "beta_fast"),
                                 ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if f"{arch}.{gguf_key}" in metadata:
                yarn[hf_key] = metadata[f"{arch}.{gguf_key}"]
        return yarn
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (only linear and yarn).")


# Llama 3.1/3.2/3.3 all use these; the factor is read off the file.
_LLAMA3_ROPE_SHAPES = ({"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama-3.1-style rope scaling. llama.cpp stores it as a tensor of per-frequency divisors (rope_freqs),
    not as parameters: find the llama3 parameters that give exactly those divisors, computed with
    transformers' own llama3 rope, or refuse."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(np.round(factors.max(), 4))
    for shape in _LLAMA3_ROPE_SHAPES:
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, **shape}
        config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_parameters=rope)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        if factors.shape == base.shape and np.allclose(base / scaled.double().numpy(), factors, rtol=1e-4):
            return rope
    raise ValueError("GGUF file carries rope frequency factors (rope_freqs) that match no Llama-3 rope scaling "
                     f"(tried factor {factor} with {list(_LLAMA3_ROPE_SHAPES)}); use the HF checkpoint.")


def _file_dtype(reader) -> str | None:
    """The float type of an unquantized file (its half type, the norms being F32), None if quantized."""
    types = {t.tensor_type.name for t in reader.tensors}
    if not types <= {"F32", "F16", "BF16"}:
        return None
    return "bfloat16" if "BF16" in types else "float16" if "F16" in types else "float32"


def _hf_name_map(reader, config, arch: str, path: str) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, checked both ways and on shapes."""
    import gguf
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hf_shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    table = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    to_hf = {}
    for hf_name in hf_shapes:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = table.get_name(base)
        if gguf_base is not None:
            to_hf[f"{gguf_base}.{suffix}"] = hf_name
    unknown = [t.name for t in reader.tensors if t.name not in to_hf and t.name not in _CONFIG_TENSORS]
    if unknown:
        raise ValueError(f"GGUF file {path!r} has tensors that {config.architectures[0]} does not: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}.")
    tensors = [t for t in reader.tensors if t.name not in _CONFIG_TENSORS]
    present = {to_hf[t.name] for t in tensors}
    missing = [n for n in hf_shapes if n not in present and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"GGUF file {path!r} lacks tensors for {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}.")
    for t in tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != hf_shapes[to_hf[t.name]]:
            raise ValueError(f"GGUF tensor {t.name} has shape {shape}, but {to_hf[t.name]} needs "
                             f"{hf_shapes[to_hf[t.name]]}.")
    return {t.name: to_hf[t.name] for t in tensors}


def _unpermute_rope_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, HF keeps the two rotary halves in two blocks
    [x0..x{d/2-1}, y0..], llama.cpp interleaves them [x0, y0, x1, y1, ...] for its rope kernel."""
    rows = weights.shape[0]
    head_dim = rows // num_heads
    return (weights.reshape(num_heads, head_dim // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
