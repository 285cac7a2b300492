"""Token-budget scheduler: each step gives running sequences, then FCFS-admitted waiting ones, up to
max_num_batched_tokens tokens, so long prompts prefill in chunks mixed with decodes; preempts by recompute.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from qwen_awq.engine.block_manager import BlockManager
from qwen_awq.engine.sequence import FinishReason, Sequence, SequenceStatus
from qwen_awq.errors import ConfigError, ContextLengthError, Overloaded


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step: positions [start, start + num_tokens)
    start: int  # the sequence's num_computed_tokens when scheduled
    # The chunk reaches the last known token, so its logits give the next one (mid-prompt chunks don't).
    # Fixed at scheduling: update() appends tokens, after which the sequence's length no longer tells.
    needs_sample: bool

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.start < 0:
            raise ValueError(f"bad chunk for sequence {self.seq.seq_id}: {self.start}+{self.num_tokens}")

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return cls(seq, num_tokens, start, start + num_tokens == seq.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class ScheduledBatch:
    entries: list[ScheduledSeq]  # running sequences first (admission order), then newly admitted ones
    preempted: list[Sequence]  # sent back to waiting during this step

    def __iter__(self) -> Iterator[ScheduledSeq]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def sampling(self) -> list[ScheduledSeq]:
        """The entries that need a sampled token, in batch order."""
        return [e for e in self.entries if e.needs_sample]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_waiting: int) -> None:
        limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                  "max_model_len": max_model_len, "max_waiting": max_waiting}
        for name, value in limits.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        bm = block_manager
        # Liveness: a sequence running alone must be able to reach max_model_len, or preemption never ends.
        if -(-max_model_len // bm.block_size) > bm.num_blocks:
            raise ConfigError(f"the KV cache holds {bm.num_blocks * bm.block_size} tokens ({bm.num_blocks} "
                              f"blocks of {bm.block_size}), fewer than max_model_len={max_model_len}; "
                              "lower max_model_len or give the KV cache more memory")
        self.block_manager = bm
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, *seqs: Sequence) -> None:
        """Queue new sequences (the n of one request go in together, so a request is never split): all of
        them, or none when admission refuses (see `check_admission`)."""
        for seq in seqs:
            if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
                raise ValueError(f"sequence {seq.seq_id} is not new (status {seq.status.name})")
            self.check_admission(seq.num_prompt_tokens, seq.max_tokens)
        self.waiting.extend(seqs)

    def check_admission(self, num_prompt_tokens: int, max_tokens: int | None, pending: int = 0) -> None:
        """The one admission rule: the prompt plus max_tokens fit in max_model_len, and the waiting queue
        (plus `pending` adds not queued yet) is not full. Raises ContextLengthError or Overloaded."""
        limit = self.max_model_len
        want = num_prompt_tokens + (max_tokens or 1)
        if num_prompt_tokens < 1:
            raise ContextLengthError("the prompt is empty: it needs at least one token")
        if num_prompt_tokens >= limit or want > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested {want} tokens "
                f"({num_prompt_tokens} in the prompt, {want - num_prompt_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.")
        waiting = len(self.waiting) + pending
        if waiting >= self.max_waiting:
            raise Overloaded(f"the engine is overloaded ({waiting} sequences waiting, "
                             f"max_waiting={self.max_waiting}); retry later")

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish the request's sequences as aborted and free their blocks now; unknown ids are a no-op."""
        seqs = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence (the engine decides when) and release its blocks; finishing twice is a no-op."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.finish(reason)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(entries=[], preempted=[])
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        # vLLM v1's rule: after a preemption the pool is short, so admit nobody this step.
        if not batch.preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens >= self.max_model_len:
                raise RuntimeError(f"sequence {seq.seq_id} reached max_model_len but was not finished")
            n = min(seq.num_uncomputed, budget)
            while not self.block_manager.append_slots(seq, n):
                victim = self.running[-1]  # the most recently admitted; never one scheduled earlier this step
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                batch.entries.append(ScheduledSeq.of(seq, n))
                budget -= n
                i += 1
        return budget

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute later: drop its KV but keep its output tokens and ntk_alpha; requeue at the front."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq, budget):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.entries.append(ScheduledSeq.of(seq, n))
            budget -= n

    def update(self, batch: ScheduledBatch, sampled: Mapping[int, int] | list[int]) -> list[Sequence]:
        """Record a computed step. `sampled` maps seq_id -> token, or is a list aligned with `batch.entries`
        or with `batch.sampling`. Returns the sequences that got a new token, for the engine's stop checks.
        Sequences finished (aborted) while the step ran are skipped."""
        tokens = self._sampled_by_seq(batch, sampled)
        grown: list[Sequence] = []
        for e in batch.entries:
            seq = e.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens = e.end
            self.block_manager.on_tokens_computed(seq)
            if e.needs_sample:
                seq.append_token(tokens[seq.seq_id])
                grown.append(seq)
        return grown

    @staticmethod
    def _sampled_by_seq(batch: ScheduledBatch, sampled: Mapping[int, int] | list[int]) -> dict[int, int]:
        need = batch.sampling
        if isinstance(sampled, Mapping):
            need = [e for e in need if not e.seq.is_finished]  # aborted mid-step: its token is moot
            missing = [e.seq.seq_id for e in need if e.seq.seq_id not in sampled]
            if missing:
                raise ValueError(f"no sampled token for sequences {missing}")
            return {e.seq.seq_id: int(sampled[e.seq.seq_id]) for e in need}
        # The two alignments coincide when every entry samples, so accepting both is unambiguous.
        if len(sampled) == len(batch.entries):
            pairs = zip(batch.entries, sampled, strict=True)
            return {e.seq.seq_id: int(t) for e, t in pairs if e.needs_sample}
        if len(sampled) == len(need):
            return {e.seq.seq_id: int(t) for e, t in zip(need, sampled, strict=True)}
        raise ValueError(f"got {len(sampled)} sampled tokens for a batch of {len(batch.entries)} entries "
                         f"of which {len(need)} sample")
