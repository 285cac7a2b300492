"""Scheduler: one token budget per step, chunked prefill mixed with decodes, FCFS admission, preemption by
recompute, the bounded waiting queue and abort, checked step by step against hand-derived schedules."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from qwen_awq.engine.block_manager import BlockManager
from qwen_awq.engine.scheduler import ScheduledBatch, Scheduler
from qwen_awq.engine.sequence import FinishReason, Sequence
from qwen_awq.errors import ConfigError, ContextLengthError, Overloaded


@dataclass
class Params:
    max_tokens: int | None = 4


def seq(seq_id: int, prompt_len: int, max_tokens: int = 4, request_id: str | None = None,
        first: int = 1) -> Sequence:
    prompt = [first + 3 * i for i in range(prompt_len)]
    return Sequence(seq_id, request_id or f"r{seq_id}", prompt, Params(max_tokens))


def model(tokens: list[int]) -> int:
    """Deterministic next token of a context, so recompute after preemption must reproduce outputs."""
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 1


def step(sched: Scheduler) -> tuple[ScheduledBatch, list[tuple[int, int, int]]]:
    """Schedule, 'run the model', update, finish at max_tokens. Returns the batch as (seq_id, start, n)."""
    batch = sched.schedule()
    shape = [(e.seq.seq_id, e.start, e.num_tokens) for e in batch]
    sampled = {e.seq.seq_id: model(e.seq.token_ids(0, e.end)) for e in batch.sampling}
    for s in sched.update(batch, sampled):
        if s.num_output_tokens >= s.max_tokens:
            sched.finish(s, FinishReason.LENGTH)
    return batch, shape


def expected_output(s: Sequence) -> list[int]:
    tokens = list(s.prompt_token_ids)
    for _ in range(s.max_tokens):
        tokens.append(model(tokens))
    return tokens[s.num_prompt_tokens:]


def make(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 16,
         max_model_len: int = 64, max_waiting: int = 16, caching: bool = False) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(bm, max_num_seqs, budget, max_model_len, max_waiting)


def test_chunked_prefill_splits_long_prompt_into_budget_chunks() -> None:
    sched = make(budget=8)
    a = seq(0, 20, max_tokens=2)
    sched.add(a)
    shapes = [step(sched)[1] for _ in range(5)]
    assert shapes == [[(0, 0, 8)], [(0, 8, 8)], [(0, 16, 4)], [(0, 20, 1)], []]
    assert a.output_token_ids == expected_output(a) and a.finish_reason is FinishReason.LENGTH
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 64


def test_decodes_mix_with_new_prefill_under_one_budget() -> None:
    sched = make(budget=6)
    a, b = seq(0, 3, max_tokens=5), seq(1, 10, max_tokens=2, first=2)
    sched.add(a)
    assert step(sched)[1] == [(0, 0, 3)]
    sched.add(b)
    batch, shape = step(sched)
    assert shape == [(0, 3, 1), (1, 0, 5)]  # a's decode first, b's prefill takes the rest of the budget
    assert [e.needs_sample for e in batch] == [True, False] and b.output_token_ids == []
    assert step(sched)[1] == [(0, 4, 1), (1, 5, 5)]
    assert step(sched)[1] == [(0, 5, 1), (1, 10, 1)]
    while sched.has_unfinished():
        batch, _ = step(sched)
        assert batch.num_tokens <= 6
    assert a.output_token_ids == expected_output(a) and b.output_token_ids == expected_output(b)


def test_budget_and_max_num_seqs_limit_each_step() -> None:
    sched = make(budget=5, max_num_seqs=3)
    seqs = [seq(i, 2 + i, max_tokens=3, first=i + 1) for i in range(6)]
    sched.add(*seqs)
    assert step(sched)[1] == [(0, 0, 2), (1, 0, 3)]  # budget 5 is spent, 2..5 wait
    assert step(sched)[1] == [(0, 2, 1), (1, 3, 1), (2, 0, 3)]  # third seat, 3 tokens left
    assert step(sched)[1] == [(0, 3, 1), (1, 4, 1), (2, 3, 1)]  # max_num_seqs=3 keeps seq 3 waiting
    while sched.has_unfinished():
        batch, _ = step(sched)
        assert batch.num_tokens <= 5 and sched.num_running <= 3
    assert all(s.output_token_ids == expected_output(s) for s in seqs)


def test_fcfs_head_of_queue_is_never_overtaken() -> None:
    # 6 blocks of 4: a holds 3; b needs 4 for its prompt, c would fit but must wait behind b.
    sched = make(num_blocks=6, budget=64, max_model_len=24)
    a, b, c = seq(0, 10, max_tokens=3), seq(1, 16, max_tokens=2), seq(2, 2, max_tokens=2)
    sched.add(a)
    step(sched)
    sched.add(b, c)
    assert step(sched)[1] == [(0, 10, 1)]
    assert list(sched.waiting) == [b, c]
    step(sched)  # a finishes (3 outputs)
    assert a.is_finished
    assert step(sched)[1] == [(1, 0, 16), (2, 0, 2)]


def test_preemption_requeues_newest_at_front_and_it_completes() -> None:
    # 4 blocks of 2 tokens: two 3-token prompts fill the pool; the first decode past 4 tokens preempts.
    sched = make(num_blocks=4, block_size=2, budget=16, max_model_len=8)
    a, b = seq(0, 3, max_tokens=5), seq(1, 3, max_tokens=5, first=2)
    sched.add(a, b)
    assert step(sched)[1] == [(0, 0, 3), (1, 0, 3)]
    b.ntk_alpha = 1.7  # as if the runner had fixed it at b's prefill
    assert step(sched)[1] == [(0, 3, 1), (1, 3, 1)]
    late = seq(2, 2, max_tokens=1, first=5)
    sched.add(late)
    batch, shape = step(sched)
    assert batch.preempted == [b] and sched.num_preemptions == 1
    assert shape == [(0, 4, 1)]  # no admission in a step that preempted
    assert list(sched.waiting) == [b, late] and b.block_table == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == expected_output(b)[:2] and b.ntk_alpha == 1.7
    shapes = []
    while sched.has_unfinished():
        shapes.append(step(sched)[1])
    # b (recomputing prompt + 2 outputs) is admitted before late, which could have fit a step earlier.
    assert shapes[:3] == [[(0, 5, 1)], [(0, 6, 1)], [(1, 0, 5), (2, 0, 2)]]
    assert all(s.output_token_ids == expected_output(s) for s in (a, b, late))
    assert sched.block_manager.num_free_blocks == 4


def test_waiting_queue_is_bounded() -> None:
    sched = make(max_waiting=2, max_num_seqs=1)
    sched.add(seq(0, 4))
    sched.add(seq(1, 4), seq(2, 4, request_id="r1"))  # one request's n sequences go in together
    with pytest.raises(Overloaded, match="retry later"):
        sched.add(seq(3, 4))
    assert [s.seq_id for s in sched.waiting] == [0, 1, 2]
    step(sched)  # seq 0 admitted: 2 waiting, still full
    with pytest.raises(Overloaded):
        sched.add(seq(3, 4))
    sched.abort("r1")
    sched.add(seq(3, 4))
    assert [s.seq_id for s in sched.waiting] == [3]


def test_abort_frees_blocks_at_once() -> None:
    sched = make(num_blocks=16, budget=8, max_num_seqs=1)
    a, a2, b = seq(0, 12, request_id="x"), seq(1, 12, request_id="x"), seq(2, 5)
    sched.add(b, a, a2)
    step(sched)
    assert sched.block_manager.num_free_blocks == 14
    assert sched.abort("r2") == [b] and sched.block_manager.num_free_blocks == 16
    assert b.finish_reason is FinishReason.ABORT and b.finish_reason == "abort"
    batch = sched.schedule()  # a is mid-prefill when its request is aborted
    assert sched.abort("x") == [a, a2] and sched.block_manager.num_free_blocks == 16
    assert sched.update(batch, {}) == [] and a.num_computed_tokens == 0
    assert sched.abort("x") == [] and not sched.has_unfinished()
    c = seq(3, 3)
    sched.add(c)
    batch = sched.schedule()  # c's whole prompt: it samples, but is aborted before the token arrives
    sched.abort("r3")
    assert sched.update(batch, {}) == [] and c.output_token_ids == []


def test_prefix_hits_skip_computed_blocks() -> None:
    sched = make(budget=32, caching=True)
    a = seq(0, 14, max_tokens=1)
    sched.add(a)
    step(sched)
    b = seq(1, 14, max_tokens=1)
    sched.add(b)
    assert step(sched)[1] == [(1, 12, 2)] and b.num_cached_prefix_tokens == 12
    assert b.output_token_ids == a.output_token_ids == expected_output(a)


def test_update_accepts_dict_or_aligned_lists() -> None:
    for form in ("dict", "entries", "sampling"):
        sched = make(budget=6)
        a, b = seq(0, 2, max_tokens=3), seq(1, 9, max_tokens=3)
        sched.add(a, b)
        batch = sched.schedule()  # a: 2 tokens (samples), b: 4 of 9 (mid-prompt)
        values = {"dict": {0: 42}, "entries": [42, 99], "sampling": [42]}[form]
        assert sched.update(batch, values) == [a] and a.output_token_ids == [42] and b.output_token_ids == []
        assert (a.num_computed_tokens, b.num_computed_tokens) == (2, 4)
    with pytest.raises(ValueError):
        sched.update(sched.schedule(), [1, 2, 3])


def test_config_and_context_length_checks() -> None:
    with pytest.raises(ConfigError, match="max_model_len"):
        make(num_blocks=3, block_size=4, max_model_len=13)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        make(max_num_seqs=0)
    sched = make(max_model_len=16)
    with pytest.raises(ContextLengthError, match="16"):
        sched.add(seq(0, 12, max_tokens=5))
    with pytest.raises(ContextLengthError):
        sched.add(seq(1, 16, max_tokens=0))
    sched.add(seq(2, 12, max_tokens=4))
    assert sched.num_waiting == 1
