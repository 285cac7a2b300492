"""CUDA-graph capture of the decode step (every scheduled sequence computes one token).

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch gaps. Graphs are
captured per padded batch size over static input buffers whose block tables are as wide as the longest context:
the paged decode kernel reads only up to each sequence's length, and its grid depends on shapes alone, so one graph
per batch size serves every context length. Padding rows point at a scratch block that no sequence owns, with
context length 1. Every graph writes its logits into one shared buffer. The eager forward is the reference (tests
compare the two on the GPU).
"""
from __future__ import annotations

import torch

from qwen_awq.engine.kv_cache import KVPool
from qwen_awq.engine.step_input import StepInput
from qwen_awq.models.decoder import Decoder

# Padded batch sizes (vLLM captures a similar ladder): small steps for small batches, then multiples of 16.
SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: Decoder, pool: KVPool, max_num_seqs: int, max_blocks: int, scratch_block: int) -> None:
        self.model, self.pool, self.max_blocks = model, pool, max_blocks
        self.sizes = [s for s in SIZES if s < max_num_seqs] + [max_num_seqs]
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * pool.block_size
        self.static = StepInput.decode_buffers(self.sizes[-1], max_blocks, scratch_block, pool.block_size,
                                               model.device)
        self.logits: torch.Tensor | None = None  # (n, V), written by every graph
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool_handle = None
        self.replays = 0

    def _forward(self, b: int) -> torch.Tensor:
        step = self.static.rows(b, self.max_blocks)
        return self.model.compute_logits(self.model.forward_tokens(step.input_ids, step.forward_batch(self.pool)))

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            logits = self._forward(b)  # warm-up (lazy inits, Triton compiles) outside the capture
            if self.logits is None:
                self.logits = torch.empty(self.sizes[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool_handle):
                self.logits[:b].copy_(self._forward(b))
            self.pool_handle = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, table_width: int) -> bool:
        return num_seqs <= self.sizes[-1] and table_width <= self.max_blocks

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor:
        """Logits (n, V) for a decode step of n sequences; rows past n are padding that touches only the scratch
        block. Table columns past a sequence's own blocks keep stale ids: the kernel stops at its length."""
        n, width = step.num_seqs, step.paged.block_tables.shape[1]
        b = next(s for s in self.sizes if s >= n)
        static, meta = self.static, self.static.paged
        static.input_ids[:n].copy_(step.input_ids)
        static.positions[:n].copy_(step.positions)
        static.ntk_alpha[:n].copy_(step.ntk_alpha)
        meta.slot_mapping[:n].copy_(step.paged.slot_mapping)
        meta.slot_mapping[n:b].fill_(self.scratch_slot)
        meta.block_tables[:n, :width].copy_(step.paged.block_tables)
        meta.block_tables[n:b].fill_(self.scratch_block)
        meta.context_lens[:n].copy_(step.paged.context_lens)
        meta.context_lens[n:b].fill_(1)
        self.graphs[b].replay()
        self.replays += 1
        return self.logits[:n]
