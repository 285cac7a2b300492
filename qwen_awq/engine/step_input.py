"""`StepInput`: one engine step flattened into the tensors the decoder and paged attention read.

Built once per step from the scheduled chunks (one host pass, one pinned host-to-device copy of every field), it
feeds the eager forward; decode steps that replay a CUDA graph are packed by engine/decode_input.py instead. Its
`paged` metadata (block tables, context and query lengths per sequence) is what a paged-attention kernel reads.
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
