"""The decoder-only transformer of Llama (2, 3), Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm).

One module serves all four: they differ only in flags read from the config. Weights use Hugging Face's names except
that q/k/v are stacked into qkv_proj and gate/up into gate_up_proj (one matmul each); load_weights maps them.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.config import ModelConfig
from pagedllm.layers import blas_choice
from pagedllm.layers.linear import GEMV_MAX_ROWS, Linear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.backend = backend
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads, head_dim], bound later

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over norm(x + residual): returns (its output, the new residual)."""
        qkv, residual = self.qkv_proj.normed(x, residual, norm)
        if self.backend.name == "triton":  # q/k norms, rotary and the KV write in a kernel of their own, or in
            # the decode kernel (backend.attend_qkv)
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
            out = self.backend.attend_qkv(qkv, positions, self.kv_cache, meta, self.scale, self.num_heads,
                                          self.rotary.cos_cache, self.rotary.sin_cache, *norms)
        else:
            out = self.backend.attend(self._prepare(qkv, positions, meta), self.kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(x.shape[0], self.q_size)), residual

    def _prepare(self, qkv: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q/k norms, rotary and the KV write, one op at a time: returns q [num_tokens, num_heads, head_dim]."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        self.backend.write_kv(k, v, self.kv_cache, meta.slot_mapping)
        return q


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP over norm(x + residual): returns (its output, the new residual)."""
        h, residual = self.gate_up_proj.normed(x, residual, norm, act_silu_and_mul=True)
        return self.down_proj(h), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, positions, x, residual, meta):
        # Each norm runs inside the projection after it (Linear.normed): one kernel at decode's few rows.
        x, residual = self.self_attn(positions, x, residual, meta, self.input_layernorm)
        return self.mlp(x, residual, self.post_attention_layernorm)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    # HF checkpoint name -> (our parameter name, shard index) for stacked weights.
    _STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg, backend, max_position)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return blas_choice.linear(hidden, self.lm_head.weight, self.lm_head.bias)

    def tune_matmuls(self, batch_sizes: list[int]) -> None:
        """Choose cuBLAS or cuBLASLt for each matmul (the linear layers' and the lm_head's) at each of the decode
        batch sizes above the GEMV's rows (blas_choice.tune); below them the lm_head keeps the default."""
        weights = [m.weight for m in self.modules() if isinstance(m, Linear)] + [self.lm_head.weight]
        blas_choice.tune(weights, [b for b in batch_sizes if b > GEMV_MAX_ROWS])

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        for layer, cache in zip(self.model.layers, kv_caches):
            layer.self_attn.kv_cache = cache

    def shard_sizes(self, stacked_name: str) -> list[int]:
        attn = self.model.layers[0].self_attn
        if stacked_name == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        return [self.cfg.intermediate_size] * 2

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            target, shard = name, None
            for hf_part, (ours, index) in self._STACKED.items():
                if f".{hf_part}." in name:
                    target, shard = name.replace(f".{hf_part}.", f".{ours}."), index
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.cfg.architecture}")
            if shard is None:
                dest = param
            else:
                sizes = self.shard_sizes(target.split(".")[-2])
                dest = param.narrow(0, sum(sizes[:shard]), sizes[shard])
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(target if shard is None else f"{target}#{shard}")
        expected = set()
        for pname, _ in self.named_parameters():
            stacked = pname.split(".")[-2]
            if stacked in ("qkv_proj", "gate_up_proj"):
                if pname.endswith(".weight"):
                    expected |= {f"{pname}#{i}" for i in range(3 if stacked == "qkv_proj" else 2)}
                else:
                    expected |= {f"{pname}#{i}" for i in range(3)}
            else:
                expected.add(pname)
        if self.cfg.tie_word_embeddings:
            expected.discard("lm_head.weight")
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
