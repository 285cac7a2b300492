"""Prometheus metrics under vLLM's names with the `qwen_awq:` prefix: engine gauges and counters read at
scrape time, request counters and latency histograms recorded as each engine request ends."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.llm_engine import RequestOutput

PREFIX = "qwen_awq:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4
# Latency buckets in seconds, spanning a fast GPU token (ms) to a slow CPU reply (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class RequestRecord:
    """One engine request as the server saw it (monotonic seconds)."""

    prompt_tokens: int
    output: RequestOutput | None  # the last output received; None if it ended before producing one
    start: float
    first_token: float | None
    end: float


class EngineCollector(Collector):
    """Engine state read at scrape time (plain int and float reads of the step thread's counters)."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.labels = engine, [model_name]

    def collect(self) -> Iterator[Metric]:
        core = self.engine.engine
        sched, blocks = core.scheduler, core.block_manager
        gauges = [("num_requests_running", "Sequences in the running batch.", sched.num_running),
                  ("num_requests_waiting", "Sequences waiting to be scheduled.", sched.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", blocks.usage)]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(self.labels, value)
            yield g
        counters = [("num_preemptions", "Sequences preempted (recomputed later).", sched.num_preemptions),
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     blocks.prefix_query_tokens),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     blocks.prefix_hit_tokens)]
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(self.labels, value)
            yield c


class Metrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(engine, model_name))
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
        outputs = rec.output.outputs if rec.output is not None else []
        generated = max((len(o.token_ids) for o in outputs), default=0)
        self.generation_tokens.inc(sum(len(o.token_ids) for o in outputs))
        finished = rec.output is not None and rec.output.finished
        for o in outputs or [None]:
            reason = o.finish_reason if finished and o is not None and o.finish_reason else "abort"
            self.success.labels(self.model_name, reason).inc()
        if rec.first_token is not None:
            self.ttft.observe(rec.first_token - rec.start)
        if finished:
            self.e2e.observe(rec.end - rec.start)
            if rec.first_token is not None and generated > 1:
                self.tpot.observe((rec.end - rec.first_token) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
