"""Data parallelism: the router's rule (least outstanding work, then the replica that holds the prefix) and two
CPU replicas behind one DataParallelEngine giving the single engine's greedy tokens, the work spread over both."""
from __future__ import annotations

import asyncio

from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.models.loader import load_model
from qwen_awq.parallel.data_parallel import DataParallelEngine, DeviceAsyncEngine, PrefixRouter


def test_router_prefers_least_load_then_the_prefix_holder():
    router = PrefixRouter(3, block_size=4)
    a = [1, 2, 3, 4, 99]
    assert router.pick(a) == 0  # all idle: the first
    router.load = [1, 0, 0]
    assert router.pick(a) == 1  # least outstanding work beats the prefix holder
    router.load = [1, 1, 1]
    assert router.pick([1, 2, 3, 4, 55]) == 1  # equal load: the replica that last took this first block
    assert router.pick([8, 8, 8, 8]) == 0  # an unseen first block at equal load: the first replica
    router.load = [2, 1, 1]
    assert router.pick([1, 2, 3, 4]) == 1  # the holder is among the least loaded: it wins the tie


def _collect(engine, prompts, params):
    async def one(i, p):
        last = None
        async for out in engine.generate(f"r{i}", p, params):
            last = out
        return last.outputs[0].token_ids

    async def main():
        engine.start()
        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            engine.shutdown()
    return asyncio.run(main())


def test_two_replicas_match_one_engine_and_share_the_work(llama_dir):
    config = EngineConfig(kv_cache_memory=1 << 22, max_num_seqs=4)
    prompts = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(10, 70, 10)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    def engine():
        return LLMEngine(load_model(llama_dir, dtype="float32", device="cpu"), None, config)

    ref = _collect(AsyncEngine(engine()), prompts, params)
    replicas = [DeviceAsyncEngine(engine()), DeviceAsyncEngine(engine())]
    served = []
    for r in replicas:  # record which replica ran each request
        r.engine.add_request = (lambda orig, tag: lambda *a, **k: (served.append(tag), orig(*a, **k))[1])(
            r.engine.add_request, replicas.index(r))
    dp = DataParallelEngine(replicas)
    assert _collect(dp, prompts, params) == ref
    assert sorted(set(served)) == [0, 1]
    assert dp.router.load == [0, 0]
