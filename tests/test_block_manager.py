"""Block manager: prefix-cache sharing, salts, LRU revival and eviction, and pool invariants under random
scheduler workloads checked against a fake KV cache that records which context each slot was computed for."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.engine.block_manager import BlockManager, block_hash
from qwen_awq.engine.scheduler import ScheduledBatch, Scheduler
from qwen_awq.engine.sequence import FinishReason, Sequence, SequenceStatus
from qwen_awq.errors import Overloaded


@dataclass
class Params:
    max_tokens: int | None = 4


def make_seq(seq_id: int, tokens: list[int], salt: str | None = None, max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", tokens, Params(max_tokens), cache_salt=salt)


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed every token the sequence's table was grown for."""
    seq.num_computed_tokens = min(seq.num_tokens, len(seq.block_table) * bm.block_size)
    bm.on_tokens_computed(seq)


PREFIX = [7, 3, 9, 4, 8, 2, 6, 5, 11, 13, 12, 10]  # 3 blocks of 4


def test_block_hash_chains_and_separates_salts() -> None:
    a = block_hash(None, [1, 2, 3, 4], None)
    assert a == block_hash(None, [1, 2, 3, 4], None)
    assert len({a, block_hash(None, [1, 2, 3, 4], ""), block_hash(None, [1, 2, 3, 4], "x"),
                block_hash(None, [1, 2, 3, 5], None), block_hash(a, [1, 2, 3, 4], None)}) == 5
    # Same block tokens after different parents must not collide.
    assert block_hash(a, [5, 6], None) != block_hash(block_hash(None, [1, 2, 3, 5], None), [5, 6], None)


def test_equal_prefixes_share_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(0, PREFIX + [1, 2])
    assert bm.allocate(a, token_budget=100) and len(a.block_table) == 4 and a.num_computed_tokens == 0
    compute(bm, a)
    b = make_seq(1, PREFIX + [3, 3, 3])
    assert bm.allocate(b, token_budget=100)
    assert b.num_computed_tokens == 12 and b.num_cached_prefix_tokens == 12
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] not in a.block_table
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 2, 1]
    assert (bm.prefix_hit_tokens, bm.prefix_query_tokens) == (12, 14 + 15)
    assert bm.num_free_blocks == 16 - 4 - 1
    # A prompt that is exactly the cached prefix still computes its last block, for the logits.
    c = make_seq(2, PREFIX)
    assert bm.allocate(c, token_budget=100)
    assert c.num_computed_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    assert c.block_table[2] != a.block_table[2]
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 16 and all(bm.ref_count(x) == 0 for x in range(16))


def test_cache_salt_isolates_tenants() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(0, PREFIX + [1], salt="tenant-a")
    bm.allocate(a, 100)
    compute(bm, a)
    for seq_id, salt in [(1, "tenant-b"), (2, None), (3, "")]:
        other = make_seq(seq_id, PREFIX + [1], salt=salt)
        assert bm.allocate(other, 100) and other.num_computed_tokens == 0
        assert not set(other.block_table) & set(a.block_table)
        bm.free(other)
    same = make_seq(4, PREFIX + [1], salt="tenant-a")
    assert bm.allocate(same, 100) and same.block_table[:3] == a.block_table[:3]


def test_hit_after_free_revives_cached_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, PREFIX + [1, 2])
    bm.allocate(a, 100)
    compute(bm, a)
    old = list(a.block_table)
    bm.free(a)
    # The 3 full blocks stay cached (evictable); the partial one holds nothing reusable.
    assert bm.num_free_blocks == 8 and bm.num_evictable_blocks == 3 and bm.usage == 0.0
    b = make_seq(1, PREFIX + [5])
    assert bm.allocate(b, 100)
    assert b.block_table[:3] == old[:3] and b.num_computed_tokens == 12
    assert bm.num_evictable_blocks == 0 and [bm.ref_count(x) for x in old[:3]] == [1, 1, 1]
    assert bm.usage == 4 / 8


