"""The step's persistent input buffers (worker/input_batch.py): every input of a step packed into one buffer (one
copy to the device), read back through the views the model gets, and a CUDA graph's views at fixed addresses."""
from __future__ import annotations

import torch

from pagedllm.worker.input_batch import InputBuffers, StepInputs


def _step(deferred: bool) -> StepInputs:
    step = StepInputs(input_ids=[11, 0, 13, 14, 15], positions=[40, 7, 0, 1, 2], slot_mapping=[104, 23, 48, 49, 50],
                      query_start_loc=[0, 1, 2, 5], seq_lens=[41, 8, 3],
                      block_tables=[[2, 5, 6], [1], [3]], num_decodes=2, max_query_len=3)
    if deferred:  # row 1's token was sampled by the step in flight: its id is entry 4 of those
        step.deferred_rows, step.deferred_sources = [1], [4]
        step.deferred_ids = torch.tensor([90, 91, 92, 93, 94])
    return step


def test_views_hold_the_step():
    buffers = InputBuffers(max_tokens=16, max_seqs=4, max_blocks_per_seq=6, device=torch.device("cpu"))
    input_ids, positions, meta = buffers.load(_step(deferred=True))
    assert input_ids.tolist() == [11, 94, 13, 14, 15]
    assert positions.tolist() == [40, 7, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [104, 23, 48, 49, 50]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 5] and meta.query_start_loc.dtype == torch.int32
    assert meta.seq_lens.tolist() == [41, 8, 3] and meta.seq_lens.dtype == torch.int32
    # as wide as the longest table, rounded up to 16 columns (the row stride's specialisation never changes)
    assert meta.block_tables.tolist() == [t + [0] * (16 - len(t)) for t in ([2, 5, 6], [1], [3])]
    assert input_ids.dtype == positions.dtype == meta.slot_mapping.dtype == torch.int64
    assert (meta.num_decodes, meta.max_query_len, meta.max_seq_len) == (2, 3, 41)

    # a smaller step after it: nothing of the first one shows through
    step = StepInputs([7], [3], [9], [0, 1], [4], [[8]], 1, 1)
    input_ids, positions, meta = buffers.load(step, full_width=True)
    assert input_ids.tolist() == [7] and meta.block_tables.tolist() == [[8] + [0] * 15]
    assert meta.seq_lens.tolist() == [4] and meta.query_start_loc.tolist() == [0, 1]


def test_a_graphs_views_do_not_move():
    """A graph of batch B reads the views of its first load: every later step of B puts its inputs there, with or
    without deferred tokens."""
    buffers = InputBuffers(max_tokens=16, max_seqs=4, max_blocks_per_seq=6, device=torch.device("cpu"))

    def padded(deferred: bool) -> StepInputs:
        step = _step(deferred)
        step.input_ids, step.positions, step.slot_mapping = [11, 0, 13], [40, 7, 2], [104, 23, 50]
        step.num_decodes = step.max_query_len = 1
        step.pad_decode_batch(4)
        return step

    def addresses(views) -> list[int]:
        input_ids, positions, meta = views
        return [t.data_ptr() for t in (input_ids, positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
                                       meta.block_tables)]

    first = addresses(buffers.load(padded(False), full_width=True))
    views = buffers.load(padded(True), full_width=True)
    assert addresses(views) == first
    assert views[0].tolist() == [11, 94, 13, 0] and views[2].seq_lens.tolist() == [41, 8, 3, 0]


def test_every_view_starts_16_byte_aligned():
    """Triton specialises kernels on their pointers' 16-byte alignment and integers' divisibility by 16: views or
    strides that moved with a step's sizes would compile new variants mid-run."""
    buffers = InputBuffers(max_tokens=64, max_seqs=8, max_blocks_per_seq=5, device=torch.device("cpu"))
    for tokens, seqs in ((1, 1), (3, 2), (7, 3), (33, 5)):
        per_seq = [tokens // seqs] * seqs
        per_seq[-1] += tokens - sum(per_seq)
        starts = [0]
        for n in per_seq:
            starts.append(starts[-1] + n)
        step = StepInputs(list(range(tokens)), list(range(tokens)), list(range(tokens)), starts, per_seq,
                          [[1] * (1 + i % 3) for i in range(seqs)], 0, max(per_seq))
        step.deferred_rows, step.deferred_sources = [0], [0]
        step.deferred_ids = torch.tensor([5])
        input_ids, positions, meta = buffers.load(step)
        views = (input_ids, positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables)
        assert [t.data_ptr() % 16 for t in views] == [0] * len(views), (tokens, seqs)
        # Triton specialises integers on divisibility by 16 (and == 1): the tables' row stride is always a multiple
        assert meta.block_tables.stride(0) % 16 == 0, (tokens, seqs)


def test_the_largest_steps_fit():
    """Steps at every limit at once (tokens, sequences, blocks a sequence, deferred rows), full width or not, fit in
    the buffer that the limits size, with the tables' width rounded up to 16."""
    buffers = InputBuffers(max_tokens=8, max_seqs=3, max_blocks_per_seq=5, device=torch.device("cpu"))
    for full_width in (False, True):
        step = StepInputs(list(range(8)), list(range(8)), list(range(8)), [0, 1, 2, 8], [20, 30, 80],
                          [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12]], 2, 6)
        step.deferred_rows, step.deferred_sources = [0, 1, 2], [2, 1, 0]
        step.deferred_ids = torch.tensor([70, 71, 72])
        input_ids, _, meta = buffers.load(step, full_width=full_width)
        assert input_ids.tolist() == [72, 71, 70, 3, 4, 5, 6, 7]
        assert meta.block_tables.shape == (3, 16)
        assert meta.block_tables[:, :5].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 11, 12]]
