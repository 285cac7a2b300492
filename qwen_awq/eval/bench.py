"""Offline benchmarks: `bench throughput` (vLLM benchmark_throughput-style) and `bench decode` (batch-1 tok/s).

Both ignore EOS so every request produces exactly the requested number of tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from qwen_awq.engine.sampling_params import SamplingParams


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_throughput(llm: Any, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    prompts = random_prompts(num_prompts, input_len, llm.tokenizer.vocab_size - 1000, seed)
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=seed)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    _sync(llm.model.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    _sync(llm.model.device)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
            "elapsed_s": elapsed, "requests_per_s": num_prompts / elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": (generated + num_prompts * input_len) / elapsed}


def bench_decode(model: Any, tokenizer: Any, new_tokens: int, runs: int) -> dict:
    """Batch-1 decode speed on the model's own engine (what chat and generate use: paged KV cache, CUDA graphs
    on a GPU): 1-token prompt, exactly `new_tokens` tokens."""
    from qwen_awq.generation import TextStream, model_driver

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    TextStream(model, tokenizer, [1], SamplingParams(max_tokens=4, ignore_eos=True)).run()  # warm-up
    times = []
    for _ in range(runs):
        _sync(model.device)
        start = time.perf_counter()
        out = TextStream(model, tokenizer, [1], params).run()
        _sync(model.device)
        times.append(time.perf_counter() - start)
        assert len(out.token_ids) == new_tokens
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None
    graphs = model_driver(model, tokenizer).engine.runner.graphs
    return {"new_tokens": new_tokens, "runs": runs, "median_s": median, "tokens_per_s": new_tokens / median,
            "peak_gpu_memory_bytes": peak, "device": str(model.device), "dtype": str(model.dtype),
            "cuda_graph_replays": graphs.replays if graphs is not None else 0}


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from qwen_awq.cli_args import config_kwargs
    from qwen_awq.engine.llm import LLM
    from qwen_awq.engine.llm_engine import EngineConfig

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.input_len + args.output_len,
              **config_kwargs(EngineConfig, args))
    result = bench_throughput(llm, args.num_prompts, args.input_len, args.output_len, args.seed)
    print(json.dumps(result) if args.json else
          f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.2f} total "
          f"tokens/s, {result['output_tokens_per_s']:.2f} output tokens/s")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from qwen_awq.loading import load

    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    result = bench_decode(model, tok, args.new_tokens, args.runs)
    print(json.dumps(result) if args.json else
          f"Decode: {result['tokens_per_s']:.2f} tokens/s (median of {args.runs}, {args.new_tokens} new tokens)")
    return 0


def register_bench(bench_sub: Any) -> None:
    from qwen_awq.cli_args import add_config_args, add_model_args
    from qwen_awq.engine.llm_engine import EngineConfig

    t = bench_sub.add_parser("throughput", help="offline throughput over random prompts (vLLM-style)")
    add_model_args(t)
    t.add_argument("--num-prompts", type=int, default=32, help="number of requests (default 32)")
    t.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    t.add_argument("--output-len", type=int, default=128, help="generated tokens per request (default 128)")
    add_config_args(t, EngineConfig, only=("max_num_seqs", "kv_cache_memory"))
    t.add_argument("--seed", type=int, default=0, help="seed for prompts and sampling")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_bench_throughput)
    d = bench_sub.add_parser("decode", help="batch-1 decode tokens/s (1-token prompt, EOS ignored)")
    add_model_args(d)
    d.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per run (default 256)")
    d.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default 3)")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.set_defaults(func=cmd_bench_decode)
