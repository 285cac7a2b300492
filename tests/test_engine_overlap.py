"""Overlapped decode steps (async_scheduling, engine/overlap.py) against the same engine without them: every
request's tokens, log-probs, finish and stop reasons, text, and the step on which each output arrived are equal;
aborts and arrivals mid-run included; every KV block is free at the end."""
from __future__ import annotations

import pytest
import torch
from assets import DEVICE
from test_engine import _EagerReplay, _prompts

from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.kv_cache import KVPool
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def mt(qwen_dir):
    return load_model(qwen_dir, dtype="float32", device=DEVICE), load_tokenizer(qwen_dir)


def _engine(mt, async_scheduling: bool, **kw) -> LLMEngine:
    config = {"kv_cache_memory": 2**22, "max_model_len": 256, "async_scheduling": async_scheduling} | kw
    return LLMEngine(*mt, EngineConfig(**config))


def _all_free(engine: LLMEngine) -> bool:
    bm = engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def _trace(engine: LLMEngine, script: dict[int, list[tuple]]) -> tuple[dict, dict]:
    """Run until idle, applying script[k] (("add", id, prompt, params) / ("abort", id)) before step call k.
    Per (request, index): its outputs in order, each (delta ids, delta text, finish reason, stop reason, finished).
    Not the call each came on: an arrival waits one more call while a step is in flight."""
    records, logprobs, k = {}, {}, 0
    while engine.has_unfinished() or any(key >= k for key in script):
        for action in script.get(k, []):
            if action[0] == "add":
                engine.add_request(*action[1:])
            else:
                engine.abort(action[1])
        for out in engine.step():
            for o in out.outputs:
                records.setdefault((out.request_id, o.index), []).append(
                    (o.delta_token_ids[:], o.delta_text, o.finish_reason, o.stop_reason, out.finished))
                logprobs[out.request_id, o.index] = (o.cumulative_logprob, o.logprobs)
        k += 1
    return records, logprobs


def _compare(mt, script, **kw) -> LLMEngine:
    """Both engines on the script: equal records and log-probs; the async one overlapped some steps."""
    engines = [_engine(mt, flag, **kw) for flag in (False, True)]
    (sync, sync_lp), (over, over_lp) = (_trace(e, script) for e in engines)
    assert over == sync
    assert over_lp.keys() == sync_lp.keys()
    for key, (cum, lps) in sync_lp.items():
        assert over_lp[key][0] == pytest.approx(cum, abs=1e-4)
        if lps is not None:
            assert [d.keys() for d in over_lp[key][1]] == [d.keys() for d in lps]
    assert engines[0].num_overlapped_steps == 0 and engines[1].num_overlapped_steps > 0
    assert all(_all_free(e) and not e.requests for e in engines)
    return engines[1]


def _probe(mt, prompt: list[int]) -> tuple[list[int], str]:
    """A prompt's greedy tokens and text alone, to pick stop ids and strings that end it mid-run."""
    engine = _engine(mt, False)
    engine.add_request("p", prompt, _greedy(12))
    outs = [o.outputs[0] for step in iter(engine.step, []) for o in step]
    return [t for o in outs for t in o.delta_token_ids], "".join(o.delta_text for o in outs)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_greedy_with_max_tokens_stop_ids_and_arrivals(mt):
    prompts = _prompts(5, base=61)
    ids, _ = _probe(mt, prompts[1])
    script = {0: [("add", "a", prompts[0], _greedy(14)), ("add", "b", prompts[1], _greedy(20, stop_token_ids=[ids[6]])),
                  ("add", "c", prompts[2], _greedy(9, logprobs=2))],
              5: [("add", "d", prompts[3], _greedy(7))],  # arrives while decode steps overlap
              9: [("add", "e", prompts[4], _greedy(11, min_tokens=3, stop_token_ids=[ids[1]]))]}
    over = _compare(mt, script)
    assert over.num_overlapped_steps >= 10


def test_seeded_sampling_n_and_aborts(mt):
    prompts = _prompts(4, base=62)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=5, ignore_eos=True, n=2)
    script = {0: [("add", "s", prompts[0], seeded), ("add", "t", prompts[1], SamplingParams(
                  temperature=1.0, top_k=20, max_tokens=18, seed=9, logprobs=1, ignore_eos=True))],
              1: [("add", "u", prompts[2], _greedy(30))],
              6: [("abort", "u")],  # while its next step is in flight
              # penalized rows overlap too (engine/token_stats.py), with unpenalized ones in the same steps
              8: [("add", "v", prompts[3], _greedy(24, repetition_penalty=50.0)),
                  ("add", "w", prompts[0], _greedy(24, repetition_penalty=0.02, presence_penalty=-2.0))]}
    _compare(mt, script)