def test_eviction_is_least_recently_released_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(0, [1, 2, 3, 4, 5]), make_seq(1, [6, 7, 8, 9, 10])
    for s in (a, b):  # a then b: a's blocks are released first, so they are older
        bm.allocate(s, 100)
        compute(bm, s)
        bm.free(s)
    assert bm.num_evictable_blocks == 4 and bm.num_free_blocks == 6
    # 3 new blocks: 2 truly free ones first, then the oldest cached one: a's tail block.
    c = make_seq(2, [20, 21, 22, 23, 24])
    assert bm.allocate(c, 100) and bm.num_evictable_blocks == 3
    probe = make_seq(3, [1, 2, 3, 4, 5])
    assert bm.can_allocate(probe, 100)
    bm.allocate(probe, 100)
    assert probe.num_computed_tokens == 2  # a's head block survived, its tail was evicted
    bm.free(probe)
    bm.free(c)
    d = make_seq(4, list(range(30, 42)))  # needs all 6 blocks: evicts everything cached
    assert bm.allocate(d, 100) and bm.num_free_blocks == 0
    bm.free(d)
    for tokens in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]):
        probe = make_seq(5, tokens)
        bm.allocate(probe, 100)
        assert probe.num_computed_tokens == 0
        bm.free(probe)


def test_short_pool_refuses_without_side_effects() -> None:
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a = make_seq(0, list(range(1, 11)))
    assert bm.allocate(a, token_budget=4) and len(a.block_table) == 1  # first chunk only
    big = make_seq(1, list(range(1, 13)))
    assert not bm.can_allocate(big, 100) and not bm.allocate(big, 100)
    assert big.block_table == [] and bm.num_free_blocks == 2
    assert not bm.append_slots(a, 16) and len(a.block_table) == 1
    assert bm.append_slots(a, 10) and len(a.block_table) == 3 and bm.num_free_blocks == 0
    assert [bm.slot(a, p) for p in (0, 5, 9)] == [a.block_table[0] * 4, a.block_table[1] * 4 + 1,
                                                   a.block_table[2] * 4 + 1]


# ---- random workloads ------------------------------------------------------------------------------------
STOP = 0  # the fake model's stop token
VOCAB = 4


