"""Fused Gumbel-max sampling on the GPU: one Triton kernel reads each row of logits once and returns
argmax_v(logits[v] / T + G[v]), G = -log(-log(U)) with U drawn from Philox (tl.rand4x: four columns per call) keyed
by the row's seed and counted by the column, which is a draw from softmax(logits / T); greedy rows (flag, or
T == 0) take the plain argmax. Ties go to the lowest index, as torch.argmax; -inf entries are never chosen (an all
-inf row gives 0). A small batch also splits the vocabulary over several programs per row; a torch argmax over the
splits' partial maxima then picks the token.

A row's draw depends only on its seed (seeds.py derives them), never on the rest of the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_utils import num_sms

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperature_ptr, greedy_ptr, seeds_ptr, part_score_ptr, part_col_ptr,
                          vocab, span, stride_row, BLOCK: tl.constexpr):
    """Program (row, split): the best score, and its lowest column, of columns [split * span, (split + 1) * span)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_row
    temperature = tl.load(temperature_ptr + row)
    greedy = (tl.load(greedy_ptr + row) != 0) | (temperature == 0.0)
    seed = tl.load(seeds_ptr + row)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)  # running max of each lane over the chunks
    best_col = tl.zeros([BLOCK], tl.int32)
    lo = split * span
    hi = tl.minimum(lo + span, vocab)
    groups = tl.arange(0, BLOCK // 4)
    for start in range(lo, hi, BLOCK):
        cols = start + lanes
        score = tl.load(row_ptr + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        if not greedy:
            # One Philox call gives four words: column c takes word c % 4 of counter c // 4 (chunks start at
            # multiples of 4), so a column's number does not depend on BLOCK or the splits. The joins lay the four
            # words out as columns 4g, 4g + 1, 4g + 2, 4g + 3.
            u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + groups)
            u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])
            # v: u plus half its step (2**-32), uniform in (0, 1), never 0, fine-grained near 0. e = -log(1 - v)
            # is Exp(1), by its series where 1 - v would round (the winners' e are the small ones); G = -log(e).
            v = u + 2.3283064e-10
            e = tl.where(v < 0.015625, v * (1.0 + v * (0.5 + v * (0.33333334 + v * 0.25))), -tl.log(1.0 - v))
            score = score / temperature - tl.log(e)
        take = score > best  # strict: a lane keeps its earliest column on ties
        best = tl.where(take, score, best)
        best_col = tl.where(take, cols, best_col)
    top = tl.max(best, 0)
    part = row * tl.num_programs(1) + split
    tl.store(part_score_ptr + part, top)
    tl.store(part_col_ptr + part, tl.min(tl.where(best == top, best_col, hi), 0).to(tl.int64))


def choose_num_splits(batch: int, vocab: int, block: int, device: torch.device) -> int:
    """Split the vocabulary only when the batch alone leaves the GPU idle: about four programs per SM, each of at
    least one block. Elsewhere (Triton's CPU interpreter) one program per row."""
    if device.type != "cuda":
        return 1
    sms = num_sms(device)
    return max(1, min(triton.cdiv(4 * sms, max(batch, 1)), triton.cdiv(vocab, block)))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, seeds: torch.Tensor,
                  block: int = 2048, num_splits: int | None = None) -> torch.Tensor:
    """One token per row of logits [B, V] (float16, bfloat16 or float32): a draw from softmax(logits / T) with the
    row's seed (int64), or the argmax where greedy (bool) is set or the temperature (float32) is 0. Returns int64 [B].
    block (a power of two) and num_splits (programs per row) override the defaults (tests, benchmarks); the tokens
    do not depend on either."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"gumbel_sample: logits must be [batch, vocab] with vocab > 0, got {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"gumbel_sample: logits dtype {logits.dtype} is not supported (float16, bfloat16, float32)")
    batch, vocab = logits.shape
    for name, tensor, dtype in (("temperature", temperature, torch.float32), ("greedy", greedy, torch.bool),
                                ("seeds", seeds, torch.int64)):
        if tensor.shape != (batch,) or tensor.dtype != dtype:
            raise ValueError(f"gumbel_sample: {name} must be {dtype} [{batch}], got {tensor.dtype} "
                             f"{list(tensor.shape)}")
        if tensor.device != logits.device:
            raise ValueError(f"gumbel_sample: {name} is on {tensor.device}, logits on {logits.device}")
    if block < 4 or block & (block - 1):
        raise ValueError(f"gumbel_sample: block must be a power of two >= 4, got {block}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"gumbel_sample: num_splits must be >= 1, got {num_splits}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = max(4, min(block, triton.next_power_of_2(vocab)))  # at least one Philox call's four columns
    if num_splits is None:
        num_splits = choose_num_splits(batch, vocab, block, logits.device)
    span = triton.cdiv(triton.cdiv(vocab, num_splits), block) * block  # whole blocks; no split is empty
    num_splits = triton.cdiv(vocab, span)
    part_score = torch.empty(batch, num_splits, dtype=torch.float32, device=logits.device)
    part_col = torch.empty(batch, num_splits, dtype=torch.int64, device=logits.device)
    if batch > 0:
        _gumbel_argmax_kernel[(batch, num_splits)](
            logits, temperature.contiguous(), greedy.contiguous().view(torch.uint8), seeds.contiguous(),
            part_score, part_col, vocab, span, logits.stride(0), BLOCK=block,
            num_warps=max(1, min(8, block // 256)))
    if num_splits == 1:
        return part_col[:, 0]
    # splits cover increasing columns and argmax takes the first maximum: ties still go to the lowest column
    return part_col.gather(1, part_score.argmax(dim=1, keepdim=True))[:, 0]
