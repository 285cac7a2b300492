"""Where an engine decode step's time goes on the GPU (issues 10 and 12): host phases, GPU busy time, kernels.

For each (weights, batch): a sized engine with CUDA graphs (eval/bench_engine.sized_engine), a warm-up, then
torch.profiler over the decode steps of one run. Per step: wall time (host clock), GPU busy time (device
activities summed), the host phases' CPU time (record_function around the engine's own methods: no extra syncs),
and the kernel table (device time per step by kernel name). The engine is unchanged; the phases are wrapped only
in this process.

  python3 bench/gpu_step_profile.py --out DIR [--batch 1 32] [--quant awq none] [--tokens 64] [--unfused]
      [--also QWEN_AWQ_PDL=0 ...] [--also-config async_scheduling=false ...]

With async_scheduling (the default) a decode step's host work overlaps the previous step's GPU run: "D2H wait
(result)" is then where the host waits for the GPU; `--quant awq --also-config async_scheduling=false` gives the A/B.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from qwen_awq.engine import llm_engine, model_runner, sampler
from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.scheduler import Scheduler
from qwen_awq.eval.bench_engine import free_device_memory, run_requests, sized_engine
from qwen_awq.eval.synthetic import load_synthetic
from qwen_awq.quant.linear import AWQLinear

PHASES = [  # (owner, attribute, label): the host work of one engine step, in order
    (Scheduler, "schedule", "schedule"),
    (model_runner.ModelRunner, "step_input", "build StepInput (+H2D) / pack decode"),
    (DecodeGraphs, "run", "graph input H2D + replay"),
    (sampler.SamplingBatch, "build", "SamplingBatch.build"),
    (model_runner, "sample", "sample()"),
    (sampler.SampleOutput, "start_copy", "D2H enqueue (start_copy)"),
    (llm_engine.LLMEngine, "_launch_next", "launch the next step (overlapped)"),
    (sampler.PendingSample, "result", "D2H wait (result)"),
    (Scheduler, "update", "scheduler.update"),
    (llm_engine.LLMEngine, "_process", "outputs (_process)"),
    (llm_engine.LLMEngine, "step", "engine.step"),
]


@contextlib.contextmanager
def tagged_phases():
    saved = []
    for owner, name, label in PHASES:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        raw = original.__func__ if isinstance(original, classmethod) else original

        def wrapped(*a, _f=raw, _label=label, **k):
            with record_function("phase::" + _label):
                return _f(*a, **k)
        setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)
        saved.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def profile_run(model, batch: int, tokens: int, prompt_len: int = 1, config: dict | None = None) -> dict:
    """Every step of one run of `batch` prompts of prompt_len ids (1: decode steps only; longer: the prefill
    and mixed steps too); `config`: EngineConfig fields over the benchmark's."""
    engine = sized_engine(model, None, batch, prompt_len + tokens + 8, **(config or {}))
    gen = torch.Generator().manual_seed(batch)
    prompts = [[100 + i] + torch.randint(1000, 100000, (prompt_len - 1,), generator=gen).tolist()
               for i in range(batch)]
    run_requests(engine, prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    plain = run_requests(engine, prompts, params)  # unprofiled reference timing
    overlapped = engine.num_overlapped_steps
    with tagged_phases(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed = run_requests(engine, prompts, params)
    steps = timed["steps"]
    phases, kernels, busy = defaultdict(float), defaultdict(lambda: [0.0, 0]), 0.0
    for evt in prof.events():
        if evt.name.startswith("phase::"):
            phases[evt.name[7:]] += evt.cpu_time_total
        elif evt.device_type == torch.autograd.DeviceType.CUDA:
            dur = evt.time_range.elapsed_us()
            busy += dur
            kernels[evt.name][0] += dur
            kernels[evt.name][1] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    result = {
        "batch": batch, "tokens": tokens, "steps": steps,
        "unprofiled_ms_per_step": 1e3 * plain["seconds"] / plain["steps"],
        "unprofiled_tok_per_s": plain["tokens"] / plain["seconds"],
        "profiled_ms_per_step": 1e3 * timed["seconds"] / steps,
        "overlapped_steps": engine.num_overlapped_steps - overlapped,  # of the profiled run's steps
        "gpu_busy_ms_per_step": busy / 1e3 / steps,
        "host_phase_us_per_step": {k: v / steps for k, v in phases.items()},
        "kernels_per_step": sum(c for _, c in kernels.values()) / steps,
        "top_kernels_us_per_step": [{"name": n[:120], "us": t / steps, "calls": c / steps} for n, (t, c) in top],
    }
    del engine
    free_device_memory()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--quant", nargs="+", default=["awq", "none"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1, help="prompt ids per sequence (> 1: prefill steps too)")
    ap.add_argument("--model", default="qwen-7b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--unfused", action="store_true", help="also AWQ with QWEN_AWQ_FUSED=0")
    ap.add_argument("--also", nargs="*", default=[], metavar="NAME=VALUE",
                    help="also AWQ with this environment variable set (e.g. QWEN_AWQ_PDL=0)")
    ap.add_argument("--also-config", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="also AWQ with this EngineConfig field (a JSON value, e.g. async_scheduling=false)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    variants = [(q, {}, {}) for q in args.quant] + ([("awq", {"QWEN_AWQ_FUSED": "0"}, {})] if args.unfused else [])
    variants += [("awq", dict([kv.split("=", 1)]), {}) for kv in args.also]
    variants += [("awq", {}, {kv.split("=", 1)[0]: json.loads(kv.split("=", 1)[1])}) for kv in args.also_config]
    saved = dict(os.environ)
    for quant, env, config in variants:
        os.environ.clear()
        os.environ.update(saved | env)
        fused = os.environ.get("QWEN_AWQ_FUSED", "1")
        t0 = time.time()
        model = load_synthetic(args.model, quant=quant == "awq", device=args.device)
        awq = [m for m in model.modules() if isinstance(m, AWQLinear)]
        print(f"[{quant}] AWQ layers {len(awq)}, repacked for the W4A16 kernels {sum(m.repacked for m in awq)}")
        for b in args.batch:
            row = profile_run(model, b, args.tokens, args.prompt_len, config) | {
                "quant": quant, "fused": fused, "env": env, "config": config, "prompt_len": args.prompt_len}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels_us_per_step"}), flush=True)
            for k in row["top_kernels_us_per_step"][:25]:
                print(f"   {k['us']:9.1f} us  x{k['calls']:6.1f}  {k['name']}", flush=True)
        del model
        free_device_memory()
        print(f"[{quant} {env or ''} {config or ''}] {time.time() - t0:.0f}s", flush=True)
        (out / "step_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
