"""Turns a scheduled step into one flattened model call over the paged KV pool, then samples per request."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_awq.engine.kv_cache import KVPool, PagedAttention, PagedMetadata
from qwen_awq.engine.sampler import SampleOutput, SamplingBatch, make_generator, sample
from qwen_awq.engine.scheduler import ScheduledBatch, ScheduledSeq
from qwen_awq.engine.sequence import Sequence
from qwen_awq.models.attention import ForwardBatch
from qwen_awq.models.decoder import Decoder


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,)
    fb: ForwardBatch
    sample_index: torch.Tensor  # (S,) token index of each sampling sequence's last token
    sampling: list[ScheduledSeq]


class ModelRunner:
    def __init__(self, model: Decoder, pool: KVPool, vocab_size: int) -> None:
        self.model, self.pool, self.vocab_size = model, pool, vocab_size
        self.device = model.device
        self.generators: dict[int, torch.Generator] = {}

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.pool.block_size
        ids, pos, alpha, slots, seq_of, col = [], [], [], [], [], []
        tables, ctx, qlen = [], [], []
        for i, e in enumerate(batch.entries):
            seq = e.seq
            ids += seq.token_ids(e.start, e.end)
            positions = range(e.start, e.end)
            pos += positions
            alpha += [seq.ntk_alpha] * e.num_tokens
            slots += [seq.block_table[p // bs] * bs + p % bs for p in positions]
            seq_of += [i] * e.num_tokens
            col += range(e.num_tokens)
            tables.append(seq.block_table)
            ctx.append(e.end)
            qlen.append(e.num_tokens)
        width = max(len(t) for t in tables)
        dev = self.device

        def t(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=dev)

        meta = PagedMetadata(slot_mapping=t(slots), block_tables=t([r + [0] * (width - len(r)) for r in tables]),
                             context_lens=t(ctx), query_lens=t(qlen), token_seq=t(seq_of), token_col=t(col),
                             max_query_len=max(qlen))
        fb = ForwardBatch(positions=t(pos), ntk_alpha=t(alpha, torch.float32), attn=PagedAttention(self.pool, meta))
        ends = torch.cumsum(torch.tensor(qlen), 0) - 1
        sampling_rows = [i for i, e in enumerate(batch.entries) if e.needs_sample]
        return StepInputs(t(ids), fb, ends[sampling_rows].to(dev), batch.sampling)

    def _generator(self, seq: Sequence, index: int) -> torch.Generator | None:
        seed = getattr(seq.params, "seed", None)
        if seed is None:
            return None
        if seq.seq_id not in self.generators:  # each of a request's n samples gets its own stream
            self.generators[seq.seq_id] = make_generator(seed + index, self.device)
        return self.generators[seq.seq_id]

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch, stop_ids: dict[int, list[int]], sample_index: dict[int, int]
             ) -> SampleOutput | None:
        """Run the model on the batch; sample one token for each entry whose chunk ends at its last token."""
        inputs = self.prepare(batch)
        hidden = self.model.forward_tokens(inputs.input_ids, inputs.fb)  # (T, hidden)
        if not inputs.sampling:
            return None
        logits = self.model.compute_logits(hidden[inputs.sample_index])  # (S, V)
        seqs = [e.seq for e in inputs.sampling]
        sb = SamplingBatch.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                 [s.output_token_ids for s in seqs], self.vocab_size, self.device,
                                 stop_ids_per_row=[stop_ids[s.seq_id] for s in seqs])
        gens = [self._generator(s, sample_index.get(s.seq_id, 0)) for s in seqs]
        return sample(logits, sb, gens)

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
