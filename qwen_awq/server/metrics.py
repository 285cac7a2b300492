"""Prometheus metrics under vLLM's own names (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, ...), so
that dashboards and autoscalers written for vLLM work unchanged: engine gauges and counters read at scrape time
through a stats callback, request counters and latency histograms recorded as each engine request ends, and the
process's resident memory (`process_resident_memory_bytes`, as vLLM exposes it)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "vllm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4
# Latency buckets in seconds, spanning a fast GPU token (ms) to a slow CPU reply (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class EngineStats:
    """The engine's state at one moment (plain numbers, read from the step thread's counters)."""

    num_running: int  # sequences in the running batch
    num_waiting: int
    kv_usage: float  # fraction of KV blocks referenced by live sequences
    num_blocks: int
    block_size: int
    num_preemptions: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int
    cache_dtype: str
    prefix_caching: bool

    @property
    def blocks_in_use(self) -> int:
        return round(self.kv_usage * self.num_blocks)


@dataclass(frozen=True)
class RequestRecord:
    """One engine request as the server saw it (monotonic seconds)."""

    prompt_tokens: int
    output_tokens: list[int]  # per choice; empty if the request ended before producing anything
    finish_reasons: list[str | None]  # per choice; None: aborted (client gone) before it finished
    start: float
    first_token: float | None
    end: float

    @property
    def finished(self) -> bool:
        return bool(self.finish_reasons) and all(r is not None for r in self.finish_reasons)


class EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats, self.labels = stats, [model_name]

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        gauges = [("num_requests_running", "Sequences in the running batch.", s.num_running),
                  ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_usage)]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(self.labels, value)
            yield g
        counters = [("num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions),
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits)]
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(self.labels, value)
            yield c
        info = {"block_size": str(s.block_size), "num_gpu_blocks": str(s.num_blocks), "cache_dtype": s.cache_dtype,
                "enable_prefix_caching": str(s.prefix_caching)}
        g = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the KV cache (vLLM's labels).",
                              labels=list(info))
        g.add_metric(list(info.values()), 1.0)
        yield g


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(stats, model_name))
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux /proc)
        self.model_name = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self.success = Counter(PREFIX + "request_success", "Finished sequences by finish reason "
                               "(stop, length, abort).", [*labels, "finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token after the "
                              "first.", labels, buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to last "
                             "token.", labels, buckets=E2E_BUCKETS, registry=r).labels(model_name)

    def observe(self, rec: RequestRecord) -> None:
        self.prompt_tokens.inc(rec.prompt_tokens)
        self.generation_tokens.inc(sum(rec.output_tokens))
        for reason in rec.finish_reasons or [None]:
            self.success.labels(self.model_name, reason or "abort").inc()
        if rec.first_token is not None:
            self.ttft.observe(rec.first_token - rec.start)
        generated = max(rec.output_tokens, default=0)
        if rec.finished:
            self.e2e.observe(rec.end - rec.start)
            if rec.first_token is not None and generated > 1:
                self.tpot.observe((rec.end - rec.first_token) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
