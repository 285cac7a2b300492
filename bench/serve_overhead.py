"""The HTTP serving path's own cost (issue 12), on the CPU: the real engine (scheduler, detokenizer, trackers)
and the real server, with the model step replaced by a fixed sleep that stands for the GPU's time (a sleep
releases the GIL as a CUDA sync does), so whatever slows the served run below the offline one is the server's.

  python bench/serve_overhead.py --step-ms 25 --concurrency 128 --output-len 256  # both runs, side by side
  python bench/serve_overhead.py --profile out.txt   # also py-spy's per-thread top functions of the served run

The offline run steps the same engine with the same requests in a plain loop. cpu_us_per_token is the
process's CPU time (all its threads, the load excluded) per output token: less noisy than throughput on a
shared machine, and the served minus the offline figure is what the HTTP path costs per token. The load comes
from a child process (eval/bench_serve.py's stdlib client, /v1/completions streaming, ignore_eos) so that the
clients' Python does not share the server's GIL. On a shared machine the numbers are relative: compare runs
made together.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
import uvicorn

from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.kv_cache import bytes_per_block
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampler import HostSample
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.eval.synthetic import load_synthetic
from qwen_awq.ports import free_port
from qwen_awq.server.app import create_app
from qwen_awq.tokenizer import QwenTokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 你好，世界。 Numbers 12345 and emoji 😀, then some "
        "more ordinary English prose so that the detokenizer sees words, spaces and multi-byte characters. ")


@dataclass
class FakeSample:
    host: HostSample

    def to_host(self) -> HostSample:
        return self.host

    def start_copy(self) -> FakeSample:  # SampleOutput's contract: the copy is "complete" at once
        return self

    def result(self) -> HostSample:
        return self.host


class FakeRunner:
    """ModelRunner.step's contract without a model: sleeps `step_s` in `releases` pieces, then samples each row's
    next token of a fixed text (so detokenization does real work), counting steps. Its step blocks for the
    whole stand-in time, so nothing can overlap it (no device-side input ids). It samples no logits either, so
    the sampler's host work (the penalties' masks: bench/results/gpu_final_H200_2026-12-03c.md) is not in it;
    bench/gpu_serve_profile.sh profiles the real server on a GPU."""

    device_input_ids = False

    def __init__(self, ids: list[int], step_s: float, releases: int) -> None:
        self.ids, self.step_s, self.releases, self.steps = ids, step_s, releases, 0
        self.first = self.last = 0.0  # perf_counter of the first and the last step

    def steps_per_s(self) -> float:
        return (self.steps - 1) / (self.last - self.first)

    def step(self, batch) -> FakeSample | None:
        for _ in range(self.releases):  # each torch call of a real step drops and retakes the GIL
            time.sleep(self.step_s / self.releases)
        self.steps += 1
        self.last = time.perf_counter()
        self.first = self.first or self.last
        if not batch.sampling:
            return None
        tokens = [self.ids[len(e.seq.output_token_ids) % len(self.ids)] for e in batch.sampling]
        return FakeSample(HostSample(tokens, [-0.5] * len(tokens), None, None))


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, FakeRunner]:
    from tests.assets import qwen_vocab_path

    tokenizer = QwenTokenizer(qwen_vocab_path())
    model = load_synthetic("qwen-tiny", quant=False, dtype=torch.float32, device="cpu", layers=1)
    blocks = args.concurrency * (-(-(args.input_len + args.output_len) // 16) + 1)
    per_block = bytes_per_block(model.cfg, 16, model.dtype, False)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=args.concurrency, kv_cache_memory=blocks * per_block,
                                                      max_num_batched_tokens=max(2048, args.input_len * 8),
                                                      enable_prefix_caching=False))
    fake = FakeRunner(tokenizer.encode(TEXT * 4), args.step_ms / 1e3, args.gil_releases)
    engine.runner = fake
    return engine, fake


def prompts(args: argparse.Namespace) -> list[list[int]]:
    return [[(1000 + 7 * i + j) % 50000 for j in range(args.input_len)] for i in range(args.requests)]


def offline(args: argparse.Namespace) -> dict[str, float]:
    engine, fake = build_engine(args)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts(args)):
        engine.add_request(f"r{i}", ids, params)
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    while engine.has_unfinished():
        tokens += sum(len(o.delta_token_ids) for out in engine.step() for o in out.outputs)
    took = time.perf_counter() - start
    return {"output_tok_s": tokens / took, "steps_s": fake.steps_per_s(), "duration_s": took,
            "cpu_us_per_token": (time.process_time() - cpu) / tokens * 1e6}


def served(args: argparse.Namespace) -> dict[str, float]:
    engine, fake = build_engine(args)
    app = create_app(AsyncEngine(engine), "bench")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    spy = None
    if args.profile:  # py-spy samples this process (all threads) while the load runs
        spy = subprocess.Popen(["py-spy", "record", "-p", str(os.getpid()), "-f", "raw", "-o", args.profile + ".raw",
                                "-r", "200", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    start, cpu = time.perf_counter(), time.process_time()
    child = subprocess.run([sys.executable, __file__, "--client", f"http://127.0.0.1:{port}",
                            *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                              ("concurrency", "input_len", "output_len", "requests", "route"))],
                           capture_output=True, text=True, check=True)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT, not SIGTERM
        spy.wait()
    server.should_exit = True
    thread.join()
    client = json.loads(child.stdout.strip().splitlines()[-1])
    return {"output_tok_s": client["output_throughput"], "steps_s": fake.steps_per_s(),
            "p99_itl_ms": client["p99_itl_ms"], "median_itl_ms": client["median_itl_ms"],
            "failed": client["failed"], "duration_s": took,
            "cpu_us_per_token": cpu / (client["output_throughput"] * client["duration_s"]) * 1e6}


async def tgi_request(url: str, inputs: str, output_len: int):
    """One /generate_stream request timed as bench_serve times a completion (one token per event)."""
    from qwen_awq.eval.bench_serve import Result
    from qwen_awq.eval.http_client import request_lines

    start = last = time.perf_counter()
    result = Result(ok=False)
    payload = {"inputs": inputs, "parameters": {"max_new_tokens": output_len}}
    async for line in request_lines(url, "POST", "/generate_stream", payload):
        if line.startswith("data:"):
            now = time.perf_counter()
            if result.output_tokens:
                result.itl.append(now - last)
            else:
                result.ttft = now - start
            result.output_tokens, last = result.output_tokens + 1, now
            result.ok = json.loads(line[len("data:"):]).get("generated_text") is not None
    result.latency = time.perf_counter() - start
    return result


async def tgi_level(args: argparse.Namespace) -> dict[str, float]:
    from qwen_awq.eval.bench_serve import summarize

    gate = asyncio.Semaphore(args.concurrency)

    async def limited(i: int):
        async with gate:  # ~input_len tokens of text, distinct per request
            return await tgi_request(args.client, f"{i} " + "fox " * (args.input_len - 1), args.output_len)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
    return summarize(results, time.perf_counter() - start)


def client(args: argparse.Namespace) -> None:
    from qwen_awq.eval.bench_serve import run_level

    if args.route == "tgi":
        result = asyncio.run(tgi_level(args))
    else:
        result = asyncio.run(run_level(args.client, "bench", {}, prompts(args), args.output_len, args.concurrency))
    print(json.dumps(result))


def summarize_profile(path: str, top: int = 25) -> str:
    """py-spy's raw samples (one "frame;frame;... count" line per stack) per thread, by the leaf function
    (self time) and by every function on the stack (inclusive), as shares of all the thread's active samples."""
    threads: dict[str, tuple[Counter, Counter]] = {}
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames = [f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0] for f in stack.split(";")]
        name = "engine" if any("_loop " in f and "async_engine" in f for f in frames) else \
            "event loop" if any("uvicorn/server.py" in f for f in frames) else "other"
        leaf, inclusive = threads.setdefault(name, (Counter(), Counter()))
        leaf[frames[-1]] += int(count)
        for f in set(frames):
            inclusive[f] += int(count)
    lines = []
    for name, (leaf, inclusive) in threads.items():
        total = sum(leaf.values())
        lines.append(f"== {name}: {total} active samples")
        for title, counter in (("self", leaf), ("inclusive", inclusive)):
            lines += [f"  {title:9s} {c / total:6.1%}  {f}" for f, c in counter.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, default=25.0, help="the stand-in GPU time of one step")
    p.add_argument("--gil-releases", type=int, default=1, help="pieces the step's sleep is cut into: a GPU step "
                   "drops the GIL in every torch call, and retaking it waits while the event loop is busy")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--requests", type=int, default=0, help="default: the concurrency (one wave)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--route", choices=["openai", "tgi"], default="openai", help="the streaming route the load uses")
    p.add_argument("--profile", default="", help="write py-spy's raw samples of the served run to PROFILE.raw")
    p.add_argument("--switch-interval-ms", type=float, default=0.0, help="sys.setswitchinterval for both runs "
                   "(0: Python's default, 5 ms)")
    p.add_argument("--client", default="", help=argparse.SUPPRESS)  # the load process's server url
    args = p.parse_args()
    args.requests = args.requests or args.concurrency
    if args.client:
        return client(args)
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    off, srv = offline(args), served(args)
    print(json.dumps({"offline": off, "served": srv, "ratio": srv["output_tok_s"] / off["output_tok_s"]}, indent=1))
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(summarize_profile(args.profile + ".raw") + "\n")


if __name__ == "__main__":
    main()
