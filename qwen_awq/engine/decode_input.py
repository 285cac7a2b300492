"""A decode step's inputs packed exactly as the CUDA graphs' static buffer lays out its padded batch, so that one
host-to-device copy (from pinned memory: the host does not wait) fills every graph input before a replay.

Layout of a padded batch of b rows, all int64: input ids (b) | positions (b) | slots (b) | context lengths (b) |
block tables (b, max_blocks) | the fp32 NTK alphas' bits, two a slot (ceil(b / 2)) | the fp32 sampling
temperatures' bits (1.0 on greedy and padding rows), two a slot (ceil(b / 2)): what a random tail reads.
Padding rows point at the scratch block with context length 1; table columns past a sequence's own blocks hold
the scratch block too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwen_awq.engine.kv_cache import PagedMetadata
from qwen_awq.engine.scheduler import ScheduledSeq
from qwen_awq.engine.step_input import StepInput


@dataclass
class DecodeInput:
    """One decode step (every sequence computes one token) packed for the graph of its padded batch size."""

    packed: torch.Tensor  # (packed_len(size, max_blocks),) long, on the host
    num_seqs: int
    size: int  # padded batch: which graph replays it


def packed_len(b: int, max_blocks: int) -> int:
    return 4 * b + b * max_blocks + 2 * ((b + 1) // 2)


def split_packed(buf: torch.Tensor, b: int, max_blocks: int) -> tuple[torch.Tensor, ...]:
    """(ids, positions, slots, context_lens, block_tables (b, max_blocks), ntk_alpha fp32, temperature fp32): views
    of the prefix of `buf` (host or device) that a padded batch of b rows uses."""
    ids, pos, slots, ctx, tables, alpha, temp = buf[:packed_len(b, max_blocks)].split(
        [b, b, b, b, b * max_blocks, (b + 1) // 2, (b + 1) // 2])
    return (ids, pos, slots, ctx, tables.view(b, max_blocks), alpha.view(torch.float32)[:b],
            temp.view(torch.float32)[:b])


def pack_decode(entries: Sequence[ScheduledSeq], size: int, max_blocks: int, block_size: int,
                scratch_block: int, pinned: bool) -> DecodeInput:
    """The step's rows, then padding rows up to `size`, in the buffer layout (numpy writes: no per-token lists)."""
    n = len(entries)
    host = torch.empty(packed_len(size, max_blocks), dtype=torch.long, pin_memory=pinned)
    ids, pos, slots, ctx, tables, alpha, temp = (t.numpy() for t in split_packed(host, size, max_blocks))
    starts = [e.start for e in entries]
    ids[:n] = [e.seq.token_ids(p, p + 1)[0] for e, p in zip(entries, starts, strict=True)]
    pos[:n] = starts
    slots[:n] = [e.seq.block_table[p // block_size] * block_size + p % block_size
                 for e, p in zip(entries, starts, strict=True)]
    ctx[:n] = [p + 1 for p in starts]
    alpha[:n] = [e.seq.ntk_alpha for e in entries]
    temp[:n] = [1.0 if e.seq.params.greedy else e.seq.params.temperature for e in entries]
    ids[n:], pos[n:], slots[n:], ctx[n:], alpha[n:], temp[n:] = 0, 0, scratch_block * block_size, 1, 1.0, 1.0
    tables[:] = scratch_block
    for row, e in enumerate(entries):
        tables[row, :len(e.seq.block_table)] = e.seq.block_table
    return DecodeInput(host, n, size)


def decode_views(buf: torch.Tensor, rows: torch.Tensor, b: int, max_blocks: int) -> StepInput:
    """The StepInput of a padded decode batch of b rows over `buf`; `rows` is arange(>= b + 1) on its device (one
    token per sequence: cumulative lengths, token -> sequence map and sampled rows are all aranges)."""
    ids, pos, slots, ctx, tables, alpha, _ = split_packed(buf, b, max_blocks)
    meta = PagedMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx, cu_seqlens=rows[:b + 1],
                         token_seq=rows[:b], max_query_len=1)
    return StepInput(ids, pos, alpha, rows[:b], meta)
