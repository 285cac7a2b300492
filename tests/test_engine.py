"""The engine against a dense full-recompute greedy loop: batching, chunked prefill, prefix caching, preemption,
int8 KV, CUDA graphs."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from assets import DEVICE
from reference import dense_greedy

from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.kv_cache import KVPool, PagedAttention, PagedMetadata
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import Overloaded
from qwen_awq.kernels.paged_reference import dequantize, quantize
from qwen_awq.models.attention import ForwardBatch
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def mt(qwen_dir):
    return load_model(qwen_dir, dtype="float32", device=DEVICE), load_tokenizer(qwen_dir)


def _prompts(n: int, base: int = 1000) -> list[list[int]]:
    g = torch.Generator().manual_seed(base)
    return [torch.randint(0, 151000, (3 + 9 * i,), generator=g).tolist() for i in range(n)]


def _run(engine: LLMEngine, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


def _reference(mt, prompts, params=GREEDY):
    assert params.greedy and params.ignore_eos
    return [dense_greedy(mt[0], p, params.max_tokens, vocab=mt[1].vocab_size) for p in prompts]


def _engine(mt, **kw) -> LLMEngine:
    return LLMEngine(*mt, EngineConfig(**({"kv_cache_memory": 2**22, "max_model_len": 256} | kw)))


def _all_free(engine: LLMEngine) -> bool:
    bm = engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_batched_outputs_equal_generate_path(mt):
    prompts = _prompts(4) + [_prompts(1)[0]] * 4  # different lengths, and one prompt four times at once
    engine = _engine(mt)
    got = _run(engine, prompts)
    assert got == _reference(mt, prompts)
    assert got[4] == got[5] == got[6] == got[7]
    assert _all_free(engine)


def test_chunked_prefill_equals_one_shot(mt):
    prompts = _prompts(3, base=7)
    assert _run(_engine(mt, max_num_batched_tokens=5), prompts) == _run(_engine(mt, max_num_batched_tokens=512),
                                                                        prompts)


def test_step_budget_defaults_by_device_and_is_checked(mt):
    from qwen_awq.engine.llm_engine import STEP_TOKENS
    from qwen_awq.errors import ConfigError

    engine = _engine(mt)
    want = STEP_TOKENS["cuda" if DEVICE.startswith("cuda") else "cpu"]
    assert engine.config.max_num_batched_tokens == engine.scheduler.max_num_batched_tokens == want
    assert EngineConfig(max_num_batched_tokens=96).for_device(torch.device("cuda")).max_num_batched_tokens == 96
    assert EngineConfig().for_device(torch.device("cuda")).max_num_batched_tokens == 8192
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=0)


def test_prefix_cache_hit_gives_same_tokens_and_reuses_blocks(mt):
    shared = _prompts(1, base=3)[0] * 8  # long enough for several full blocks
    prompts = [shared + [11, 12], shared + [13]]
    engine = _engine(mt, block_size=4)
    first = _run(engine, prompts[:1])
    second = _run(engine, prompts[1:])
    assert first + second == _reference(mt, prompts)
    hits = engine.block_manager.prefix_hit_tokens
    assert hits >= (len(shared) // 4 - 1) * 4


def test_preemption_with_tiny_pool_completes_with_same_tokens(mt):
    prompts = _prompts(5, base=9)
    engine = LLMEngine(*mt, EngineConfig(block_size=4, max_model_len=52, max_num_seqs=5,
                                         kv_cache_memory=16 * 2 * 2 * 64 * 4 * 4))
    assert engine.block_manager.num_blocks == 16
    got = _run(engine, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert got == _reference(mt, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert _all_free(engine)


def test_long_prompt_keeps_its_ntk_alpha_in_the_engine(mt):
    prompts = [_prompts(1, base=5)[0] * 30]  # 90 tokens > seq_length 64: alpha 3
    assert _run(_engine(mt), prompts) == _reference(mt, prompts)


def test_int8_chunk_quantization_error_is_bounded():
    x = torch.randn(10, 3, 16, generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([0] * 4 + [1] * 6)
    codes, sz = quantize(x, seq, 2)
    back = dequantize(codes, sz, torch.float32)
    for s in (0, 1):  # error within half a quantization step of that chunk's own range
        part = x[seq == s]
        step = (part.amax(dim=(0, 2)) - part.amin(dim=(0, 2))) / 255
        assert ((back[seq == s] - part).abs() <= step[None, :, None] / 2 + 1e-6).all()


def test_int8_kv_logits_close_to_fp_cache(mt):
    model = mt[0]
    ids = torch.tensor(_prompts(1, base=4)[0] * 3, device=DEVICE)
    outs = []
    for int8 in (False, True):
        pool = KVPool(model.cfg, 8, 16, torch.float32, torch.device(DEVICE), int8=int8)
        n = len(ids)

        def t(x):
            return torch.as_tensor(x, device=DEVICE)

        meta = PagedMetadata(slot_mapping=t(torch.arange(n)), block_tables=t(torch.arange(8)[None]),
                             context_lens=t([n]), cu_seqlens=t([0, n]), token_seq=t(torch.zeros(n, dtype=torch.long)),
                             max_query_len=n)
        fb = ForwardBatch(t(torch.arange(n)), t(torch.ones(n)), PagedAttention(pool, meta))
        outs.append(model.compute_logits(model.forward_tokens(ids, fb)))
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert 0 < rel < 0.05


def test_int8_kv_engine_still_answers_paris(bundled_model):
    import qwen_awq
    from qwen_awq.chat import encode_messages

    model, tok = qwen_awq.load(None, dtype="float32", device=DEVICE)  # the default model
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_dtype="int8", max_model_len=512, kv_cache_memory=2**26))
    ids = encode_messages(tok, [{"role": "user", "content": "What is the capital of France?"}])
    text = None
    engine.add_request("q", ids, SamplingParams(temperature=0, max_tokens=20))
    while engine.has_unfinished():
        for out in engine.step():
            text = out.outputs[0].text
    assert "Paris" in text


def test_async_engine_streams_aborts_and_shuts_down(mt):
    engine = _engine(mt)
    aengine = AsyncEngine(engine)
    aengine.start()
    prompts = _prompts(3, base=21)
    ref = _reference(mt, prompts)

    async def consume(i, stop_after=None):
        ids = []
        async for out in aengine.generate(f"a{i}", prompts[i], GREEDY):
            ids += out.outputs[0].delta_token_ids
            if stop_after is not None and len(ids) >= stop_after:
                break
        return ids

    async def main():
        return await asyncio.gather(consume(0), consume(1, stop_after=3), consume(2))

    got = asyncio.run(main())
    assert got[0] == ref[0] and got[2] == ref[2] and got[1] == ref[1][:3]
    aengine.shutdown()
    assert _all_free(engine) and not engine.requests
    assert not [t for t in threading.enumerate() if t.name == "qwen-awq-engine"]


def test_async_engine_rejects_when_queue_full(mt):
    engine = LLMEngine(*mt, EngineConfig(kv_cache_memory=2**22, max_model_len=256, max_waiting=1))
    aengine = AsyncEngine(engine)  # not started: nothing drains the queue

    async def main():
        first = aengine.generate("x", [1, 2, 3], GREEDY)
        task = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await aengine.generate("y", [1, 2, 3], GREEDY).__anext__()
        task.cancel()

    asyncio.run(main())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run with QWEN_AWQ_TEST_DEVICE=cuda")
def test_cuda_graph_decode_equals_eager(mt):
    """Captured decode steps (padded batch sizes, scratch block for padding rows) against the eager forward."""
    assert mt[0].device.type == "cuda", "set QWEN_AWQ_TEST_DEVICE=cuda"
    prompts = _prompts(5, base=33) + _prompts(2, base=34)
    graphed = _engine(mt, max_num_seqs=8)
    got = _run(graphed, prompts)
    assert graphed.runner.graphs.replays > 0
    eager = _engine(mt, max_num_seqs=8, enforce_eager=True)
    assert eager.runner.graphs is None
    assert got == _run(eager, prompts) == _reference(mt, prompts)
    assert _all_free(graphed)


class _EagerReplay:
    """Stands in for a captured graph on the CPU: replaying re-runs the forward over the static buffers."""

    def __init__(self, graphs: DecodeGraphs, key: int, seen: list) -> None:
        self.graphs, self.key, self.seen = graphs, key, seen

    def replay(self) -> None:
        self.seen.append(self.key)
        self.graphs.logits[:self.key].copy_(self.graphs._forward(self.key))


def test_decode_graph_buffers_equal_the_oracle_on_cpu(mt):
    """The CUDA-graph decode path (static StepInput buffers as wide as the longest context, padded batch sizes, the
    scratch block), with each "graph" replayed eagerly, gives the dense oracle's tokens: graph bookkeeping is
    checked without a GPU."""
    model, tok = mt
    long = torch.randint(0, 151000, (505,), generator=torch.Generator().manual_seed(37)).tolist()
    prompts = _prompts(2, base=38) + [long]
    engine = _engine(mt, max_num_seqs=4, max_model_len=1024, kv_cache_memory=2**26)
    n = engine.block_manager.num_blocks
    engine.pool = engine.runner.pool = KVPool(model.cfg, n + 1, 16, model.dtype, model.device)  # + scratch block
    graphs = engine.runner.graphs = DecodeGraphs(model, engine.pool, 4, 1024 // 16, scratch_block=n)
    graphs.logits = torch.empty(4, model.cfg.vocab_size)
    seen: list = []
    graphs.graphs = {b: _EagerReplay(graphs, b, seen) for b in graphs.sizes}
    assert _run(engine, prompts) == _reference(mt, prompts)
    assert set(seen) == {4}  # 3 rows + 1 padding row, short and long contexts alike
    assert _all_free(engine)


class _CountingGraph:
    def __init__(self, graph, key, seen: list) -> None:
        self.graph, self.key, self.seen = graph, key, seen

    def replay(self) -> None:
        self.seen.append(self.key)
        self.graph.replay()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run with QWEN_AWQ_TEST_DEVICE=cuda")
def test_one_cuda_graph_per_batch_size_serves_every_length(mt):
    """One graph per batch size, as wide as max_model_len: a context growing past 512 tokens keeps replaying it
    (the kernel reads only the real lengths), and the tokens stay those of the eager forward."""
    long = torch.randint(0, 151000, (505,), generator=torch.Generator().manual_seed(36)).tolist()
    prompts = _prompts(2, base=35) + [long]
    config = {"max_num_seqs": 4, "max_model_len": 1024, "kv_cache_memory": 2**26}
    graphed = _engine(mt, **config)
    graphs, seen = graphed.runner.graphs, []
    assert set(graphs.graphs) == set(graphs.sizes) and graphs.static.paged.block_tables.shape[1] == 64
    graphs.graphs = {key: _CountingGraph(g, key, seen) for key, g in graphs.graphs.items()}
    got = _run(graphed, prompts)
    assert len(seen) > 0
    assert got == _run(_engine(mt, enforce_eager=True, **config), prompts)
    assert _all_free(graphed)
