"""Fused Gumbel-max sampling on the GPU: one Triton kernel reads each row of logits once and returns
argmax_v(logits[v] / T + G[v]), G = -log(-log(U)) with U drawn from Philox (tl.rand4x: four columns per call) keyed
by the row's seed and counted by the column, which is a draw from softmax(logits / T); greedy rows (flag, or
T == 0) take the plain argmax. Ties go to the lowest index, as torch.argmax; -inf entries are never chosen (an all
-inf row gives 0). A small batch also splits the vocabulary over several programs per row; the last of a row's
programs to finish (a counter per row) picks the token from the splits' partial maxima, so a call is one kernel.
argmax_rows() is the same kernel for a batch of greedy rows only: no temperatures, flags or seeds to load.

A row's draw depends only on its seed (seeds.py derives them), never on the rest of the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pagedllm.attention.triton_utils import num_sms

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: kernels read it

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temperature_ptr, greedy_ptr, seeds_ptr, part_score_ptr, part_col_ptr,
                          count_ptr, out_ptr, vocab, span, stride_row, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                          ALL_GREEDY: tl.constexpr, FAST_LOG: tl.constexpr):
    """Program (row, split): the best score, and its lowest column, of columns [split * span, (split + 1) * span);
    the row's token from the splits' results. SPLITS bounds their number: a power of two fixed by the vocabulary and
    BLOCK, not the batch, so that one compiled variant serves every batch size (no compiling mid-run).

    The scores are those of the docstring times log2(e), in base 2 (the same argmax): logits * log2(e) / T -
    log2(e'), e' = e * log2(e). FAST_LOG takes the GPU's approximate log2 (one instruction; the accurate logf
    of libdevice made the kernel compute-bound), which Triton's CPU interpreter lacks."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    row_ptr = logits_ptr + row * stride_row
    if ALL_GREEDY:
        greedy = True
        temperature = 1.0
        seed = 0
    else:
        temperature = tl.load(temperature_ptr + row)
        greedy = (tl.load(greedy_ptr + row) != 0) | (temperature == 0.0)
        seed = tl.load(seeds_ptr + row)
    scale = LOG2E / tl.where(greedy, 1.0, temperature)
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
            # In base 2: e2 = -log2(1 - v) = e * log2(e), and the score scaled by log2(e) less log2(e2).
            v = u + 2.3283064e-10
            e2 = tl.where(v < 0.015625, v * (1.0 + v * (0.5 + v * (0.33333334 + v * 0.25))) * LOG2E,
                          -_log2(1.0 - v, FAST_LOG))
            score = score * scale - _log2(e2, FAST_LOG)
        take = score > best  # strict: a lane keeps its earliest column on ties
        best = tl.where(take, score, best)
        best_col = tl.where(take, cols, best_col)
    top = tl.max(best, 0)
    # the lowest column holding the top score (NaN scores match nothing: the last column then, still a token)
    col = tl.minimum(tl.min(tl.where(best == top, best_col, vocab), 0), vocab - 1).to(tl.int64)
    if num_splits == 1:
        tl.store(out_ptr + row, col)
    else:
        part = row * num_splits + split
        tl.store(part_score_ptr + part, top)
        tl.store(part_col_ptr + part, col)
        tl.debug_barrier()  # every thread's stores are issued before the counter releases them
        if tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            # the row's last program: the other splits' results are visible after the acquire above. Splits cover
            # increasing columns, so the lowest column among the top scores is torch.argmax's first maximum.
            splits = tl.arange(0, SPLITS)
            parts = row * num_splits + splits
            scores = tl.load(part_score_ptr + parts, mask=splits < num_splits, other=float("-inf"),
                             cache_modifier=".cg")
            cols = tl.load(part_col_ptr + parts, mask=splits < num_splits, other=vocab, cache_modifier=".cg")
            token = tl.min(tl.where(scores == tl.max(scores, 0), cols, vocab), 0)
            tl.store(out_ptr + row, tl.minimum(token, vocab - 1))
            tl.store(count_ptr + row, 0)  # ready for the next call


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
    _check_logits("gumbel_sample", logits)
    batch = logits.shape[0]
    for name, tensor, dtype in (("temperature", temperature, torch.float32), ("greedy", greedy, torch.bool),
                                ("seeds", seeds, torch.int64)):
        if tensor.shape != (batch,) or tensor.dtype != dtype:
            raise ValueError(f"gumbel_sample: {name} must be {dtype} [{batch}], got {tensor.dtype} "
                             f"{list(tensor.shape)}")
        if tensor.device != logits.device:
            raise ValueError(f"gumbel_sample: {name} is on {tensor.device}, logits on {logits.device}")
    return _launch("gumbel_sample", logits, (temperature.contiguous(), greedy.contiguous().view(torch.uint8),
                                             seeds.contiguous()), block, num_splits, all_greedy=False)


def argmax_rows(logits: torch.Tensor, block: int = 2048, num_splits: int | None = None) -> torch.Tensor:
    """torch.argmax(logits, dim=1) of logits [B, V] (float16, bfloat16 or float32) by the sampling kernel, in one
    launch: ties to the lowest column, -inf never chosen unless the whole row is (then 0). Returns int64 [B]."""
    _check_logits("argmax_rows", logits)
    return _launch("argmax_rows", logits, (logits, logits, logits), block, num_splits, all_greedy=True)


def _check_logits(caller: str, logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{caller}: logits must be [batch, vocab] with vocab > 0, got {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{caller}: logits dtype {logits.dtype} is not supported (float16, bfloat16, float32)")


_counters: dict[torch.device, torch.Tensor] = {}  # per device: one zeroed int32 counter a row, reset by the kernel


def _launch(caller: str, logits: torch.Tensor, row_params: tuple, block: int, num_splits: int | None,
            all_greedy: bool) -> torch.Tensor:
    """The kernel over logits [B, V]; row_params: temperature, greedy (as uint8) and seeds, unread if all_greedy."""
    if block < 4 or block & (block - 1):
        raise ValueError(f"{caller}: block must be a power of two >= 4, got {block}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{caller}: num_splits must be >= 1, got {num_splits}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    block = max(4, min(block, triton.next_power_of_2(vocab)))  # at least one Philox call's four columns
    if num_splits is None:
        num_splits = choose_num_splits(batch, vocab, block, logits.device)
    span = triton.cdiv(triton.cdiv(vocab, num_splits), block) * block  # whole blocks; no split is empty
    num_splits = triton.cdiv(vocab, span)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    part_score = torch.empty(batch, num_splits, dtype=torch.float32, device=logits.device)
    part_col = torch.empty(batch, num_splits, dtype=torch.int64, device=logits.device)
    counters = _counters.get(logits.device)
    if counters is None or counters.numel() < batch:
        counters = _counters[logits.device] = torch.zeros(max(batch, 256), dtype=torch.int32, device=logits.device)
    if batch > 0:
        _gumbel_argmax_kernel[(batch, num_splits)](
            logits, *row_params, part_score, part_col, counters, out, vocab, span, logits.stride(0), BLOCK=block,
            SPLITS=triton.next_power_of_2(triton.cdiv(vocab, block)), ALL_GREEDY=all_greedy,
            FAST_LOG=logits.is_cuda, num_warps=max(1, min(8, block // 256)))
    return out
