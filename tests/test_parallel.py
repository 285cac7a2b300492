"""Tensor parallelism on the CPU (gloo, 2 and 4 spawned ranks): each rank's shard of a tiny random Qwen v1 and a
tiny GQA Llama model, plain and AWQ, gives the single-process logits; LLM(tensor_parallel_size=2) decodes the same
greedy tokens; a dead worker fails the request with a clear error; nothing is left running after shutdown.
"""
from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
import tp_ranks
from checkpoints import write_llama_checkpoint

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ParallelError
from qwen_awq.models.family import load_config
from qwen_awq.models.loader import load_model
from qwen_awq.parallel.sharding import shard_config
from qwen_awq.parallel.state import ParallelState
from qwen_awq.ports import free_port
from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

RTN = QuantizeConfig(group_size=32, method="rtn", samples=4, seqlen=16)  # whole groups on 2 ranks of the tiny models
TOL = 1e-4  # fp32: only the order of the summed partial products differs


@pytest.fixture(scope="module")
def qwen_awq_dir(qwen_dir, tmp_path_factory):
    return quantize_model(qwen_dir, tmp_path_factory.mktemp("qwen-awq") / "q", RTN, progress=False)


@pytest.fixture(scope="module")
def llama_awq_dir(tmp_path_factory):
    """A GQA Llama with an MLP width (128) that 2 ranks split into whole AWQ groups of 32."""
    src = tmp_path_factory.mktemp("llama-128")
    write_llama_checkpoint(src, overrides={"intermediate_size": 128})
    return quantize_model(src, tmp_path_factory.mktemp("llama-awq") / "q", RTN, progress=False)


def _shard_logits(folder, world: int, vocab: int, tmp_path) -> tuple[torch.Tensor, int, list[dict]]:
    """(single-process logits, its tensor elements, each rank's report) for random ids."""
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(world))
    whole = load_model(folder, dtype="float32", device="cpu")
    with torch.inference_mode():
        ref = whole(ids)
    total = sum(t.numel() for t in (*whole.parameters(), *whole.buffers()) if t is not None)
    del whole  # the ranks load their shards next: keep host memory to one model
    mp.spawn(tp_ranks.shard_logits, args=(world, free_port(), str(folder), ids, str(tmp_path)), nprocs=world)
    return ref, total, [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


# GQA both ways: 2 KV heads split over 2 ranks (llama_awq_dir), and replicated over 4 (llama_dir)
@pytest.mark.parametrize(("name", "world"), [("qwen_dir", 2), ("llama_dir", 4), ("qwen_awq_dir", 2),
                                             ("llama_awq_dir", 2)])
def test_shards_give_the_single_process_logits(name, world, request, tmp_path):
    folder = request.getfixturevalue(name)
    cfg = load_config(folder)
    ref, total, ranks = _shard_logits(folder, world, cfg.vocab_size, tmp_path)
    for r in ranks:
        assert r["logits"].shape == ref.shape
        torch.testing.assert_close(r["logits"], ref, atol=TOL, rtol=TOL)
    # each rank holds its KV heads (one, replicated, when there are fewer than ranks) and ~1/world of the weights
    assert ranks[0]["kv_heads"] == max(cfg.num_kv_heads // world, 1)
    assert ranks[0]["numel"] < total / world * 1.1


def test_a_split_that_cuts_an_awq_group_is_refused(llama_awq_dir):
    cfg = load_config(llama_awq_dir)  # o_proj has 64 inputs: 16 per rank on 4 ranks, half a group of 32
    with pytest.raises(ParallelError, match="o_proj's 64 inputs do not split into whole AWQ groups of 32"):
        shard_config(cfg, ParallelState(rank=0, world=4))
    with pytest.raises(ParallelError, match="3 ranks: 8 attention heads"):
        shard_config(replace(cfg, quant=None), ParallelState(rank=0, world=3))


def _greedy(llm, prompts):
    params = SamplingParams(max_tokens=6, temperature=0)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_llm_tensor_parallel_greedy_matches_and_dead_worker_fails_cleanly(qwen_awq_dir):
    from qwen_awq.engine.llm import LLM

    prompts = [[11, 12, 13, 14, 15], [7, 8, 9], list(range(100, 140))]
    kv = {"kv_cache_memory": 1 << 24, "max_num_batched_tokens": 16}  # 16: the long prompt prefills in chunks
    ref = _greedy(LLM(str(qwen_awq_dir), dtype="float32", device="cpu", **kv), prompts)
    llm = LLM(str(qwen_awq_dir), dtype="float32", device="cpu", tensor_parallel_size=2, **kv)
    pids = [p.pid for p in llm.workers.procs]
    try:
        assert _greedy(llm, prompts) == ref
        os.kill(pids[0], signal.SIGKILL)
        llm.workers.procs[0].join(10)
        with pytest.raises(ParallelError, match="worker rank 1 .* exited with code -9"):
            _greedy(llm, prompts[:1])
        _server_request_fails(llm.engine)
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in llm.workers.procs)
    assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in pids)
    restarted = LLM(str(qwen_awq_dir), dtype="float32", device="cpu", tensor_parallel_size=2, **kv)
    try:  # the process group was left cleanly: a new engine starts in the same process
        assert _greedy(restarted, prompts[:1]) == ref[:1]
    finally:
        restarted.shutdown()


