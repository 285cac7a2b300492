"""Overlapped decode steps (issue 12): while the device runs step n, the host schedules, packs and launches step n+1.

Step n+1's positions, slots and block tables do not depend on step n's tokens, so the scheduler records step n with
placeholder tokens, schedules n+1, and the runner reads n+1's input ids from step n's sampled tokens on the device.
Then the host waits for step n, writes its real tokens over the placeholders and processes its outputs. This module
decides when that is safe; the engine (llm_engine.py) runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_awq.engine.block_manager import BlockManager
from qwen_awq.engine.sampler import PendingSample, SampleOutput
from qwen_awq.engine.scheduler import ScheduledBatch, Scheduler
from qwen_awq.engine.sequence import Sequence
from qwen_awq.engine.step_input import upload

PLACEHOLDER = 0  # the token a sequence holds for step n until its real one is read (any id: nothing reads it)


@dataclass
class InFlight:
    """A launched step whose tokens are on their way to the host."""

    batch: ScheduledBatch
    sample: SampleOutput  # on the device: the next step's input ids are read from it
    pending: PendingSample


def can_look_ahead(batch: ScheduledBatch, scheduler: Scheduler, max_model_len: int) -> bool:
    """Whether step n+1 can be scheduled and launched before step n's tokens are known: step n is a pure decode of
    every running sequence, nobody waits for admission, no sequence finishes by length at step n (known in advance:
    it is not scheduled again), the pool holds step n+1's new blocks without preempting, and nothing the host
    computes for step n+1's sampling depends on token values (grammars; penalties only read the statistics that
    the runner keeps on the device, engine/token_stats.py)."""
    if scheduler.waiting or not all(e.num_tokens == 1 and e.needs_sample for e in batch.entries):
        return False
    live = [e.seq for e in batch.entries if not e.seq.is_finished]  # aborted while in flight: skipped
    if not live or len(live) != len(scheduler.running):
        return False
    if not all(_token_free(seq, max_model_len) for seq in live):
        return False
    return _new_blocks(live, scheduler.block_manager) <= scheduler.block_manager.num_free_blocks


def _token_free(seq: Sequence, max_model_len: int) -> bool:
    """The sequence's next step can be sampled without its current token on the host: no grammar (min_tokens bans
    count tokens only; penalties read the device's statistics), and step n does not end it by length (num_tokens
    grows by one)."""
    p = seq.params
    if seq.matcher is not None:
        return False
    ends_by_length = p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens
    return not ends_by_length and seq.num_tokens + 1 < max_model_len


def _new_blocks(seqs: list[Sequence], bm: BlockManager) -> int:
    """Blocks step n+1 takes: one for each sequence whose position num_tokens (its step n token) opens a block."""
    return sum(1 for s in seqs if s.num_tokens // bm.block_size >= len(s.block_table))


def next_input_ids(prev: InFlight, batch: ScheduledBatch) -> torch.Tensor:
    """(T,) long on the device: each entry's input id in `batch` is its sequence's token sampled by `prev`."""
    row = {e.seq.seq_id: i for i, e in enumerate(prev.batch.sampling)}
    rows = [row[e.seq.seq_id] for e in batch.entries]
    tokens = prev.sample.tokens  # (S,) long, or float64 ids (exact) from a greedy tail
    if rows == list(range(tokens.shape[0])):
        return tokens.long()
    return tokens[upload(rows, tokens.device)].long()  # a pinned copy: the host does not wait
