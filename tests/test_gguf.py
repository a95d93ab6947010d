"""GGUF loading: tiny GGUF files written here with the gguf package (quantized with gguf.quants), loaded with
load_gguf, and checked against the weights that went in and against transformers' own GGUF reading."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from pagedllm.worker.gguf_loader import load_gguf  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16

# Per tensor kind, the storage type of the default file: a mix of block quantizations and plain floats.
MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F16, "attn_output": Q.Q4_1,
         "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "output": Q.Q8_0}


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return list(bytes_to_unicode().values())


def _vocab() -> list[str]:
    return SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (pairs the rotary halves), written out for the test."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _store(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, what reading it back must give, in float32)."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    try:
        data = quantize(w.astype(np.float32), qtype)
    except NotImplementedError:  # a type gguf cannot write (nor read): random raw blocks of the right size
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        shape = (*w.shape[:-1], w.shape[-1] // block_elements * block_bytes)
        return np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), np.full(w.shape, np.nan)
    return data, dequantize(data, qtype).astype(np.float32)


def write_tiny_gguf(path: Path, arch: str = "llama", types: dict | None = None, tied: bool = False,
                    seed: int = 0, drop: str | None = None, rope_theta: float = 10000.0,
                    rope_freqs: np.ndarray | None = None, rope_scaling: tuple | None = None) -> dict[str, np.ndarray]:
    """Write a tiny GGUF of `arch` (llama, qwen2 or qwen3) and return the HF-named float32 weights that
    reading it must give. Quantization works on rows independently, so for the permuted q/k the expected
    HF weight is simply dequantize(quantize(w))."""
    types = MIXED if types is None else types
    rng = np.random.default_rng(seed)
    vocab = _vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(HEAD_DIM)
    if rope_scaling is not None:  # (type, factor, original context length)
        writer.add_rope_scaling_type(rope_scaling[0])
        writer.add_rope_scaling_factor(rope_scaling[1])
        writer.add_rope_scaling_orig_ctx_len(rope_scaling[2])
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                           + [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], kind: str | None, permute_heads: int = 0,
            scale: float = 0.15) -> None:
        if gguf_name == drop:
            return
        w = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind is None:  # norms: F32, around 1
            w = 1.0 + w
        qtype = Q.F32 if kind is None else types.get(kind, Q.F32)
        stored = w
        if permute_heads and arch == "llama":
            stored = _llama_cpp_permute(w, permute_heads)
        data, _ = _store(stored, qtype)
        _, expected[hf_name] = _store(w, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)

    add("token_embd.weight", "model.embed_tokens.weight", (len(vocab), HIDDEN), "token_embd", scale=1.0)
    for i in range(LAYERS):
        blk, hf = f"blk.{i}", f"model.layers.{i}"
        add(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", (HIDDEN,), None)
        add(f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), "attn_q", HEADS)
        add(f"{blk}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "attn_k",
            KV_HEADS)
        add(f"{blk}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v")
        if arch == "qwen2":
            add(f"{blk}.attn_q.bias", f"{hf}.self_attn.q_proj.bias", (HEADS * HEAD_DIM,), "bias")
            add(f"{blk}.attn_k.bias", f"{hf}.self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,), "bias")
            add(f"{blk}.attn_v.bias", f"{hf}.self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,), "bias")
        if arch == "qwen3":
            add(f"{blk}.attn_q_norm.weight", f"{hf}.self_attn.q_norm.weight", (HEAD_DIM,), None)
            add(f"{blk}.attn_k_norm.weight", f"{hf}.self_attn.k_norm.weight", (HEAD_DIM,), None)
        add(f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), "attn_output")
        add(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (HIDDEN,), None)
        add(f"{blk}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), "ffn_gate")
        add(f"{blk}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), "ffn_up")
        add(f"{blk}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), "ffn_down")
    add("output_norm.weight", "model.norm.weight", (HIDDEN,), None)
    if not tied:
        add("output.weight", "lm_head.weight", (len(vocab), HIDDEN), "output", scale=0.5)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _hf_model_with(config, tensors: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert missing in ([], ["lm_head.weight"])  # lm_head is the embedding when tied
    return model


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_weights_match_what_went_in(tmp_path, arch, tied):
    path = tmp_path / f"{arch}.gguf"
    expected = write_tiny_gguf(path, arch=arch, tied=tied)
    checkpoint = load_gguf(str(path))
    loaded = dict(checkpoint.tensors())
    assert sorted(loaded) == sorted(expected)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, torch.from_numpy(expected[name]), rtol=0, atol=0, msg=name)
    config = checkpoint.config
    assert type(config).__name__ == {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[arch]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (LAYERS, HIDDEN, INTERMEDIATE)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config.vocab_size == len(_vocab()) and config.tie_word_embeddings is tied
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.F16, Q.F32], ids=lambda q: q.name)
def test_each_storage_type(tmp_path, qtype):
    path = tmp_path / "one-type.gguf"
    expected = write_tiny_gguf(path, types={kind: qtype for kind in MIXED})
    for name, tensor in load_gguf(str(path)).tensors():
        torch.testing.assert_close(tensor, torch.from_numpy(expected[name]), rtol=0, atol=0, msg=name)


def test_logits_match_transformers_own_gguf_reading(tmp_path):
    """The HF model built from our config and tensors gives the logits of the HF model that transformers
    builds from its own GGUF config and its own GGUF tensor conversion (its q/k un-permutation included)."""
    from transformers import AutoConfig
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path)
    checkpoint = load_gguf(str(path))
    ours = _hf_model_with(checkpoint.config, dict(checkpoint.tensors()))
    their_config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # only its parameter names are used, to map the GGUF names
        skeleton = AutoModelForCausalLM.from_config(their_config)
    parsed = utils.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    theirs = _hf_model_with(their_config, parsed["tensors"])
    reference = _hf_model_with(checkpoint.config, {k: torch.from_numpy(v) for k, v in expected.items()})
    ids = torch.tensor([[1, 5, 40, 77, 120, 200, 260, 3, 2]])
    with torch.no_grad():
        ours_logits, their_logits, ref_logits = ours(ids).logits, theirs(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours_logits, their_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert ours_logits.std() > 0.1  # not a degenerate model
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "vocab_size",
                "bos_token_id", "eos_token_id", "rope_parameters"):
        assert getattr(checkpoint.config, key) == getattr(their_config, key), key


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp writes Llama-3.1 rope scaling as per-frequency divisors; we must give back the llama3
    parameters. The divisors are made here from transformers' llama3 rope: default inv_freq / llama3 inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    divisors = (base / scaled.double()).numpy()
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(32.0)
    path = tmp_path / "llama31.gguf"
    expected = write_tiny_gguf(path, rope_theta=500000.0, rope_freqs=divisors)
    checkpoint = load_gguf(str(path))
    assert checkpoint.config.rope_parameters == rope
    assert sorted(n for n, _ in checkpoint.tensors()) == sorted(expected)  # rope_freqs is not a parameter
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, rope_freqs=np.linspace(1.0, 3.0, HEAD_DIM // 2))
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf(str(path))


@pytest.mark.parametrize("kind,expected", [
    (gguf.RopeScalingType.LINEAR, {"rope_type": "linear", "factor": 4.0}),
    (gguf.RopeScalingType.YARN, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    (gguf.RopeScalingType.NONE, {"rope_type": "default"}),
], ids=lambda v: getattr(v, "value", None) or "")
def test_rope_scaling_metadata(tmp_path, kind, expected):
    path = tmp_path / "scaled.gguf"
    write_tiny_gguf(path, rope_scaling=(kind, 4.0, 64))
    assert load_gguf(str(path)).config.rope_parameters == {"rope_theta": 10000.0, **expected}


def test_tokenizer_and_chat_template(tmp_path):
    from transformers import PreTrainedTokenizerFast
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    tokenizer = load_gguf(str(path)).tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    vocab = _vocab()
    assert len(tokenizer) == len(vocab)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    ids = tokenizer("Hello world").input_ids
    assert [vocab[i] for i in ids] == ["Hello", "Ġworld"]  # the merges in the file were applied
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello world"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tokenizer(text).input_ids
    assert chat_ids[0] == 1 and chat_ids.count(2) == 1  # special tokens stay whole
    assert tokenizer.decode(chat_ids) == text


def test_load_is_cached_and_tensors_can_be_read_twice(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    first = load_gguf(str(path))
    assert load_gguf(str(path)) is first
    names = [n for n, _ in first.tensors()]
    assert names == [n for n, _ in first.tensors()]
    os.utime(path, ns=(1, 1))  # a changed file is read again
    assert load_gguf(str(path)) is not first


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'.*not supported"):
        load_gguf(str(path))


def test_unsupported_quant_type(tmp_path):
    """Q8_1 is a type the gguf package cannot dequantize: a clear error at load time, not mid-way."""
    path = tmp_path / "q81.gguf"
    write_tiny_gguf(path, types={**MIXED, "ffn_up": Q.Q8_1})
    with pytest.raises(ValueError, match="Q8_1"):
        load_gguf(str(path))


def test_missing_tensor_and_bad_files(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, drop="blk.1.ffn_down.weight")
    with pytest.raises(ValueError, match=r"lacks tensors for model\.layers\.1\.mlp\.down_proj\.weight"):
        load_gguf(str(path))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(str(not_gguf))
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(str(tmp_path / "absent.gguf"))
