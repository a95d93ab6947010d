"""One weight loader, formats behind it: safetensors (sharded too), pytorch_model.bin, GGUF, and dummy weights."""
from __future__ import annotations

import glob
import json
import logging
import math
import os
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def iterate_checkpoint(path: str, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) for every tensor of the checkpoint at path (a directory or a .gguf file)."""
    if path.endswith(".gguf") or load_format == "gguf":
        from pagedllm.worker.gguf_loader import load_gguf
        yield from load_gguf(path).tensors()
        return
    files = _safetensors_files(path) if load_format in ("auto", "safetensors") else []
    if files:
        from safetensors import safe_open
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins or load_format == "safetensors":
        raise ValueError(f"No weights found in {path!r} (looked for *.safetensors"
                         f"{'' if load_format == 'safetensors' else ' and pytorch_model*.bin'}).")
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True)
        yield from state.items()


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, shard) for shard in shards]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes, deterministic from the seed, scaled so activations stay finite:
    linear and embedding weights ~ U(-a, a) with a = 1/sqrt(fan_in) (embeddings: a small constant), norms = 1,
    biases = 0."""
    params = list(model.named_parameters())
    device = params[0][1].device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in params:
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            fan_in = param.shape[-1]
            bound = 0.02 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
            noise = torch.empty(param.shape, dtype=torch.float32, device=device)
            noise.uniform_(-bound, bound, generator=generator)
            param.copy_(noise)
