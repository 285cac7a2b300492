"""Turns a scheduled step into one flattened model call over the paged KV pool, then samples per request."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_awq.engine.cuda_graph import DecodeGraphs
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
    def __init__(self, model: Decoder, pool: KVPool, vocab_size: int, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.pool, self.vocab_size, self.graphs = model, pool, vocab_size, graphs
        self.device = model.device
        self.generators: dict[int, torch.Generator] = {}

    def _collect(self, batch: ScheduledBatch) -> dict[str, list]:
        """Host-side lists for the flattened step (one pass over the scheduled chunks)."""
        bs = self.pool.block_size
        c: dict[str, list] = {k: [] for k in ("ids", "pos", "alpha", "slots", "seq_of", "col", "tables", "ctx", "qlen")}
        for i, e in enumerate(batch.entries):
            seq = e.seq
            positions = range(e.start, e.end)
            c["ids"] += seq.token_ids(e.start, e.end)
            c["pos"] += positions
            c["alpha"] += [seq.ntk_alpha] * e.num_tokens
            c["slots"] += [seq.block_table[p // bs] * bs + p % bs for p in positions]
            c["seq_of"] += [i] * e.num_tokens
            c["col"] += range(e.num_tokens)
            c["tables"].append(seq.block_table)
            c["ctx"].append(e.end)
            c["qlen"].append(e.num_tokens)
        return c

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        c, dev = self._collect(batch), self.device
        width = max(len(t) for t in c["tables"])

        def t(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=dev)

        meta = PagedMetadata(slot_mapping=t(c["slots"]),
                             block_tables=t([r + [0] * (width - len(r)) for r in c["tables"]]),
                             context_lens=t(c["ctx"]), query_lens=t(c["qlen"]), token_seq=t(c["seq_of"]),
                             token_col=t(c["col"]), max_query_len=max(c["qlen"]))
        fb = ForwardBatch(positions=t(c["pos"]), ntk_alpha=t(c["alpha"], torch.float32),
                          attn=PagedAttention(self.pool, meta))
        ends = torch.cumsum(torch.tensor(c["qlen"]), 0) - 1
        sampling_rows = [i for i, e in enumerate(batch.entries) if e.needs_sample]
        return StepInputs(t(c["ids"]), fb, ends[sampling_rows].to(dev), batch.sampling)

    def _is_graph_decode(self, batch: ScheduledBatch) -> bool:
        if self.graphs is None or not all(e.num_tokens == 1 and e.needs_sample for e in batch.entries):
            return False
        return self.graphs.fits(len(batch.entries), max(len(e.seq.block_table) for e in batch.entries))

    def logits(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Logits (S, V) of the entries that sample, from a captured graph for pure decode steps."""
        if self._is_graph_decode(batch):
            c = self._collect(batch)
            return self.graphs.run(c["ids"], c["pos"], c["alpha"], c["slots"], c["tables"])
        inputs = self.prepare(batch)
        hidden = self.model.forward_tokens(inputs.input_ids, inputs.fb)  # (T, hidden)
        if not inputs.sampling:
            return None
        return self.model.compute_logits(hidden[inputs.sample_index])  # (S, V)

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
        logits = self.logits(batch)
        if logits is None:
            return None
        seqs = [e.seq for e in batch.sampling]
        sb = SamplingBatch.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                 [s.output_token_ids for s in seqs], self.vocab_size, self.device,
                                 stop_ids_per_row=[stop_ids[s.seq_id] for s in seqs])
        gens = [self._generator(s, sample_index.get(s.seq_id, 0)) for s in seqs]
        return sample(logits, sb, gens)

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
