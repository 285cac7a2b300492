"""GPU correctness gate of issue 16 (bench/gpu_tp.sh runs it first): TP=2 against TP=1 greedy tokens through the
engine, CUDA graphs (with NCCL all-reduces captured) on. A tiny plain fp32 synthetic Qwen must match exactly; the
7B AWQ model (fp16, the W4A16 kernels on sharded shapes) must agree on most tokens (random weights: fp16 near-ties
may flip a few). Prints and writes a JSON summary; exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEAD_WITHIN_S = 30.0  # a dead worker must fail the engine well before the 120 s group timeout
AGREE_7B = 0.5  # a wrong shard layout agrees on ~0% of tokens; fp16 reduction order flips only near-ties


def greedy(engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from qwen_awq.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"c{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        done |= {o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished}
    return [done[f"c{i}"] for i in range(len(prompts))]


def compare(folder: Path, dtype: str, device: str, prompts: list[list[int]], tokens: int) -> dict:
    import gc

    from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
    from qwen_awq.models.loader import load_model
    from qwen_awq.parallel.launch import engine_for, start_tensor_parallel

    config = EngineConfig(max_num_seqs=len(prompts), max_model_len=256, kv_cache_memory=1 << 30)
    t0 = time.perf_counter()
    ref = greedy(LLMEngine(load_model(folder, dtype=dtype, device=device), None, config), prompts, tokens)
    gc.collect()
    model, group = start_tensor_parallel(folder, dtype, device, 2)
    try:
        out = greedy(engine_for(model, None, config), prompts, tokens)
    finally:
        group.close()
    same = sum(a == b for r, o in zip(ref, out, strict=True) for a, b in zip(r, o, strict=True))
    total = len(prompts) * tokens
    return {"folder": str(folder), "dtype": dtype, "tokens": total, "agree": same / total,
            "first_ref": ref[0][:8], "first_tp2": out[0][:8], "seconds": time.perf_counter() - t0}


def dead_worker(folder: Path, device: str) -> dict:
    """Kill the worker mid-generation: the engine must raise ParallelError within DEAD_WITHIN_S (no hang)."""
    import os
    import signal
    import threading

    from qwen_awq.engine.llm_engine import EngineConfig
    from qwen_awq.engine.sampling_params import SamplingParams
    from qwen_awq.errors import ParallelError
    from qwen_awq.parallel.launch import engine_for, start_tensor_parallel

    model, group = start_tensor_parallel(folder, "float32", device, 2)
    error, seconds = None, None
    try:
        engine = engine_for(model, None, EngineConfig(max_num_seqs=1, max_model_len=4096, kv_cache_memory=1 << 28))
        engine.add_request("long", [1, 2, 3], SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True))
        killed_at: list[float] = []
        threading.Timer(2.0, lambda: (os.kill(group.procs[0].pid, signal.SIGKILL),
                                      killed_at.append(time.perf_counter()))).start()
        try:
            while engine.has_unfinished():
                engine.step()
        except ParallelError as e:
            error = str(e)
            seconds = time.perf_counter() - killed_at[0] if killed_at else None
    finally:
        group.close()
    alive = [p.pid for p in group.procs if p.is_alive()]
    ok = error is not None and "exited" in error and seconds is not None and seconds < DEAD_WITHIN_S and not alive
    return {"error": error, "seconds_after_kill": seconds, "alive_after_close": alive, "ok": ok}


def main() -> int:
    import torch

    from qwen_awq.assets import cache_dir
    from qwen_awq.eval.synthetic import write_synthetic_folder

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (gloo, tiny model only)")
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(json.dumps({"error": f"needs 2 GPUs, found {torch.cuda.device_count()}"}))
        return 1
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(4)]
    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_synthetic_folder(Path(tmp) / "tiny", "qwen-tiny", quant=False, device=args.device)
        summary["tiny_fp32"] = compare(tiny, "float32", args.device, prompts, 16)
        summary["dead_worker"] = dead_worker(tiny, args.device)
    summary["tiny_fp32"]["ok"] = summary["tiny_fp32"]["agree"] == 1.0
    if not args.skip_7b and args.device == "cuda":
        big = cache_dir() / "synthetic" / "qwen-7b-awq-seed0"  # the folder `bench ... --tensor-parallel-size` uses
        if not (big / "config.json").exists():
            write_synthetic_folder(big, "qwen-7b", quant=True, seed=0, device="cuda")
        summary["qwen7b_awq_fp16"] = compare(big, "float16", "cuda", prompts, 16)
        summary["qwen7b_awq_fp16"]["ok"] = summary["qwen7b_awq_fp16"]["agree"] >= AGREE_7B
    ok = all(v["ok"] for v in summary.values())
    summary["ok"] = ok
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
