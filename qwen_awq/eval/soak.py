"""`qwen-awq bench serve --soak DURATION`: a soak test of a running server. Requests arrive at a fixed rate
(streamed completions and non-streamed chats, in turn); a share of streams is dropped mid-stream and a share
of non-streamed requests abandoned before the reply. Reported: outcomes and errors by class, p99 latency per
window and the server's resident memory per window (process_resident_memory_bytes from /metrics), each with
its drift from the second window (the first is the warm-up) to the last, and the KV blocks still held once the
server is idle, which must be 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from qwen_awq.eval.http_client import WORDS, HTTPError, request_json, request_lines

WINDOWS = 6  # latency and memory are compared across this many equal slices of the run
IDLE_TIMEOUT_S = 60.0  # how long the server may take to finish in-flight work after the last request
MiB = 1 << 20


@dataclass
class Outcome:
    start: float  # seconds since the soak began
    kind: str  # "ok", "disconnect", "cancel" (the two planned early exits), or an error class
    latency: float = 0.0


@dataclass
class SoakPlan:
    url: str
    model: str
    headers: dict[str, str]
    duration: float
    rate: float
    disconnect_frac: float
    cancel_frac: float
    output_len: int
    input_words: int
    rng: random.Random = field(default_factory=lambda: random.Random(0))


def error_class(e: BaseException) -> str:
    if isinstance(e, HTTPError):
        return f"http_{e.status}"
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, (OSError, asyncio.IncompleteReadError)):
        return "connection"
    return type(e).__name__


async def _stream(plan: SoakPlan, payload: dict[str, Any], leave_after: int | None) -> str:
    events = 0
    async with aclosing(request_lines(plan.url, "POST", "/v1/completions", payload, plan.headers)) as lines:
        async for line in lines:
            if line.startswith("data: {"):
                if '"error"' in line[:20]:
                    return "stream_error"
                events += 1
                if leave_after is not None and events >= leave_after:
                    return "disconnect"  # closing the iterator closes the connection mid-stream
    return "ok"


async def _chat(plan: SoakPlan, payload: dict[str, Any], leave_after_s: float | None) -> str:
    reply = asyncio.ensure_future(request_json(plan.url, "POST", "/v1/chat/completions", payload, plan.headers))
    if leave_after_s is None:
        body = await reply
        return "ok" if body.get("choices") else "bad_body"
    done, _ = await asyncio.wait({reply}, timeout=leave_after_s)
    if done:
        return "ok" if reply.result().get("choices") else "bad_body"
    reply.cancel()  # hang up while the server is still generating: it must abort (499) and free the KV
    await asyncio.gather(reply, return_exceptions=True)
    return "cancel"


async def one(plan: SoakPlan, i: int, begun: float) -> Outcome:
    rng = plan.rng
    prompt = " ".join(rng.choice(WORDS) for _ in range(plan.input_words))
    common = {"model": plan.model, "max_tokens": plan.output_len, "temperature": 0.7, "ignore_eos": True}
    start = time.perf_counter()
    try:
        if i % 2 == 0:
            drop = rng.random() < plan.disconnect_frac
            kind = await _stream(plan, common | {"prompt": prompt, "stream": True},
                                 rng.randint(1, max(1, plan.output_len // 2)) if drop else None)
        else:
            cancel = rng.random() < plan.cancel_frac
            kind = await _chat(plan, common | {"messages": [{"role": "user", "content": prompt}]},
                               rng.uniform(0.05, 1.0) if cancel else None)
    except Exception as e:
        kind = error_class(e)
    return Outcome(start - begun, kind, time.perf_counter() - start)


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", text, re.M):
        values[m[1] + (m[2] or "")] = float(m[3])
    return values


async def scrape(plan: SoakPlan) -> dict[str, float]:
    lines = [line async for line in request_lines(plan.url, "GET", "/metrics", None, plan.headers)]
    return parse_metrics("\n".join(lines))


def _series(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def kv_blocks_held(values: dict[str, float]) -> int:
    """vllm:kv_cache_usage_perc times the pool's blocks (vllm:cache_config_info's num_gpu_blocks label)."""
    info = next((k for k in values if k.startswith("vllm:cache_config_info{")), "")
    blocks = re.search(r'num_gpu_blocks="(\d+)"', info)
    return round(_series(values, "vllm:kv_cache_usage_perc") * int(blocks[1])) if blocks else -1


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else 0.0


async def _sample_rss(plan: SoakPlan, begun: float, samples: list[tuple[float, float]]) -> None:
    while True:
        values = await scrape(plan)
        samples.append((time.perf_counter() - begun, _series(values, "process_resident_memory_bytes") / MiB))
        await asyncio.sleep(plan.duration / (4 * WINDOWS))


async def _wait_idle(plan: SoakPlan) -> dict[str, float]:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        values = await scrape(plan)
        busy = _series(values, "vllm:num_requests_running") + _series(values, "vllm:num_requests_waiting")
        if busy == 0 or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.5)


async def soak(plan: SoakPlan) -> dict[str, Any]:
    begun = time.perf_counter()
    rss: list[tuple[float, float]] = []
    sampler = asyncio.ensure_future(_sample_rss(plan, begun, rss))
    tasks, i = [], 0
    while (due := i / plan.rate) < plan.duration:
        await asyncio.sleep(max(0.0, due - (time.perf_counter() - begun)))
        tasks.append(asyncio.ensure_future(one(plan, i, begun)))
        i += 1
    outcomes = await asyncio.gather(*tasks)
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    end = await _wait_idle(plan)
    return report(plan, outcomes, rss, end, time.perf_counter() - begun)


def report(plan: SoakPlan, outcomes: list[Outcome], rss: list[tuple[float, float]], end: dict[str, float],
           wall: float) -> dict[str, Any]:
    width = plan.duration / WINDOWS
    windows = [[o.latency for o in outcomes if o.kind == "ok" and w * width <= o.start < (w + 1) * width]
               for w in range(WINDOWS)]
    p99s = [p99(w) for w in windows]
    mem = [[m for t, m in rss if w * width <= t < (w + 1) * width] for w in range(WINDOWS)]
    mem_means = [sum(m) / len(m) if m else 0.0 for m in mem]
    kinds = Counter(o.kind for o in outcomes)
    errors = {k: v for k, v in kinds.items() if k not in ("ok", "disconnect", "cancel")}
    return {"duration_s": plan.duration, "wall_s": wall, "request_rate": plan.rate, "requests": len(outcomes),
            "outcomes": dict(kinds), "errors_by_class": errors, "p99_latency_s_per_window": p99s,
            "p99_latency_drift": p99s[-1] / p99s[1] if p99s[1] else 0.0,
            "rss_mib_per_window": mem_means, "rss_drift_mib": mem_means[-1] - mem_means[1],
            "kv_blocks_held_at_end": kv_blocks_held(end),
            "requests_running_at_end": _series(end, "vllm:num_requests_running"),
            "aborted_sequences": sum(v for k, v in end.items()
                                     if k.startswith("vllm:request_success_total{") and 'reason="abort"' in k)}


def print_report(r: dict[str, Any]) -> None:
    print(f"============ soak {r['duration_s']:.0f} s at {r['request_rate']:g} req/s ============")
    print(f"Requests: {r['requests']}   outcomes: {r['outcomes']}   wall: {r['wall_s']:.1f} s")
    print(f"Errors by class: {r['errors_by_class'] or 'none'}")
    print("p99 latency per window (s): " + " ".join(f"{v:.2f}" for v in r["p99_latency_s_per_window"])
          + f"   drift x{r['p99_latency_drift']:.2f} (last / second)")
    print("RSS per window (MiB): " + " ".join(f"{v:.0f}" for v in r["rss_mib_per_window"])
          + f"   drift {r['rss_drift_mib']:+.1f} MiB (last - second)")
    print(f"KV blocks held at the end: {r['kv_blocks_held_at_end']} (must be 0)")


def cmd_soak(args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        url = args.url.rstrip("/")
        model = (await request_json(url, "GET", "/v1/models", None, headers))["data"][0]["id"]
        plan = SoakPlan(url, model, headers, args.soak, args.request_rate, args.disconnect_frac, args.cancel_frac,
                        args.output_len, args.input_len, random.Random(args.seed))
        return await soak(plan)

    result = asyncio.run(run())
    print_report(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0 if result["kv_blocks_held_at_end"] == 0 and not result["errors_by_class"] else 1
