"""CUDA-graph capture of the decode step (every scheduled sequence computes one token).

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch gaps. Graphs are
captured once per padded batch size over static input buffers; padding rows write their K/V into a scratch block
that no sequence owns. The eager forward is the reference (tests compare the two on the GPU).
"""
from __future__ import annotations

import torch

from qwen_awq.engine.kv_cache import KVPool, PagedAttention, PagedMetadata
from qwen_awq.models.attention import ForwardBatch
from qwen_awq.models.decoder import Decoder

# Padded batch sizes (vLLM captures a similar ladder): small steps for small batches, then multiples of 16.
SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: Decoder, pool: KVPool, max_num_seqs: int, max_blocks: int, scratch_block: int) -> None:
        self.model, self.pool, self.max_blocks = model, pool, max_blocks
        self.sizes = [s for s in SIZES if s < max_num_seqs] + [max_num_seqs]
        n, dev = self.sizes[-1], model.device
        self.scratch_slot = scratch_block * pool.block_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.alpha = torch.ones(n, dtype=torch.float32, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool_handle = None
        self.replays = 0

    def _forward(self, b: int) -> torch.Tensor:
        dev = self.model.device
        ones = torch.ones(b, dtype=torch.long, device=dev)
        meta = PagedMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                             context_lens=self.context_lens[:b], query_lens=ones,
                             token_seq=torch.arange(b, device=dev), token_col=ones - 1, max_query_len=1)
        fb = ForwardBatch(self.positions[:b], self.alpha[:b], PagedAttention(self.pool, meta))
        return self.model.compute_logits(self.model.forward_tokens(self.input_ids[:b], fb))  # (b, V)

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._forward(b)  # warm-up (lazy inits, autotuning) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool_handle):
                out = self._forward(b)
            self.pool_handle = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, table_width: int) -> bool:
        return num_seqs <= self.sizes[-1] and table_width <= self.max_blocks

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], alpha: list[float], slots: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Logits (n, V) for n decoding sequences; rows past n are padding that touches only the scratch block."""
        n = len(input_ids)
        b = next(s for s in self.sizes if s >= n)
        dev = self.model.device
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.alpha[:n].copy_(torch.tensor(alpha), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.slots[n:b].fill_(self.scratch_slot)
        padded = torch.full((n, self.max_blocks), self.scratch_slot // self.pool.block_size, dtype=torch.long)
        for i, row in enumerate(tables):
            padded[i, : len(row)] = torch.tensor(row)
        self.tables[:n].copy_(padded.to(dev, non_blocking=True))
        self.tables[n:b].fill_(self.scratch_slot // self.pool.block_size)
        self.context_lens[:n].copy_(torch.tensor(positions) + 1, non_blocking=True)
        self.context_lens[n:b].fill_(1)
        graph, out = self.graphs[b]
        graph.replay()
        self.replays += 1
        return out[:n]
