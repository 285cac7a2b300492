"""The decode graphs' greedy tail (argmax + log-prob captured after the forward): greedy_rows equals sample() on
random logits, and a qwen-tiny engine whose graphs and tails replay eagerly on the CPU gives the eager engine's
tokens and log-probs, using the tail only on plain greedy steps."""
from __future__ import annotations

import pytest
import torch

from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.kv_cache import KVPool
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampler import SamplingBatch, greedy_rows, plain_greedy, sample
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.eval.synthetic import load_synthetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_rows_equal_sample(dtype):
    logits = (torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)  # (B, V_padded)
    logits[:, 290:] = 50.0  # padding columns: never picked
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 6
    want = sample(logits, SamplingBatch.build(params, [[1]] * 6, [[]] * 6, vocab_size=290))
    got = greedy_rows(logits, 290)  # (B, 2): on the CPU sample()'s own ops (kernel: test_greedy_tail_kernel.py)
    assert got[:, 0].long().tolist() == want.tokens.tolist()
    assert torch.equal(got[:, 1].float(), want.logprobs)


def test_plain_greedy_is_what_sample_reduces_to_argmax_for():
    assert plain_greedy(SamplingParams(temperature=0.0, logprobs=0), 0, (5,))
    assert plain_greedy(SamplingParams(temperature=0.0, min_tokens=2), 2, (5,))  # min_tokens reached
    assert not plain_greedy(SamplingParams(temperature=0.0, min_tokens=2), 1, (5,))
    assert not plain_greedy(SamplingParams(temperature=0.5), 0, ())
    assert not plain_greedy(SamplingParams(temperature=0.0, logprobs=2), 0, ())
    assert not plain_greedy(SamplingParams(temperature=0.0, repetition_penalty=1.1), 0, ())
    assert not plain_greedy(SamplingParams(temperature=0.0, presence_penalty=0.5), 0, ())


class _Eager:
    """Stands in for a captured graph on the CPU: replaying runs what was captured, eagerly."""

    def __init__(self, fn, b: int, seen: list) -> None:
        self.fn, self.b, self.seen = fn, b, seen

    def replay(self) -> None:
        self.seen.append(self.b)
        self.fn(self.b)


def _engine(model, graphed: bool, seen: dict[str, list] | None = None) -> LLMEngine:
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=3, max_model_len=128, kv_cache_memory=2**23))
    if graphed:
        n = engine.block_manager.num_blocks
        engine.pool = engine.runner.pool = KVPool(model.cfg, n + 1, 16, model.dtype, model.device)
        graphs = engine.runner.graphs = DecodeGraphs(model, engine.pool, 3, 128 // 16, scratch_block=n)
        graphs.logits = torch.empty(3, model.cfg.vocab_size)

        def forward(b: int) -> None:
            graphs.logits[:b].copy_(graphs._forward(b))
        graphs.graphs = {b: _Eager(forward, b, seen["graph"]) for b in graphs.sizes}
        graphs.tails = {b: _Eager(graphs._greedy_tail, b, seen["tail"]) for b in graphs.sizes}
        graphs.random_tails = {b: _Eager(graphs._random_tail, b, seen["random"]) for b in graphs.sizes}
    return engine


def _run(engine: LLMEngine, params: list[SamplingParams]) -> list[tuple[list[int], float]]:
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", [100 + i, 7, 9 + i], p)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].cumulative_logprob)
    return [done[f"r{i}"] for i in range(len(params))]


@pytest.fixture(scope="module")
def tiny():
    return load_synthetic("qwen-tiny", device="cpu", dtype="float32")


@pytest.mark.parametrize("mixed", [False, True])
def test_greedy_tail_gives_the_eager_engines_tokens(tiny, mixed):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    params = [greedy, greedy, greedy]
    if mixed:
        params[1] = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)
    seen: dict[str, list] = {"graph": [], "tail": [], "random": []}
    got = _run(_engine(tiny, True, seen), params)
    want = _run(_engine(tiny, False), params)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert len(seen["graph"]) > 0
    assert (seen["tail"] == []) if mixed else (seen["tail"] == seen["graph"])


@pytest.mark.parametrize("seeded", [False, True])
def test_random_tail_gives_the_eager_engines_draws(tiny, seeded):
    """Plain temperature sampling takes the random tail (same default-generator draws as sample()); a seeded row
    sends the whole step to the eager sampler."""
    params = [SamplingParams(temperature=t, max_tokens=6, ignore_eos=True) for t in (1.0, 0.6, 1.0)]
    if seeded:
        params[2] = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=5)
    seen: dict[str, list] = {"graph": [], "tail": [], "random": []}
    torch.manual_seed(21)
    got = _run(_engine(tiny, True, seen), params)
    torch.manual_seed(21)
    want = _run(_engine(tiny, False), params)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert seen["tail"] == []
    assert (seen["random"] == []) if seeded else (seen["random"] == seen["graph"] != [])
