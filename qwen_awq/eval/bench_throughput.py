"""`qwen-awq bench throughput`: offline throughput of the engine (vLLM benchmark_throughput-style: all requests
at once, random prompts of exact length, EOS ignored) against HF transformers' batched fp16 `generate` in the same
process (--peers) and the step byte floor (eval/peers.decode_bytes).

Our engine: max_num_seqs = --num-prompts unless given (one wave), KV cache sized to the run, sampling at
temperature 1 (vLLM's benchmark) or --greedy. HF: greedy, all prompts in one `generate` call, or in chunks when
--hf-chunk says so or it runs out of memory (the result says which).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError
from qwen_awq.eval import peers
from qwen_awq.eval.bench_engine import free_device_memory, random_prompts, run_requests, sized_engine, weights_label
from qwen_awq.eval.bench_report import add_output_args, checkpoint, environment, write_outputs
from qwen_awq.eval.bench_tables import throughput_markdown
from qwen_awq.eval.synthetic import add_parallel_args, add_synthetic_args, model_from_args

WARMUP_SEED = 1_000_003  # the warm-up prompts differ from the timed ones
VOCAB_MARGIN = 1000  # random prompt ids stay below the special tokens at the top of the vocabulary


def engine_throughput(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One row: our engine on --num-prompts random prompts."""
    max_seqs = args.max_num_seqs or args.num_prompts
    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    extra["kv_cache_dtype"] = args.kv_cache_dtype
    peers.reset_peak(model.device)
    engine = sized_engine(model, tokenizer, max_seqs, args.input_len + args.output_len, **extra)
    vocab = (tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size) - VOCAB_MARGIN
    # the timed run's schedule through its prefill phase: every prefill / mixed-step shape compiles its kernels here
    warm = random_prompts(args.num_prompts, args.input_len, vocab, args.seed + WARMUP_SEED)
    tokens = warm_up_tokens(args.num_prompts, args.input_len, args.output_len, engine.config.max_num_batched_tokens)
    run_requests(engine, warm, SamplingParams(max_tokens=tokens, ignore_eos=True))
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    params = SamplingParams(temperature=0.0 if args.greedy else 1.0, top_p=1.0, max_tokens=args.output_len,
                            ignore_eos=True)
    r = run_requests(engine, prompts, params)
    if r["tokens"] != args.num_prompts * args.output_len:
        raise RuntimeError(f"asked for {args.num_prompts} x {args.output_len} tokens, got {r['tokens']}")
    del engine
    free_device_memory()
    dtype = str(model.dtype).removeprefix("torch.")
    return {"system": "qwen-awq LLMEngine", "quant": "awq" if model.cfg.quant else "plain", "dtype": dtype,
            "weights": weights_label(model) + (", int8 KV" if args.kv_cache_dtype == "int8" else ""),
            "kv_cache_dtype": args.kv_cache_dtype, "max_num_seqs": max_seqs,
            "elapsed_s": r["seconds"],
            "tokens": r["tokens"], "steps": r["steps"], "out_tok_per_s": r["tokens"] / r["seconds"],
            "requests_per_s": args.num_prompts / r["seconds"],
            "total_tok_per_s": (r["tokens"] + args.num_prompts * args.input_len) / r["seconds"],
            "peak_gpu_bytes": peers.peak_bytes(model.device),
            # where the time went: until every request holds a token (prefill-bound), then decode steps alone
            "first_token_all_s": r["first_token_all_s"], "first_token_steps": r["first_token_steps"],
            "decode_s_per_step": (r["seconds"] - r["first_token_all_s"]) / max(r["steps"] - r["first_token_steps"], 1),
            "overlapped_steps": r["overlapped_steps"]}


