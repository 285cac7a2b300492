"""`StepInput`: one engine step flattened into the tensors the decoder and paged attention read.

Built once per step from the scheduled chunks (one host pass, one pinned host-to-device copy of every field),
it feeds both the eager forward and the CUDA-graph replay. Its `paged` metadata (block tables, context and query
lengths per sequence) is what a paged-attention kernel consumes directly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from qwen_awq.engine.kv_cache import KVPool, PagedAttention, PagedMetadata
from qwen_awq.engine.scheduler import ScheduledSeq
from qwen_awq.models.attention import ForwardBatch


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """One host-to-device copy that the host does not wait for: on CUDA from pinned memory, which PyTorch's caching
    host allocator keeps from reuse until the asynchronous copy has read it."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.long, pin_memory=pinned).to(device, non_blocking=True)


@dataclass
class StepInput:
    """T tokens of B sequences, S of which sample a token at the end of this step."""

    input_ids: torch.Tensor  # (T,) long
    positions: torch.Tensor  # (T,) long: absolute position of each token in its sequence
    ntk_alpha: torch.Tensor  # (T,) fp32: the NTK alpha of each token's sequence
    sample_index: torch.Tensor  # (S,) long: row of each sampling sequence's last token among the T
    paged: PagedMetadata

    @property
    def num_seqs(self) -> int:
        return self.paged.context_lens.shape[0]

    def forward_batch(self, pool: KVPool) -> ForwardBatch:
        return ForwardBatch(self.positions, self.ntk_alpha, PagedAttention(pool, self.paged))

    @classmethod
    def build(cls, entries: Sequence[ScheduledSeq], block_size: int, device: torch.device) -> StepInput:
        """Flatten the scheduled chunks; block tables are padded with block 0 (never read: past context_lens)."""
        ids, pos, alpha, slots, seq_of = [], [], [], [], []
        for row, e in enumerate(entries):
            seq, span = e.seq, range(e.start, e.end)
            ids += seq.token_ids(e.start, e.end)
            pos += span
            alpha += [seq.ntk_alpha] * e.num_tokens
            slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in span]
            seq_of += [row] * e.num_tokens
        tables = [e.seq.block_table for e in entries]
        width = max(map(len, tables))
        flat_tables = [b for t in tables for b in (*t, *[0] * (width - len(t)))]
        qlen = [e.num_tokens for e in entries]
        cu = [0, *accumulate(qlen)]
        ctx = [e.end for e in entries]
        sample = [end - 1 for end, e in zip(accumulate(qlen), entries, strict=True) if e.needs_sample]
        t, b = len(ids), len(entries)
        alpha_bits = torch.tensor(alpha, dtype=torch.float32).view(torch.int32).tolist()  # fp32 bit patterns
        packed = upload(ids + pos + slots + seq_of + ctx + cu + sample + flat_tables + alpha_bits, device)
        (ids_t, pos_t, slots_t, seq_t, ctx_t, cu_t, sample_t, tables_t,
         alpha_t) = packed.split([t, t, t, t, b, b + 1, len(sample), b * width, t])
        meta = PagedMetadata(slot_mapping=slots_t, block_tables=tables_t.view(b, width), context_lens=ctx_t,
                             cu_seqlens=cu_t, token_seq=seq_t, max_query_len=max(qlen))
        return cls(ids_t, pos_t, alpha_t.to(torch.int32).view(torch.float32), sample_t, meta)

    @classmethod
    def decode_buffers(cls, num_seqs: int, max_blocks: int, scratch_block: int, block_size: int,
                       device: torch.device) -> StepInput:
        """Static inputs for decode steps of up to num_seqs sequences (one new token each), every row and
        table column pointing at the scratch block until a step fills it: what CUDA graphs are captured over."""
        def full(shape: tuple[int, ...], value: float, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        rows = torch.arange(num_seqs + 1, device=device)
        meta = PagedMetadata(slot_mapping=full((num_seqs,), scratch_block * block_size),
                             block_tables=full((num_seqs, max_blocks), scratch_block),
                             context_lens=full((num_seqs,), 1), cu_seqlens=rows, token_seq=rows[:-1],
                             max_query_len=1)
        return cls(full((num_seqs,), 0), full((num_seqs,), 0), full((num_seqs,), 1.0, torch.float32), rows[:-1],
                   meta)

    def rows(self, b: int, w: int) -> StepInput:
        """Views of the first b rows and w table columns of decode buffers (one token per sequence)."""
        m = self.paged
        meta = PagedMetadata(slot_mapping=m.slot_mapping[:b], block_tables=m.block_tables[:b, :w],
                             context_lens=m.context_lens[:b], cu_seqlens=m.cu_seqlens[:b + 1],
                             token_seq=m.token_seq[:b], max_query_len=1)
        return StepInput(self.input_ids[:b], self.positions[:b], self.ntk_alpha[:b], self.sample_index[:b], meta)