def test_stop_string_and_eos_end_a_sequence_mid_run(mt):
    prompts = _prompts(3, base=63)
    _, text = _probe(mt, prompts[0])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    script = {0: [("add", "x", prompts[0], _greedy(20, stop=[stop])), ("add", "y", prompts[1], _greedy(15)),
                  ("add", "z", prompts[2], SamplingParams(temperature=0, max_tokens=40))]}  # the model's eos ids
    _compare(mt, script)


class _Tail:
    """Stands in for a captured greedy tail on the CPU: argmax and log-prob into the graphs' shared buffer."""

    def __init__(self, graphs: DecodeGraphs, b: int) -> None:
        self.graphs, self.b = graphs, b

    def replay(self) -> None:
        self.graphs._greedy_tail(self.b)


@pytest.mark.parametrize("seeded", [False, True])
def test_overlapped_graph_path_on_cpu(mt, seeded):
    """The decode-graph path (input ids copied into the packed buffer on the device; greedy steps read from the
    tail's shared buffer, which the next step rewrites), each graph replayed eagerly: overlapped and plain runs
    give the same outputs."""
    model, _ = mt
    prompts = _prompts(3, base=64)
    params = [_greedy(10 + 3 * i) for i in range(3)]
    if seeded:  # no tail: sample() on the graph's logits
        params[1] = SamplingParams(temperature=0.8, max_tokens=12, seed=3, ignore_eos=True)
    script = {0: [("add", f"g{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params, strict=True))]}
    traces = []
    for flag in (False, True):
        engine = _engine(mt, flag, max_num_seqs=4)
        n = engine.block_manager.num_blocks
        engine.pool = engine.runner.pool = KVPool(model.cfg, n + 1, 16, model.dtype, model.device)
        graphs = engine.runner.graphs = DecodeGraphs(model, engine.pool, 4, 256 // 16, scratch_block=n,
                                                     vocab_size=mt[1].vocab_size)
        graphs.logits = torch.empty(4, model.cfg.vocab_size, device=model.device)
        seen: list = []
        graphs.graphs = {b: _EagerReplay(graphs, b, seen) for b in graphs.sizes}
        graphs.tails = {b: _Tail(graphs, b) for b in graphs.sizes}
        traces.append(_trace(engine, script))
        assert seen and _all_free(engine)
        assert (engine.num_overlapped_steps > 0) == flag
    assert traces[0][0] == traces[1][0]
    assert {k: v[0] for k, v in traces[0][1].items()} == pytest.approx({k: v[0] for k, v in traces[1][1].items()})


def test_preemption_recomputes_the_real_tokens_after_overlapped_steps(mt):
    """A tiny pool: sequences are preempted after overlapped steps and recomputed from their recorded tokens, which
    must be the sampled ones, not the placeholders the overlapped step recorded first; prefix caching on."""
    prompts = _prompts(3, base=9)[1:]  # 12 + 21 prompt tokens, 20 more each: past the pool's 64 while decoding
    script = {0: [("add", f"q{i}", p, _greedy(20)) for i, p in enumerate(prompts)]}
    config = {"block_size": 4, "max_model_len": 52, "max_num_seqs": 5, "kv_cache_memory": 16 * 2 * 2 * 64 * 4 * 4}
    over = _compare(mt, script, **config)
    assert over.scheduler.num_preemptions > 0 and over.num_overlapped_steps > 5


@pytest.mark.parametrize("params, overlaps", [
    (_greedy(10), True), (_greedy(10, min_tokens=6, stop_token_ids=[5]), True),  # a ban counts tokens only
    # penalties read the statistics the runner keeps on the device, not the host's (last) token
    (_greedy(10, repetition_penalty=1.2), True), (_greedy(10, presence_penalty=0.5), True),
    (_greedy(10, frequency_penalty=0.5), True),
    (_greedy(2), False)])  # every decode step ends it by length: nothing to look ahead to
def test_which_requests_overlap(mt, params, overlaps):
    engine = _engine(mt, True)
    _trace(engine, {0: [("add", "o", _prompts(1, base=65)[0], params)]})
    assert (engine.num_overlapped_steps > 0) == overlaps
    assert _all_free(engine)


def test_the_step_in_flight_is_drained_after_the_last_abort(mt):
    engine = _engine(mt, True)
    engine.add_request("a", _prompts(1, base=66)[0], _greedy(20))
    got = [t for _ in range(4) for out in engine.step() for t in out.outputs[0].delta_token_ids]
    assert len(got) == 4 and engine.num_overlapped_steps > 0
    engine.abort("a")
    assert not engine.requests and engine.has_unfinished()  # a step is still in flight: it must be drained
    assert engine.step() == [] and not engine.has_unfinished()
    assert _all_free(engine) and engine.step() == []
