"""Per-sequence token statistics for the penalties, kept on the device across steps (issue 12).

Built from the host's token lists every step, the repetition penalty's (B, V) mask (Qwen-Chat's default 1.1, so
every served request's) cost the server's engine thread two thirds of its time at 128 streams of 512 + 256 tokens
on the H200 (bench/results/gpu_final_H200_2026-12-03c.md, calls 3-4): each step flattened every whole context. Here a
sequence gets a row of `seen` (prompt + output ids) and, when a row asks for presence/frequency penalties, of
`counts` (output ids) once, from its host context at its first sampled step; after each step the sampled ids go in
on the device (`record`), so a step's masks are one gather and no host list is read again. That also lets
penalized sequences take overlapped steps (engine/overlap.py): their next mask no longer needs the last token on
the host. Rows are freed once their sequence has finished; the tables grow by doubling. The last row of each
table is a scratch row for the batch rows that need no statistics.
"""
from __future__ import annotations

import torch

from qwen_awq.engine.sampler import id_rows
from qwen_awq.engine.sequence import Sequence
from qwen_awq.engine.step_input import upload

FIRST_CAPACITY = 8  # rows before the first doubling


def needs_seen(seq: Sequence) -> bool:
    return seq.params.repetition_penalty != 1.0


def needs_counts(seq: Sequence) -> bool:
    return seq.params.presence_penalty != 0.0 or seq.params.frequency_penalty != 0.0


def penalized(seq: Sequence) -> bool:
    """Whether the sequence's sampling reads statistics (it then has a row)."""
    return needs_seen(seq) or needs_counts(seq)


class TokenStats:
    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.seen = torch.zeros(FIRST_CAPACITY + 1, vocab_size, dtype=torch.bool, device=self.device)  # (C+1, V)
        self.counts: torch.Tensor | None = None  # (C+1, V) int32, made at the first presence/frequency row
        self.rows: dict[Sequence, int] = {}  # table row of each sequence (identity-hashed)
        self.free = list(range(FIRST_CAPACITY))

    @property
    def scratch(self) -> int:
        return self.seen.shape[0] - 1

    def slots(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B,) long on the device: each sequence's table row (the scratch row where it has no penalty), after
        freeing the rows of finished sequences and filling new ones from their host contexts."""
        for seq in [s for s in self.rows if s.is_finished]:
            self.free.append(self.rows.pop(seq))
        if any(needs_counts(s) for s in seqs) and self.counts is None:
            self.counts = torch.zeros(self.seen.shape, dtype=torch.int32, device=self.device)
        new = [s for s in seqs if penalized(s) and s not in self.rows]
        for seq in new:
            if not self.free:
                self._grow()
            self.rows[seq] = self.free.pop()
        if new:
            self._fill(new)
        return upload([self.rows.get(s, self.scratch) for s in seqs], self.device)

    def _grow(self) -> None:
        """Double the rows; the scratch row stays last."""
        old = self.scratch
        self.seen = _doubled(self.seen, old)
        if self.counts is not None:
            self.counts = _doubled(self.counts, old)
        self.free += list(range(old, 2 * old))

    def _fill(self, seqs: list[Sequence]) -> None:
        """New rows from the sequences' host contexts: seen = prompt + output ids, counts = output ids."""
        rows = upload([self.rows[s] for s in seqs], self.device)  # (N,)
        # index_fill_ / index_put_ with device values only: a Python scalar as the value of an indexed assignment
        # is copied from pageable host memory, which waits for the whole queue (it cost an overlapped server
        # step its overlap on the H200)
        self.seen.index_fill_(0, rows, False)
        row_of, ids = id_rows([s.prompt_token_ids + s.output_token_ids for s in seqs], self.vocab_size, self.device)
        self.seen.index_put_((rows[row_of], ids), torch.ones_like(ids, dtype=torch.bool))
        if self.counts is not None:
            self.counts.index_fill_(0, rows, 0)
            row_of, ids = id_rows([s.output_token_ids for s in seqs], self.vocab_size, self.device)
            self.counts.index_put_((rows[row_of], ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def masks(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's (B, V) seen mask and float32 output counts (None when no row has asked for counts)."""
        counts = None if self.counts is None else self.counts[slots].float()
        return self.seen[slots], counts

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """After a step: each row's sampled id (B,) joins its row's statistics, on the device."""
        tokens = tokens.long()
        self.seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))
        if self.counts is not None:
            self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)


def _doubled(table: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows + 1, V) -> (2 rows + 1, V): the first rows, as many zero rows, then the scratch row."""
    return torch.cat([table[:rows], torch.zeros_like(table[:rows]), table[rows:]])

