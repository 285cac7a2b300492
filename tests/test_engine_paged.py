"""The engine's paged attention path (fused rotary + KV write, paged decode and chunked-prefill attention) against
independent oracles: the dense full-recompute greedy loop, and a contiguous int8 cache for Qwen's int8 scheme.
Mixed steps (a prefill chunk beside decoding sequences), chunked prefill, prefix-cache hits, Qwen v1 and GQA Llama.
The last test runs the same engine with the Triton kernels themselves under TRITON_INTERPRET=1 (a subprocess:
the interpreter is chosen when kernels are decorated); `python tests/test_engine_paged.py DIR` prints JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from assets import DEVICE
from checkpoints import write_llama_checkpoint
from interpret import run_interpreted
from reference import dense_greedy, int8_cache_greedy

from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.models.loader import load_model

MAX_TOKENS = 8


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4 + 7 * i,), generator=g).tolist() for i in range(n)]


def run_staggered(engine: LLMEngine, prompts: list[list[int]], every: int = 2) -> list[list[int]]:
    """Request i arrives before step i * every, so later prompts prefill while earlier ones decode (mixed steps)."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    done, step, pending = {}, 0, list(enumerate(prompts))
    while pending or engine.has_unfinished():
        while pending and pending[0][0] * every <= step:
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return [done[f"r{i}"] for i in range(len(prompts))]


def _engine(model, **kw) -> LLMEngine:
    return LLMEngine(model, None, EngineConfig(**({"kv_cache_memory": 2**22, "max_model_len": 128,
                                                   "block_size": 4} | kw)))


def _all_free(engine: LLMEngine) -> bool:
    return engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _workload(vocab: int, seed: int) -> list[list[int]]:
    """Ragged prompts, two sharing a long prefix (a prefix-cache hit for the second)."""
    prompts = _prompts(4, vocab, seed)
    return prompts + [prompts[3] + [5, 6, 7]]


@pytest.fixture(scope="module", params=["qwen", "llama"])
def model(request, qwen_dir, llama_dir):
    return load_model(qwen_dir if request.param == "qwen" else llama_dir, dtype="float32", device=DEVICE)


@pytest.mark.parametrize("budget", [6, 2048])  # chunked prefill in 6-token steps, or whole prompts
def test_mixed_steps_equal_dense_greedy(model, budget):
    prompts = _workload(model.cfg.vocab_size, seed=1)
    engine = _engine(model, max_num_batched_tokens=budget)
    got = run_staggered(engine, prompts)
    assert got == [dense_greedy(model, p, MAX_TOKENS) for p in prompts]
    assert engine.block_manager.prefix_hit_tokens > 0
    assert _all_free(engine)


def test_int8_kv_equals_contiguous_int8_oracle(qwen_dir):
    """Whole prompts are one written chunk each (one range per head), decode tokens their own: Qwen's scheme.
    Distinct prompts and no prefix caching, so that every chunk is written by its own sequence."""
    model = load_model(qwen_dir, dtype="float32", device=DEVICE)
    prompts = _prompts(4, model.cfg.vocab_size, seed=2)
    engine = _engine(model, kv_cache_dtype="int8", enable_prefix_caching=False)
    got = run_staggered(engine, prompts)
    assert got == [int8_cache_greedy(model, p, MAX_TOKENS) for p in prompts]
    assert engine.pool.k.dtype == torch.uint8
    assert _all_free(engine)


def _interpreted(folder: str) -> dict:
    """In a TRITON_INTERPRET=1 process: the engine on an fp16 model whose paged references are disabled (so the
    Triton kernels must run), chunked and mixed steps, fp16 and int8 KV; dense greedy as the oracle for fp16."""
    from qwen_awq.kernels import paged_attention, paged_prefill, rotary_kv

    def refuse(*args, **kwargs):
        raise AssertionError("a paged reference ran instead of the Triton kernel")

    paged_attention.paged_attention_reference = paged_prefill.paged_attention_reference = refuse
    rotary_kv.rotary_kv_write_reference = refuse
    model = load_model(folder, dtype="float16", device="cpu")
    prompts = _workload(model.cfg.vocab_size, seed=3)[:3]
    got = run_staggered(_engine(model, max_num_batched_tokens=6), prompts)
    int8 = run_staggered(_engine(model, max_num_batched_tokens=6, kv_cache_dtype="int8"), prompts)
    return {"engine": got, "dense": [dense_greedy(model, p, MAX_TOKENS) for p in prompts], "int8": int8}


@pytest.fixture(scope="module")
def llama_d16_dir(tmp_path_factory) -> Path:
    """The tiny GQA Llama with head_dim 16 (4 heads, 2 kv heads): the kernels need a power-of-two head_dim >= 16."""
    folder = tmp_path_factory.mktemp("llama-d16")
    write_llama_checkpoint(folder, overrides={"num_attention_heads": 4, "num_key_value_heads": 2})
    return folder


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_triton_kernels_in_the_engine_under_the_interpreter(family, qwen_dir, llama_d16_dir):
    folder = qwen_dir if family == "qwen" else llama_d16_dir
    result = run_interpreted(__file__, folder)
    assert result["engine"] == result["dense"]
    assert all(len(t) == MAX_TOKENS for t in result["int8"])


if __name__ == "__main__":
    import triton

    if not triton.knobs.runtime.interpret:
        raise SystemExit("run with TRITON_INTERPRET=1")
    print(json.dumps(_interpreted(sys.argv[1])))