def _server_request_fails(engine) -> None:
    """The server's path: the request ends with GenerationFailed naming the dead worker, within seconds."""
    from qwen_awq.engine.async_engine import AsyncEngine, GenerationFailed

    served = AsyncEngine(engine)

    async def request() -> None:
        async for _ in served.generate("after-death", [1, 2, 3], SamplingParams(max_tokens=3)):
            pass

    served.start()
    try:
        with pytest.raises(GenerationFailed, match="worker rank 1 .* exited"):
            asyncio.run(asyncio.wait_for(request(), timeout=30))
    finally:
        served.shutdown()


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_engine_for_builds_engines_on_every_rank_again(llama_dir):
    """Benchmarks build one engine per row on the same shards: the workers rebuild theirs each time."""
    from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
    from qwen_awq.parallel.launch import engine_for, start_tensor_parallel

    config = EngineConfig(kv_cache_memory=1 << 22, max_num_seqs=4)
    prompts = [[5, 6, 7, 8], [9, 10]]
    single = LLMEngine(load_model(llama_dir, dtype="float32", device="cpu"), None, config)
    ref = _engine_greedy(single, prompts)
    model, group = start_tensor_parallel(llama_dir, "float32", "cpu", 2)
    try:
        for max_seqs in (4, 1):  # a second, differently sized engine over the same workers
            engine = engine_for(model, None, replace(config, max_num_seqs=max_seqs))
            assert engine.pool.k.shape[2] == 1  # this rank's one KV head of the model's two
            assert _engine_greedy(engine, prompts) == ref
    finally:
        group.close()
    assert not any(p.is_alive() for p in group.procs)


def _engine_greedy(engine, prompts) -> list[list[int]]:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
    return [done[str(i)] for i in range(len(prompts))]


def test_more_ranks_than_gpus_is_refused_in_one_line(monkeypatch):
    from qwen_awq.parallel.data_parallel import replica_devices
    from qwen_awq.parallel.state import check_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParallelError, match=r"--tensor-parallel-size 2 needs 2 GPUs but only 1 are visible"):
        check_devices(2, torch.device("cuda"))
    check_devices(4, torch.device("cpu"))  # CPU ranks share the host: any number
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ParallelError, match=r"--data-parallel-size 3 needs 3 GPUs but only 1"):
        replica_devices(3, "cuda")
    assert replica_devices(2, "cpu") == ["cpu", "cpu"]
