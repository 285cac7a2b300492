"""One generation stream's state: its tokens, how many of them have KV in the cache, its block table, and
what is its own within its request (index, stop ids, random generator, structured-output matcher).

The scheduler and block manager mutate it; the model runner and sampler read it; the engine finishes it.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from qwen_awq.engine.guided import GuidedMatcher


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued: new, or preempted and waiting to be recomputed
    RUNNING = enum.auto()  # admitted: owns KV blocks and is scheduled every step it fits the budget
    FINISHED = enum.auto()  # done; `Sequence.finish_reason` says why


class FinishReason(str, enum.Enum):
    """Why a sequence ended. A str, so it is already the OpenAI / vLLM finish_reason string at the edges."""

    STOP = "stop"  # a stop token or stop string ended it
    LENGTH = "length"  # max_tokens or max_model_len ended it
    ABORT = "abort"  # the client went away or cancelled it

    def __str__(self) -> str:
        return self.value


class RequestParams(Protocol):
    """All the scheduler reads of a request's sampling parameters; the rest is the sampler's business."""

    @property
    def max_tokens(self) -> int | None: ...


@dataclass(eq=False)  # identity equality: two streams with equal tokens are still different sequences
class Sequence:
    seq_id: int  # unique among live sequences; the engine numbers them
    request_id: str  # shared by the n sequences of one request
    prompt_token_ids: list[int]
    params: RequestParams
    cache_salt: str | None = None  # requests with different salts never share prefix-cache blocks
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # leading tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)  # KV block ids, one per block_size tokens
    # Chained prefix-cache hashes of the leading full blocks: a pure function of the tokens and salt, so
    # they survive preemption. Filled lazily by the block manager.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_prefix_tokens: int = 0  # prefix-cache hits at the latest admission (metrics)
    arrival_time: float = field(default_factory=time.monotonic)
    # Qwen's dynamic-NTK alpha, fixed by the runner at the first prefill; kept across preemption so that
    # recompute reproduces the same KV.
    ntk_alpha: float = 1.0
    index: int = 0  # which of its request's n samples this is
    stop_ids: tuple[int, ...] = ()  # ids that end it (sorted): banned by the sampler until min_tokens
    generator: torch.Generator | None = None  # its own random stream when the request is seeded
    matcher: GuidedMatcher | None = None  # its own place in the request's grammar (SamplingParams.guided)
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt must hold at least one token")
        if self.ntk_alpha <= 0:
            raise ValueError(f"sequence {self.seq_id}: ntk_alpha must be > 0, got {self.ntk_alpha}")
        if not 0 <= self.num_computed_tokens <= self.num_tokens:
            raise ValueError(f"sequence {self.seq_id}: num_computed_tokens out of range")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int | None:
        return self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) without building the whole prompt + output list (called every step)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.status, self.finish_reason = SequenceStatus.FINISHED, FinishReason(reason)
        self.generator = self.matcher = None  # nothing samples for it any more
