"""Turns a scheduled step into one flattened model call over the paged KV pool, then samples per sequence."""
from __future__ import annotations

import torch

from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.decode_input import DecodeInput
from qwen_awq.engine.guided import apply_step_masks
from qwen_awq.engine.kv_cache import KVPool
from qwen_awq.engine.sampler import SampleOutput, SamplingBatch, plain_greedy, plain_random, sample
from qwen_awq.engine.scheduler import ScheduledBatch
from qwen_awq.engine.step_input import StepInput
from qwen_awq.engine.token_stats import TokenStats, penalized
from qwen_awq.models.decoder import Decoder


class ModelRunner:
    # Whether a step's input ids may come from the previous step's sampled tokens on the device (the engine's
    # overlapped decode); the tensor-parallel runner sends host-built inputs to its workers, so it may not.
    device_input_ids = True

    def __init__(self, model: Decoder, pool: KVPool, vocab_size: int, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.pool, self.vocab_size, self.graphs = model, pool, vocab_size, graphs
        self.device = model.device
        self.token_stats = TokenStats(vocab_size, self.device)  # the penalties' masks, kept on the device

    def _is_graph_decode(self, batch: ScheduledBatch) -> bool:
        if self.graphs is None or not all(e.num_tokens == 1 and e.needs_sample for e in batch.entries):
            return False
        return self.graphs.fits(len(batch.entries), max(len(e.seq.block_table) for e in batch.entries))

    def step_input(self, batch: ScheduledBatch) -> StepInput | DecodeInput:
        """The step's inputs: packed for a captured graph on pure decode steps, else flattened for the eager forward
        (a seam: the tensor-parallel runner also sends them to its workers)."""
        if self._is_graph_decode(batch):
            return self.graphs.pack(batch.entries)
        return StepInput.build(batch.entries, self.pool.block_size, self.device)

    def run(self, step: StepInput | DecodeInput, sample: bool,
            input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The forward of one step: a captured decode graph's replay, or the eager forward, with logits (S, V)
        when some entry samples (tensor-parallel workers run the same, on their shard). `input_ids` (T,) on the
        device, when given, replace the step's own (which the host packed before knowing them)."""
        if isinstance(step, DecodeInput):
            return self.graphs.run(step, input_ids)
        if input_ids is not None:  # queued after the step's host-to-device copy, so it overwrites the host's ids
            step.input_ids.copy_(input_ids)
        hidden = self.model.forward_tokens(step.input_ids, step.forward_batch(self.pool))  # (T, hidden)
        return self.model.compute_logits(hidden[step.sample_index]) if sample else None  # (S, V)

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> SampleOutput | None:
        """Run the model on the batch; sample one token for each entry whose chunk ends at its last token, with
        that sequence's own parameters, stop ids and generator (a plain greedy graph step: in a second graph).
        `input_ids` (T,): see run()."""
        step = self.step_input(batch)
        logits = self.run(step, bool(batch.sampling), input_ids)  # (S, V)
        if logits is None:
            return None
        seqs = [e.seq for e in batch.sampling]
        kind = _tail_kind(seqs) if isinstance(step, DecodeInput) and step.size in self.graphs.tails else None
        if kind is not None and step.size in (self.graphs.random_tails if kind == "random" else self.graphs.tails):
            return self.graphs.sample_tail(step, random=kind == "random")
        apply_step_masks(logits, seqs)  # structured output: constrained rows only, before any penalty
        slots = self.token_stats.slots(seqs) if any(penalized(s) for s in seqs) else None
        sb = SamplingBatch.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                 [s.output_token_ids for s in seqs], self.vocab_size, self.device,
                                 stop_ids_per_row=[s.stop_ids for s in seqs],
                                 token_masks=None if slots is None else self.token_stats.masks(slots))
        out = sample(logits, sb, [s.generator for s in seqs])
        if slots is not None:  # the sampled ids join the statistics on the device: no host list is read again
            self.token_stats.record(slots, out.tokens)
        return out


def _tail_kind(seqs: list) -> str | None:
    """Which captured tail samples every row as sample() would: "greedy", "random" (temperature only, unseeded),
    or None (the eager sampler: mixed rows, grammars, penalties, seeds, top-k/p ...)."""
    if any(s.matcher is not None for s in seqs):
        return None
    if all(plain_greedy(s.params, len(s.output_token_ids), s.stop_ids) for s in seqs):
        return "greedy"
    if all(plain_random(s.params, len(s.output_token_ids), s.stop_ids, seeded=s.generator is not None)
           for s in seqs):
        return "random"
    return None
