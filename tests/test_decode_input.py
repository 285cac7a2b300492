"""The packed decode layout (engine/decode_input.py) against StepInput.build's fields on random decode batches:
every real row equal, padding rows on the scratch block, and a graph's view of a larger buffer's prefix equal to
the view of the packed step itself."""
from __future__ import annotations

import random

import pytest
import torch

from qwen_awq.engine.decode_input import decode_views, pack_decode, packed_len
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.scheduler import ScheduledSeq
from qwen_awq.engine.sequence import Sequence
from qwen_awq.engine.step_input import StepInput

BLOCK, MAX_BLOCKS, SCRATCH = 4, 9, 50


def _decode_batch(rng: random.Random, n: int) -> list[ScheduledSeq]:
    """n sequences whose next step computes exactly their last known token."""
    entries, free = [], list(range(SCRATCH))
    rng.shuffle(free)
    for i in range(n):
        seq = Sequence(i, f"r{i}", [rng.randrange(1000) for _ in range(rng.randint(1, 20))], SamplingParams())
        seq.output_token_ids = [rng.randrange(1000) for _ in range(rng.randint(0, 12))]
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.block_table = [free.pop() for _ in range(-(-seq.num_tokens // BLOCK))]
        seq.ntk_alpha = rng.choice([1.0, 1.37, 2.9])
        entries.append(ScheduledSeq.of(seq, 1))
    return entries


@pytest.mark.parametrize("seed", range(6))
def test_packed_rows_equal_step_input_and_padding_is_scratch(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    size = n + rng.choice([0, 1, 3])
    entries = _decode_batch(rng, n)
    step = pack_decode(entries, size, MAX_BLOCKS, BLOCK, SCRATCH, pinned=False)
    assert (step.num_seqs, step.size, step.packed.numel()) == (n, size, packed_len(size, MAX_BLOCKS))
    got = decode_views(step.packed, torch.arange(size + 1), size, MAX_BLOCKS)
    want = StepInput.build(entries, BLOCK, torch.device("cpu"))
    for name in ("input_ids", "positions", "ntk_alpha", "sample_index"):
        assert torch.equal(getattr(got, name)[:n], getattr(want, name)), name
    for name in ("slot_mapping", "context_lens", "token_seq"):
        assert torch.equal(getattr(got.paged, name)[:n], getattr(want.paged, name)), name
    assert torch.equal(got.paged.cu_seqlens[:n + 1], want.paged.cu_seqlens)
    assert got.ntk_alpha.dtype == torch.float32 and got.paged.block_tables.shape == (size, MAX_BLOCKS)
    for row, e in enumerate(entries):
        table = got.paged.block_tables[row].tolist()
        assert table == e.seq.block_table + [SCRATCH] * (MAX_BLOCKS - len(e.seq.block_table))
    pad = slice(n, size)
    assert (got.paged.slot_mapping[pad] == SCRATCH * BLOCK).all() and (got.paged.context_lens[pad] == 1).all()
    assert (got.paged.block_tables[pad] == SCRATCH).all() and (got.ntk_alpha[pad] == 1.0).all()


def test_a_graphs_view_of_the_shared_buffer_reads_what_its_step_packed():
    rng = random.Random(9)
    entries = _decode_batch(rng, 3)
    buffer = torch.full((packed_len(8, MAX_BLOCKS),), -7, dtype=torch.long)  # the largest graph's buffer
    step = pack_decode(entries, 4, MAX_BLOCKS, BLOCK, SCRATCH, pinned=False)
    buffer[:step.packed.numel()].copy_(step.packed)
    rows = torch.arange(9)
    shared, own = decode_views(buffer, rows, 4, MAX_BLOCKS), decode_views(step.packed, rows, 4, MAX_BLOCKS)
    for a, b in ((shared.input_ids, own.input_ids), (shared.positions, own.positions),
                 (shared.ntk_alpha, own.ntk_alpha), (shared.paged.slot_mapping, own.paged.slot_mapping),
                 (shared.paged.context_lens, own.paged.context_lens),
                 (shared.paged.block_tables, own.paged.block_tables)):
        assert torch.equal(a, b)
    assert shared.input_ids.data_ptr() == buffer.data_ptr()  # views, not copies: what a captured graph needs
