"""`qwen-awq bench serve`: load a running server's /v1/completions with streaming requests (ignore_eos, exact
input and output lengths) at several concurrencies; report vLLM benchmark_serving's metrics. With `--soak
DURATION`, a soak test instead (eval/soak.py): a fixed request rate with random disconnects and cancels.

Metrics: request and output-token throughput; TTFT, TPOT = (latency - TTFT) / (output tokens - 1), ITL (gaps
between streamed chunks) and end-to-end latency, each as mean, median and p99. The HTTP client is a small
stdlib asyncio one, so the benchmark needs nothing beyond the package.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from qwen_awq.eval.http_client import WORDS, HTTPError, request_json, request_lines


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(url: str, payload: dict[str, Any], headers: dict[str, str]) -> Result:
    start = last = time.perf_counter()
    result = Result(ok=False)
    try:
        async for line in request_lines(url, "POST", "/v1/completions", payload, headers):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise HTTPError(200, json.dumps(event["error"]))
            if event.get("usage"):
                result.output_tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency, result.ok = time.perf_counter() - start, True
    except (OSError, HTTPError, ValueError, asyncio.IncompleteReadError) as e:
        result.error = str(e)
    return result


async def make_prompts(url: str, headers: dict[str, str], n: int, input_len: int, seed: int
                       ) -> list[list[int]]:
    """Token-id prompts of exactly input_len tokens, from random words so that they share no prefix."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(input_len))
        ids = (await request_json(url, "POST", "/tokenize", {"prompt": text}, headers))["tokens"]
        prompts.append((ids * (input_len // max(len(ids), 1) + 1))[:input_len])
    return prompts


def summarize(results: list[Result], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    out: dict[str, float] = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
                             "request_throughput": len(ok) / duration,
                             "output_throughput": sum(r.output_tokens for r in ok) / duration}
    series = {"ttft_ms": [r.ttft * 1e3 for r in ok],
              "tpot_ms": [(r.latency - r.ttft) / (r.output_tokens - 1) * 1e3
                          for r in ok if r.output_tokens > 1],
              "itl_ms": [g * 1e3 for r in ok for g in r.itl], "e2el_ms": [r.latency * 1e3 for r in ok]}
    for name, values in series.items():
        values = sorted(values) or [0.0]
        out[f"mean_{name}"] = statistics.fmean(values)
        out[f"median_{name}"] = statistics.median(values)
        out[f"p99_{name}"] = values[min(len(values) - 1, int(0.99 * len(values)))]
    return out


async def run_level(url: str, model: str, headers: dict[str, str], prompts: list[list[int]], output_len: int,
                    concurrency: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)

    async def limited(prompt: list[int]) -> Result:
        payload = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with gate:
            return await one_request(url, payload, headers)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    return summarize(results, time.perf_counter() - start) | {"concurrency": concurrency}


def print_level(s: dict[str, float]) -> None:
    print(f"============ concurrency {int(s['concurrency'])} ============")
    print(f"Successful requests: {int(s['completed'])}   failed: {int(s['failed'])}   "
          f"duration: {s['duration_s']:.2f} s")
    print(f"Request throughput (req/s): {s['request_throughput']:.2f}")
    print(f"Output token throughput (tok/s): {s['output_throughput']:.2f}")
    for name, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        print(f"{title:<12} (ms)  mean {s[f'mean_{name}_ms']:9.2f}  median {s[f'median_{name}_ms']:9.2f}  "
              f"p99 {s[f'p99_{name}_ms']:9.2f}")


async def bench(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every --concurrency level in turn, --num-prompts (default: --prompts-per-level x concurrency) requests
    each; the server's first model name."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    model = (await request_json(url, "GET", "/v1/models", None, headers))["data"][0]["id"]
    levels = []
    for concurrency in args.concurrency:
        n = args.num_prompts or args.prompts_per_level * concurrency
        prompts = await make_prompts(url, headers, n, args.input_len, args.seed + concurrency)
        levels.append(await run_level(url, model, headers, prompts, args.output_len, concurrency)
                      | {"num_prompts": n, "input_len": args.input_len, "output_len": args.output_len})
        print_level(levels[-1])
    return levels


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def cmd_bench_serve(args: argparse.Namespace) -> int:
    if args.soak is not None:
        from qwen_awq.eval.soak import cmd_soak

        return cmd_soak(args)
    levels = asyncio.run(bench(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(levels, f, indent=2)
    return 0 if all(level["failed"] == 0 for level in levels) else 1


def add_load_args(p: argparse.ArgumentParser, concurrency: list[int], input_len: int, output_len: int,
                  seed: bool = True) -> None:
    """The load's shape (defaults as given), shared with `bench serve-sweep` (whose --seed is the synthetic
    model's, which seeds the prompts too)."""
    shown = ",".join(map(str, concurrency))
    p.add_argument("--concurrency", type=_concurrencies, default=concurrency,
                   help=f"comma-separated concurrency levels (default: {shown})")
    p.add_argument("--input-len", type=_positive, default=input_len,
                   help=f"prompt tokens per request (default {input_len})")
    p.add_argument("--output-len", type=_positive, default=output_len,
                   help=f"generated tokens per request (default {output_len})")
    p.add_argument("--num-prompts", type=_positive, default=None,
                   help="requests per level (default: --prompts-per-level x concurrency)")
    p.add_argument("--prompts-per-level", type=_positive, default=4,
                   help="requests per level per unit of concurrency when --num-prompts is absent (default 4)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")


def register_bench_serve(bench_subparsers) -> None:
    """Add `serve` to the sub-commands of `qwen-awq bench`."""
    p = bench_subparsers.add_parser("serve", help="load-test a running server (vLLM benchmark_serving "
                                    "metrics)", description="Streams /v1/completions requests with exact "
                                    "input and output "
                                    "lengths at each concurrency and reports throughput and latency.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    add_load_args(p, concurrency=[1, 16, 64], input_len=128, output_len=128)
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--soak", type=_duration, default=None, metavar="DURATION",
                   help="soak test for DURATION (e.g. 10m, 90s): a fixed request rate with random disconnects and "
                   "cancels; reports errors by class, p99 latency and RSS drift, KV blocks held at the end")
    p.add_argument("--request-rate", type=float, default=1.0, help="soak: requests per second (default 1)")
    p.add_argument("--disconnect-frac", type=float, default=0.15,
                   help="soak: share of streams the client drops mid-stream (default 0.15)")
    p.add_argument("--cancel-frac", type=float, default=0.15,
                   help="soak: share of non-streaming requests the client abandons before the reply (default 0.15)")
    p.set_defaults(func=cmd_bench_serve)


def _duration(text: str) -> float:
    """Seconds from '10m', '90s', '1h' or a plain number of seconds."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 10m, 90s or 1h, got {text!r}")
    return seconds
