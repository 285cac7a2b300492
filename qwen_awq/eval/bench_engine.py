"""What the offline benchmarks (bench decode, bench throughput) share: an LLMEngine whose KV cache is sized to the
run (so peak memory means something), random prompts, and a timed loop of engine steps that counts tokens. Every
run ignores EOS, so each request produces exactly the requested number of tokens.
"""
from __future__ import annotations

import gc
import itertools
import time
from typing import Any

import torch

from qwen_awq.engine.kv_cache import bytes_per_block
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.eval.peers import sync

_request_ids = itertools.count()


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=g).tolist()


def kv_bytes_for(model: Any, max_num_seqs: int, max_len: int, block_size: int = EngineConfig.block_size,
                 int8: bool = False) -> int:
    """The KV-cache bytes that max_num_seqs sequences of max_len tokens can fill (whole blocks)."""
    per_block = bytes_per_block(model.cfg, block_size, model.dtype, int8)
    return -(-max_len // block_size) * max_num_seqs * per_block


def sized_engine(model: Any, tokenizer: Any, max_num_seqs: int, max_len: int, **config: Any) -> LLMEngine:
    """An engine whose KV cache holds exactly max_num_seqs sequences of max_len tokens (plus the graphs' scratch
    block), not a share of the free GPU memory; no prefix caching (the benchmarks' prompts must not share work)."""
    int8 = config.get("kv_cache_dtype") == "int8"
    settings = {"max_num_seqs": max_num_seqs, "max_model_len": max_len, "enable_prefix_caching": False,
                "kv_cache_memory": kv_bytes_for(model, max_num_seqs, max_len, int8=int8)} | config
    from qwen_awq.parallel.launch import engine_for  # a tensor-parallel shard gets an engine on every rank

    return engine_for(model, tokenizer, EngineConfig(**settings))


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """Add every prompt, step until all finish: wall seconds (device synchronized), output tokens, steps, and
    where the time went: seconds until every request holds its first token (the prefill phase, host-timed when
    that step's outputs arrive), the steps up to then, and the steps launched while the previous one ran."""
    ids = [f"bench-{next(_request_ids)}" for _ in prompts]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    device = engine.model.device
    sync(device)
    started, overlapped = set(), engine.num_overlapped_steps
    start, tokens, steps, first_all, first_steps = time.perf_counter(), 0, 0, None, 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            started.add(out.request_id)
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        if first_all is None and len(started) == len(ids):
            first_all, first_steps = time.perf_counter() - start, steps
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "steps": steps, "first_token_all_s": first_all or seconds,
            "first_token_steps": first_steps or steps, "overlapped_steps": engine.num_overlapped_steps - overlapped}


def weights_label(model: Any) -> str:
    """How a row names the model's weights: "AWQ W4 g128, float16" or the plain dtype."""
    dtype = str(model.dtype).removeprefix("torch.")
    return f"AWQ W4 g{model.cfg.quant.group_size}, {dtype}" if model.cfg.quant else dtype


def free_device_memory() -> None:
    """Drop what finished runs left (engines hold CUDA graphs and pools through reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
