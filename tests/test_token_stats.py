"""The penalties' token statistics kept on the device (engine/token_stats.py) against counts built from scratch out of
the host's token lists (bincount): per simulated step with arrivals (some with outputs already), finishes, reused
rows, growth and rows without penalties, and inside a real engine after every step,
with preemption; a penalized run gives the same tokens as the sampler's host-list path."""
from __future__ import annotations

import random

import pytest
import torch
from assets import DEVICE
from test_engine import _prompts
from test_engine_overlap import _engine, _greedy, _trace

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.sequence import Sequence, SequenceStatus
from qwen_awq.engine.token_stats import FIRST_CAPACITY, TokenStats, needs_counts, needs_seen
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

VOCAB = 50


def _counts(ids: list[int], vocab: int = VOCAB) -> torch.Tensor:
    """The oracle: (V,) float32 occurrences of ids, by bincount (no code of the engine)."""
    return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab).float()


def _check(stats: TokenStats, seqs: list[Sequence]) -> None:
    seen, counts = stats.masks(stats.slots(seqs))
    for i, s in enumerate(seqs):
        if needs_seen(s):
            assert torch.equal(seen[i], _counts(s.prompt_token_ids + s.output_token_ids) > 0), s.seq_id
        if needs_counts(s):
            assert torch.equal(counts[i], _counts(s.output_token_ids))


def _params(rng: random.Random) -> SamplingParams:
    kind = rng.randrange(4)
    return SamplingParams(temperature=0, repetition_penalty=1.3 if kind in (1, 3) else 1.0,
                          presence_penalty=0.5 if kind >= 2 else 0.0, frequency_penalty=0.2 if kind == 3 else 0.0)


def test_statistics_follow_the_host_lists_through_arrivals_finishes_and_growth():
    rng, stats, live, next_id = random.Random(3), TokenStats(VOCAB, "cpu"), [], 0
    for step in range(60):
        for _ in range(rng.randrange(3) if step < 40 else 0):  # arrivals: more live rows than the first capacity
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))]
            earlier = [rng.randrange(VOCAB) for _ in range(rng.randrange(4))]  # a row filled after some outputs
            live.append(Sequence(next_id, f"r{next_id}", prompt, _params(rng), output_token_ids=earlier))
            next_id += 1
        if not live:
            continue
        _check(stats, live)  # new rows from their host contexts, old ones from the recorded ids
        tokens = torch.tensor([rng.randrange(VOCAB) for _ in live])
        stats.record(stats.slots(live), tokens)
        for s, t in zip(live, tokens.tolist(), strict=True):
            s.output_token_ids.append(t)
        for s in [s for s in live if rng.random() < 0.08]:  # finished: its row is freed for a later arrival
            s.status = SequenceStatus.FINISHED
            live.remove(s)
    assert stats.scratch > FIRST_CAPACITY  # grew while keeping every row's contents
    stats.slots(live)  # rows of finished sequences are freed at the next step
    assert len(stats.rows) == sum(needs_seen(s) or needs_counts(s) for s in live)


def test_no_penalty_no_statistics():
    stats = TokenStats(VOCAB, "cpu")
    plain = Sequence(0, "a", [1, 2], SamplingParams(temperature=0))
    assert stats.slots([plain]).tolist() == [stats.scratch] and not stats.rows and stats.counts is None


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_rows_match_the_host_lists_after_every_step(mt, async_scheduling):
    """A real engine, penalized requests arriving mid-run, a tiny pool (preemption): after every step each live
    sequence's row holds its host context, plus, while a step is in flight, the token that step sampled."""
    engine = _engine(mt, async_scheduling, block_size=4, max_model_len=52, max_num_seqs=5,
                     kv_cache_memory=16 * 2 * 2 * 64 * 4 * 4)
    prompts = _prompts(4, base=71)
    params = [_greedy(20, repetition_penalty=1.5), _greedy(18, presence_penalty=0.7, frequency_penalty=0.3),
              _greedy(16), _greedy(20, repetition_penalty=0.8, frequency_penalty=-0.4)]
    for i in range(2):
        engine.add_request(f"q{i}", prompts[i], params[i])
    stats, k = engine.runner.token_stats, 0
    while engine.has_unfinished():
        engine.step()
        k += 1
        if k == 3:
            for i in (2, 3):
                engine.add_request(f"q{i}", prompts[i][:12], params[i])
        ahead = {} if engine._in_flight is None else {e.seq: 1 for e in engine._in_flight.batch.sampling}
        for seq, row in stats.rows.items():
            if seq.is_finished:
                continue
            context = seq.prompt_token_ids + seq.output_token_ids
            want = _counts(context, stats.vocab_size) > 0
            got = stats.seen[row].cpu()
            assert int((got & ~want).sum()) <= ahead.get(seq, 0), (k, seq.seq_id)  # at most the in-flight token
            assert bool(got[want].all())
            if stats.counts is not None and needs_counts(seq):
                assert int(stats.counts[row].sum()) == len(seq.output_token_ids) + ahead.get(seq, 0)
    assert engine.scheduler.num_preemptions > 0
    if async_scheduling:
        assert engine.num_overlapped_steps > 0


def test_penalized_tokens_equal_the_host_list_path(mt, monkeypatch):
    """The same requests through the sampler's own host-list masks (the runner's statistics bypassed): equal
    tokens and log-probs."""
    prompts = _prompts(3, base=72)
    script = {0: [("add", "a", prompts[0], _greedy(16, repetition_penalty=3.0)),
                  ("add", "b", prompts[1], SamplingParams(temperature=0.9, seed=4, max_tokens=14, ignore_eos=True,
                                                          presence_penalty=1.5, frequency_penalty=0.8)),
                  ("add", "c", prompts[2], _greedy(12)),  # a strong negative frequency penalty repeats outputs:
                  ("add", "d", prompts[0], _greedy(12, frequency_penalty=-2.0))]}  # it reads every recorded id
    got = _trace(_engine(mt, True), script)
    from qwen_awq.engine import model_runner

    monkeypatch.setattr(model_runner, "penalized", lambda s: False)  # no row takes the statistics: host lists
    want = _trace(_engine(mt, False), script)
    assert got[0] == want[0]
    assert {k: v[0] for k, v in got[1].items()} == pytest.approx({k: v[0] for k, v in want[1].items()}, abs=1e-4)


@pytest.fixture(scope="module")
def mt(qwen_dir):
    return load_model(qwen_dir, dtype="float32", device=DEVICE), load_tokenizer(qwen_dir)
