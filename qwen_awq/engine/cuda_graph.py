"""CUDA-graph capture of the decode step (every scheduled sequence computes one token).

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch gaps. Graphs are
captured per padded batch size over static input buffers whose block tables are as wide as the longest context:
the paged decode kernel reads only up to each sequence's length, and its grid depends on shapes alone, so one graph
per batch size serves every context length. Padding rows point at a scratch block that no sequence owns, with
context length 1. The inputs of every graph are views of one packed int64 buffer (engine/decode_input.py): a step
fills them with one host-to-device copy, then replays. Every graph writes its logits into one shared buffer. The
eager forward is the reference (tests compare the two on the GPU).
"""
from __future__ import annotations

import torch

from qwen_awq.engine.decode_input import DecodeInput, decode_views, pack_decode, packed_len, split_packed
from qwen_awq.engine.kv_cache import KVPool
from qwen_awq.engine.sampler import SampleOutput, greedy_rows, random_rows
from qwen_awq.engine.scheduler import ScheduledSeq
from qwen_awq.engine.step_input import StepInput
from qwen_awq.models.decoder import Decoder

# Padded batch sizes (vLLM captures a similar ladder): small steps for small batches, then multiples of 16.
SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Tails are captured up to this batch: the random tail's fp32 temporaries (~3 * b * V * 4 bytes: 117 MB at b = 64
# over Qwen's 151,936 ids; the greedy kernel's are b * splits * 12 bytes) stay in the graph pool, and past it a
# step's GPU time dwarfs the host's sampling work.
TAIL_MAX_BATCH = 64


class DecodeGraphs:
    def __init__(self, model: Decoder, pool: KVPool, max_num_seqs: int, max_blocks: int, scratch_block: int,
                 vocab_size: int | None = None) -> None:
        self.model, self.pool, self.max_blocks = model, pool, max_blocks
        self.vocab_size = vocab_size or model.cfg.vocab_size  # the ids a greedy tail picks from
        self.sizes = [s for s in SIZES if s < max_num_seqs] + [max_num_seqs]
        self.scratch_block = scratch_block
        device = model.device
        # graph b reads the prefix of this buffer that a padded batch of b rows fills (decode_input's layout)
        self.buffer = torch.empty(packed_len(self.sizes[-1], max_blocks), dtype=torch.long, device=device)
        self.arange = torch.arange(self.sizes[-1] + 1, device=device)
        self.static = self.view(self.sizes[-1])
        self.load(self.pack([], self.sizes[-1]))  # every row padding until a step fills it
        self.logits: torch.Tensor | None = None  # (n, V), written by every graph
        # (n, 2) float64 [argmax id, log-prob]: what a greedy tail writes (sampler.greedy_rows)
        self.greedy = torch.empty(self.sizes[-1], 2, dtype=torch.float64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.tails: dict[int, torch.cuda.CUDAGraph] = {}  # graph b's logits -> greedy[:b]
        # graph b's logits + packed temperatures -> greedy[:b] drawn rows (sampler.random_rows)
        self.random_tails: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool_handle = None
        self.replays = 0

    def view(self, b: int) -> StepInput:
        """Graph b's static inputs: views of the buffer."""
        return decode_views(self.buffer, self.arange, b, self.max_blocks)

    def pack(self, entries: list[ScheduledSeq], size: int | None = None) -> DecodeInput:
        """A decode step's inputs, on the host, padded to the smallest captured size that holds it."""
        size = size or next(s for s in self.sizes if s >= len(entries))
        return pack_decode(entries, size, self.max_blocks, self.pool.block_size, self.scratch_block,
                           pinned=self.buffer.device.type == "cuda")

    def load(self, step: DecodeInput) -> None:
        """Fill graph step.size's inputs: one host-to-device copy, not waited for when `packed` is pinned."""
        self.buffer[:step.packed.numel()].copy_(step.packed, non_blocking=True)

    def _forward(self, b: int) -> torch.Tensor:
        step = self.view(b)
        return self.model.compute_logits(self.model.forward_tokens(step.input_ids, step.forward_batch(self.pool)))

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self.load(self.pack([], b))  # all padding rows in graph b's layout, for the warm-up
            logits = self._forward(b)  # warm-up (lazy inits, Triton compiles) outside the capture
            if self.logits is None:
                self.logits = torch.empty(self.sizes[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool_handle):
                self.logits[:b].copy_(self._forward(b))
            self.pool_handle = graph.pool()
            self.graphs[b] = graph
            if b <= TAIL_MAX_BATCH:
                self.tails[b] = self._capture_tail(b, self._greedy_tail)
                self.random_tails[b] = self._capture_tail(b, self._random_tail)
        torch.cuda.synchronize()

    def _greedy_tail(self, b: int) -> None:
        greedy_rows(self.logits[:b], self.vocab_size, out=self.greedy[:b])

    def _random_tail(self, b: int) -> None:
        temperature = split_packed(self.buffer, b, self.max_blocks)[6]  # (b,) fp32, from the step's upload
        self.greedy[:b].copy_(random_rows(self.logits[:b], self.vocab_size, temperature))

    def _capture_tail(self, b: int, fn) -> torch.cuda.CUDAGraph:
        """A second graph per size for plain greedy (or plain random) steps: the id and log-prob of every row, so
        that such a step samples with one more replay and reads its result with one device-to-host copy. The
        random tail draws from torch's default CUDA generator, which graphs capture safely."""
        fn(b)  # warm-up
        torch.cuda.synchronize()
        tail = torch.cuda.CUDAGraph()
        with torch.cuda.graph(tail, pool=self.pool_handle):
            fn(b)
        return tail

    def fits(self, num_seqs: int, table_width: int) -> bool:
        return num_seqs <= self.sizes[-1] and table_width <= self.max_blocks

    @torch.inference_mode()
    def run(self, step: DecodeInput, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, V) for a packed decode step of n sequences: one copy into the buffer, one replay. Rows past n
        are padding that touches only the scratch block. `input_ids` (n,) on the device (the previous step's
        tokens, for an overlapped step) overwrite the packed ids after the copy."""
        self.load(step)
        if input_ids is not None:
            split_packed(self.buffer, step.size, self.max_blocks)[0][:step.num_seqs].copy_(input_ids)
        self.graphs[step.size].replay()
        self.replays += 1
        return self.logits[:step.num_seqs]

    def sample_tail(self, step: DecodeInput, random: bool = False) -> SampleOutput:
        """After run(step): the plain greedy (or plain random) sample of its rows, from a tail graph (valid until the
        next run)."""
        (self.random_tails if random else self.tails)[step.size].replay()
        rows = self.greedy[:step.num_seqs]  # (n, 2)
        return SampleOutput(tokens=rows[:, 0], logprobs=rows[:, 1], packed=rows)
