"""The measured process of `bench cold-start`: import, load a folder, build the engine (KV pool, CUDA graphs), first
token, each stage timed; prints one JSON line. Only the standard library is imported before the clock starts.

    python3 -m qwen_awq.eval.cold_start_child FOLDER --device D --spawned-at UNIX_TIME [--engine JSON]
"""
from __future__ import annotations

import argparse
import json
import time

MARKER = "COLD_START_JSON "  # the parent finds the result line by this prefix
PROMPT = "Hello"


def _timed(stages: dict[str, float], name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    stages[name] = time.perf_counter() - start
    return value


def _imports():
    import torch

    import qwen_awq.engine.cuda_graph as cuda_graph
    import qwen_awq.loading as loading
    import qwen_awq.models.loader as loader
    from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
    from qwen_awq.engine.sampling_params import SamplingParams
    from qwen_awq.eval.bench_report import StageTimer
    from qwen_awq.models.decoder import Decoder

    return torch, cuda_graph, loading, loader, Decoder, EngineConfig, LLMEngine, SamplingParams, StageTimer


def _first_token(engine, SamplingParams, tokenizer, torch) -> int:
    ids = tokenizer.encode(PROMPT) if tokenizer is not None else [100]
    engine.add_request("cold-start", ids, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while True:
        for out in engine.step():
            if out.outputs[0].token_ids:
                if engine.model.device.type == "cuda":
                    torch.cuda.synchronize()
                return out.outputs[0].token_ids[0]


def main(argv: list[str] | None = None) -> None:
    entered = time.time()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--spawned-at", type=float, required=True, help="the parent's time.time() at spawn")
    p.add_argument("--engine", default="{}", help="EngineConfig fields as JSON")
    args = p.parse_args(argv)
    stages = {"interpreter start": entered - args.spawned_at}
    torch, cuda_graph, loading, loader, Decoder, EngineConfig, LLMEngine, SamplingParams, StageTimer = _timed(
        stages, "import torch + qwen_awq", _imports)
    if args.device != "cpu" and torch.cuda.is_available():
        _timed(stages, "CUDA init", lambda: torch.zeros(1, device="cuda").sum().item())
    timer = StageTimer()
    targets = {"load: build on the meta device": (Decoder, "__init__"),
               "load: read + copy weights": (loader, "load_weights"), "load: post-load hooks": (loader, "after_load"),
               "load: tokenizer": (loading, "load_tokenizer"),
               "engine: capture graphs": (cuda_graph.DecodeGraphs, "capture")}
    with timer.timing(targets):
        model, tokenizer = _timed(stages, "load (total)", loading.load, args.folder, device=args.device)
        engine = _timed(stages, "engine (total)", LLMEngine, model, tokenizer, EngineConfig(**json.loads(args.engine)))
        token = _timed(stages, "first token", _first_token, engine, SamplingParams, tokenizer, torch)
    stages |= timer.totals()
    graphs = engine.runner.graphs
    result = {"stages_s": stages, "total_s": time.time() - args.spawned_at, "first_token_id": token,
              "graphs_captured": 0 if graphs is None else len(graphs.graphs), "kv_report": engine.kv_report,
              "device": str(model.device), "timer_missing": timer.missing,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if model.device.type == "cuda" else None}
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
