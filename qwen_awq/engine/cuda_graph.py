"""CUDA-graph capture of the decode step (every scheduled sequence computes one token).

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch gaps. Graphs are
captured per padded batch size and per block-table width over static input buffers: paged attention reads every
key the table names, so a graph only as wide as the longest running context keeps short contexts cheap. Padding
rows and table columns point at a scratch block that no sequence owns. Every graph writes its logits into one
shared buffer. The eager forward is the reference (tests compare the two on the GPU).
"""
from __future__ import annotations

import itertools

import torch

from qwen_awq.engine.kv_cache import KVPool, PagedAttention, PagedMetadata
from qwen_awq.models.attention import ForwardBatch
from qwen_awq.models.decoder import Decoder

# Padded batch sizes (vLLM captures a similar ladder): small steps for small batches, then multiples of 16.
SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Table widths in tokens (then the model's longest context): each step 4x the keys of the one below.
WIDTH_TOKENS = (512, 2048, 8192)


class DecodeGraphs:
    def __init__(self, model: Decoder, pool: KVPool, max_num_seqs: int, max_blocks: int, scratch_block: int) -> None:
        self.model, self.pool, self.max_blocks = model, pool, max_blocks
        self.sizes = [s for s in SIZES if s < max_num_seqs] + [max_num_seqs]
        widths = (-(-t // pool.block_size) for t in WIDTH_TOKENS)
        self.widths = [w for w in widths if w < max_blocks] + [max_blocks]
        n, dev = self.sizes[-1], model.device
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * pool.block_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.alpha = torch.ones(n, dtype=torch.float32, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.logits: torch.Tensor | None = None  # (n, V), written by every graph
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool_handle = None
        self.replays = 0

    def _forward(self, b: int, w: int) -> torch.Tensor:
        dev = self.model.device
        ones = torch.ones(b, dtype=torch.long, device=dev)
        meta = PagedMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b, :w],
                             context_lens=self.context_lens[:b], query_lens=ones,
                             token_seq=torch.arange(b, device=dev), token_col=ones - 1, max_query_len=1)
        fb = ForwardBatch(self.positions[:b], self.alpha[:b], PagedAttention(self.pool, meta))
        return self.model.compute_logits(self.model.forward_tokens(self.input_ids[:b], fb))  # (b, V)

    @torch.inference_mode()
    def capture(self) -> None:
        # largest first, so smaller graphs reuse its memory pool
        for b, w in itertools.product(reversed(self.sizes), reversed(self.widths)):
            logits = self._forward(b, w)  # warm-up (lazy inits, autotuning) outside the capture
            if self.logits is None:
                self.logits = torch.empty(self.sizes[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool_handle):
                self.logits[:b].copy_(self._forward(b, w))
            self.pool_handle = graph.pool()
            self.graphs[b, w] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, table_width: int) -> bool:
        return num_seqs <= self.sizes[-1] and table_width <= self.max_blocks

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], alpha: list[float], slots: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Logits (n, V) for n decoding sequences; rows past n are padding that touches only the scratch block."""
        n = len(input_ids)
        b = next(s for s in self.sizes if s >= n)
        w = next(w for w in self.widths if w >= max(map(len, tables)))
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        pos = torch.tensor(positions)
        self.positions[:n].copy_(pos, non_blocking=True)
        self.alpha[:n].copy_(torch.tensor(alpha), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.slots[n:b].fill_(self.scratch_slot)
        padded = torch.tensor([row + [self.scratch_block] * (w - len(row)) for row in tables])  # (n, w)
        self.tables[:n, :w].copy_(padded, non_blocking=True)
        self.tables[n:b, :w].fill_(self.scratch_block)
        self.context_lens[:n].copy_(pos + 1, non_blocking=True)
        self.context_lens[n:b].fill_(1)
        self.graphs[b, w].replay()
        self.replays += 1
        return self.logits[:n]