def next_token(context: tuple[int, ...]) -> int:
    """A deterministic 'model': any scheduling must reproduce the same outputs."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 7 + len(context)) % VOCAB


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(next_token(tuple(tokens)))
        tokens.append(out[-1])
        if out[-1] == STOP:
            break
    return out


def run_fake_model(bm: BlockManager, batch: ScheduledBatch, kv: dict[int, tuple]) -> dict[int, int]:
    """Write each computed position's (salt, context) into its slot, then read the whole context back from
    the slots: a wrong block table, a wrongly shared block or a stale evicted block shows up here."""
    sampled = {}
    for e in batch:
        seq, tokens = e.seq, e.seq.all_token_ids
        for p in range(e.start, e.end):
            block = seq.block_table[p // bm.block_size]
            assert bm.ref_count(block) == 1 and not bm.is_cached(block), "write into a shared block"
            kv[bm.slot(seq, p)] = (seq.cache_salt, tuple(tokens[:p + 1]))
        for p in range(e.end):
            assert kv[bm.slot(seq, p)] == (seq.cache_salt, tuple(tokens[:p + 1]))
        if e.needs_sample:
            sampled[seq.seq_id] = next_token(kv[bm.slot(seq, e.end - 1)][1])
    return sampled


def check_pool(bm: BlockManager, sched: Scheduler) -> None:
    owners: Counter[int] = Counter()
    for seq in sched.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        owners.update(seq.block_table)
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert all(bm.ref_count(b) == owners[b] for b in range(bm.num_blocks))
    assert bm.num_free_blocks == bm.num_blocks - len(owners)
    for b in (b for b, n in owners.items() if n > 1):  # shared: a cached, fully computed prefix block
        assert bm.is_cached(b)
        for seq in sched.running:
            if b in seq.block_table:
                assert (seq.block_table.index(b) + 1) * bm.block_size <= seq.num_computed_tokens


@dataclass
class Workload:
    block_size: int
    caching: bool
    max_model_len: int
    extra_blocks: int
    max_num_seqs: int
    budget: int
    max_waiting: int
    seed: int


def make_requests(w: Workload, rng: random.Random) -> list[list[Sequence]]:
    """Prompts cut from two shared token streams (so prefixes repeat), some salted, some with n=2."""
    streams = [[rng.randrange(1, VOCAB) for _ in range(w.max_model_len)] for _ in range(2)]
    requests, seq_id = [], 0
    for r in range(rng.randint(1, 8)):
        length = rng.randint(1, w.max_model_len - 1)
        prompt = rng.choice(streams)[:length]
        if rng.random() < 0.3:
            prompt[-1] = rng.randrange(1, VOCAB)
        max_tokens = rng.randint(1, min(6, w.max_model_len - length))
        salt = rng.choice([None, None, "tenant"])
        group = []
        for _ in range(rng.choice([1, 1, 2])):
            group.append(Sequence(seq_id, f"req{r}", prompt, Params(max_tokens), cache_salt=salt))
            seq_id += 1
        requests.append(group)
    return requests


def check_batch(w: Workload, bm: BlockManager, sched: Scheduler, batch: ScheduledBatch) -> None:
    assert len(batch) > 0, "work was left but nothing was scheduled"
    assert batch.num_tokens <= w.budget and sched.num_running <= w.max_num_seqs
    assert len({id(e.seq) for e in batch}) == len(batch)
    for e in batch:
        assert e.seq.status is SequenceStatus.RUNNING and e.start == e.seq.num_computed_tokens
        assert len(e.seq.block_table) * bm.block_size >= e.end
    for seq in batch.preempted:
        assert seq in sched.waiting and seq.block_table == []


def engine_step(w: Workload, bm: BlockManager, sched: Scheduler, kv: dict, rng: random.Random,
                aborted: set[str]) -> None:
    batch = sched.schedule()
    check_batch(w, bm, sched, batch)
    check_pool(bm, sched)
    sampled = run_fake_model(bm, batch, kv)
    if rng.random() < 0.05:  # the client goes away while the step runs
        request_id = rng.choice(batch.entries).seq.request_id
        aborted.add(request_id)
        sched.abort(request_id)
    as_list = [sampled[e.seq.seq_id] for e in batch.sampling]
    for seq in sched.update(batch, as_list if rng.random() < 0.5 else sampled):
        if seq.output_token_ids[-1] == STOP:
            sched.finish(seq, FinishReason.STOP)
        elif seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq, FinishReason.LENGTH)
    check_pool(bm, sched)


@settings(max_examples=300, deadline=None)
@given(st.builds(Workload, st.sampled_from([1, 2, 4]), st.booleans(), st.integers(6, 20), st.integers(0, 3),
                 st.integers(1, 4), st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**32)))
def test_random_workload_frees_everything_and_matches_reference(w: Workload) -> None:
    rng = random.Random(w.seed)
    bm = BlockManager(-(-w.max_model_len // w.block_size) + w.extra_blocks, w.block_size, w.caching)
    sched = Scheduler(bm, w.max_num_seqs, w.budget, w.max_model_len, w.max_waiting)
    pending, kv, aborted = make_requests(w, rng), {}, set()
    everyone = [s for group in pending for s in group]
    for _ in range(5000):
        if pending and rng.random() < 0.5:
            try:
                sched.add(*pending[0])
                pending.pop(0)
            except Overloaded:
                assert sched.num_waiting >= w.max_waiting
        if sched.has_unfinished() and rng.random() < 0.03:
            victim = rng.choice([*sched.running, *sched.waiting])
            aborted.add(victim.request_id)
            assert sched.abort(victim.request_id) and victim.block_table == []
        if sched.has_unfinished():
            engine_step(w, bm, sched, kv, rng, aborted)
        elif not pending:
            break
    assert not pending and not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    for seq in everyone:
        assert seq.is_finished and seq.block_table == []
        if seq.finish_reason is not FinishReason.ABORT:
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.max_tokens)
        else:
            assert seq.request_id in aborted