def warm_up_tokens(num_prompts: int, input_len: int, output_len: int, step_tokens: int) -> int:
    """Output tokens per warm-up request: no request may finish before the last prompt's prefill ends, or the
    warm-up's mixed prefill + decode steps carry fewer decodes than the timed run's and some of their kernel
    variants first compile inside the timed run (on an H200 with an empty Triton cache the AWQ row's prefill phase
    took 2.12 s instead of 1.65: bench/results/gpu_final_H200_2026-12-04h.md). The prefill phase lasts about
    num_prompts * input_len / step_tokens steps, more with the decodes sharing them: twice that, plus one."""
    prefill_steps = -(-num_prompts * input_len // step_tokens)
    return max(2, min(output_len, 2 * prefill_steps + 1))


def hf_row(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    import dataclasses

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = peers.hf_model(dataclasses.replace(cfg, quant=None), device, dtype, args.input_len + args.output_len)
    r = peers.hf_time(model, args.num_prompts, args.input_len, args.output_len, args.hf_chunk, args.seed)
    del model
    free_device_memory()
    if r["tokens"] != args.num_prompts * args.output_len:
        raise RuntimeError(f"HF made {r['tokens']} tokens, not {args.num_prompts} x {args.output_len}")
    note = "" if r["chunk"] == args.num_prompts else f"in chunks of {r['chunk']} prompts"
    return r | {"system": "HF transformers generate (greedy)", "quant": "plain",
                "weights": str(dtype).removeprefix("torch."),
                "requests_per_s": args.num_prompts / r["elapsed_s"], "note": note}


def add_floors(result: dict[str, Any], cfg: Any, args: argparse.Namespace) -> None:
    bw, hf = result.get("copy_bytes_per_s"), next((r for r in result["rows"] if r["system"].startswith("HF")), None)
    for r in result["rows"]:
        int4 = r["quant"] == "awq"
        r["floor_bytes"] = peers.decode_bytes(cfg, int4, args.num_prompts, args.input_len, args.output_len,
                                              r.get("max_num_seqs"), r.get("kv_cache_dtype") == "int8")
        r["floor_tok_per_s"] = None if bw is None else args.num_prompts * args.output_len * bw / r["floor_bytes"]
        r["pct_floor"] = None if bw is None else 100 * r["out_tok_per_s"] / r["floor_tok_per_s"]
        if hf is not None and r is not hf:
            r["vs_hf"] = r["out_tok_per_s"] / hf["out_tok_per_s"]


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        raise ConfigError("--num-prompts, --input-len and --output-len must be >= 1")
    settings = {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "max_num_seqs",
                                              "max_num_batched_tokens", "kv_cache_dtype", "greedy", "hf_chunk",
                                              "seed")}
    result: dict[str, Any] = {"env": environment(), "settings": settings, "rows": []}
    if torch.cuda.is_available():
        result["copy_bytes_per_s"] = peers.copy_bandwidth()
    for quant in (args.quant if args.synthetic else [None]):
        model, tokenizer = model_from_args(args, quant)
        result["rows"].append(engine_throughput(model, tokenizer, args))
        print(f"  {result['rows'][-1]['quant']}: {result['rows'][-1]['out_tok_per_s']:.0f} out tok/s", flush=True)
        cfg = model.cfg
        del model
        free_device_memory()
        checkpoint(result, args.json_out)
    if args.peers:
        result["rows"].append(hf_row(args, cfg))
    add_floors(result, cfg, args)
    write_outputs(result, throughput_markdown(result), args.json_out, args.md_out)
    return 0


def register_throughput(bench_sub: Any) -> None:
    from qwen_awq.cli_args import add_model_args

    t = bench_sub.add_parser("throughput", help="offline throughput over random prompts (vLLM-style), HF peer",
                             description=__doc__.split("\n\n")[0])
    add_model_args(t)
    add_synthetic_args(t, quant="many")
    add_parallel_args(t)
    t.add_argument("--num-prompts", type=int, default=128, help="number of requests (default 128)")
    t.add_argument("--input-len", type=int, default=512, help="prompt tokens per request (default 512)")
    t.add_argument("--output-len", type=int, default=256, help="generated tokens per request (default 256)")
    t.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (default: --num-prompts)")
    t.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine token budget per step (default: the engine's)")
    t.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="KV cache storage: the model dtype (auto, default) or Qwen's int8 scheme; HF keeps fp16")
    t.add_argument("--greedy", action="store_true", help="greedy sampling (default: temperature 1, as vLLM's)")
    t.add_argument("--peers", action="store_true", help="also time HF transformers' batched generate")
    t.add_argument("--hf-chunk", type=int, default=None, help="prompts per HF generate call (default: all)")
    add_output_args(t)
    t.set_defaults(func=cmd_bench_throughput)
