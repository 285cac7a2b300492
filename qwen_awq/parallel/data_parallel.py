"""Data parallelism behind the one HTTP front end: N engine replicas (each on its own GPU, or all on the CPU),
and a router that sends each request to the replica with the least outstanding work, ties going to the replica
that last served a prompt with the same first KV block (the one most likely to hold that prefix in its cache).

`DataParallelEngine` offers what server/runner.py uses of an AsyncEngine; model facts and the scheduler limits
come from replica 0 (all replicas are alike).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing

import torch

from qwen_awq.engine.async_engine import AsyncEngine, StreamingGenerate
from qwen_awq.engine.llm_engine import EngineConfig, RequestOutput
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ParallelError

PREFIX_MEMORY = 4096  # first-block hashes remembered for routing (LRU); each is a few dozen bytes


class DeviceAsyncEngine(AsyncEngine):
    """An AsyncEngine whose step thread makes its model's GPU current (a thread starts on cuda:0, and Triton
    launches on the current device)."""

    def _loop(self) -> None:
        if self.engine.model.device.type == "cuda":
            torch.cuda.set_device(self.engine.model.device)
        super()._loop()


class PrefixRouter:
    """Least outstanding work first; among equals, the replica that last took the same first block."""

    def __init__(self, replicas: int, block_size: int) -> None:
        self.load = [0] * replicas  # sequences routed and not yet finished, per replica
        self.block_size = block_size
        self._seen: OrderedDict[int, int] = OrderedDict()  # hash of a prompt's first block -> replica

    def pick(self, prompt_ids: list[int]) -> int:
        key = hash(tuple(prompt_ids[:self.block_size]))
        least = min(self.load)
        candidates = [i for i, n in enumerate(self.load) if n == least]
        choice = self._seen.get(key)
        replica = choice if choice in candidates else candidates[0]
        self._seen[key] = replica
        self._seen.move_to_end(key)
        if len(self._seen) > PREFIX_MEMORY:
            self._seen.popitem(last=False)
        return replica


class DataParallelEngine(StreamingGenerate):
    """N AsyncEngines behind one interface: submit() and generate() route, the rest fans out or asks replica 0."""

    def __init__(self, replicas: list[AsyncEngine]) -> None:
        self.replicas = replicas
        self.engine = replicas[0].engine  # model facts, limits, structured-output state: all replicas alike
        self.router = PrefixRouter(len(replicas), self.engine.config.block_size)
        self._routed: dict[str, tuple[int, int]] = {}  # request in flight -> (its replica, its sequences)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return min(r.max_model_len for r in self.replicas)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.replicas)

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def shutdown(self) -> None:
        for r in self.replicas:
            r.shutdown()

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Admission as the least-loaded replica would judge it (replicas share the limits)."""
        least = min(range(len(self.replicas)), key=self.router.load.__getitem__)
        self.replicas[least].check(prompt_ids, params)

    def abort(self, request_id: str) -> None:
        for r in self.replicas:
            r.abort(request_id)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
               cache_salt: str | None = None) -> asyncio.Queue:
        """AsyncEngine.submit on the routed replica (counted in its load until `outputs` ends or `release`)."""
        i = self.router.pick(prompt_ids)
        stream = self.replicas[i].submit(request_id, prompt_ids, params, prompt, cache_salt)
        self.router.load[i] += params.n
        self._routed[request_id] = (i, params.n)
        return stream

    async def outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            async with aclosing(self.replicas[self._routed[request_id][0]].outputs(request_id, stream)) as outs:
                async for out in outs:
                    yield out
        finally:
            self._unroute(request_id)

    def release(self, request_id: str) -> None:
        if request_id in self._routed:
            self.replicas[self._routed[request_id][0]].release(request_id)
            self._unroute(request_id)

    def _unroute(self, request_id: str) -> None:
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            self.router.load[routed[0]] -= routed[1]


def replica_devices(n: int, device: str) -> list[str]:
    """One GPU per replica (cuda:0..n-1), or the CPU for all; refuses more replicas than GPUs."""
    from qwen_awq.models.loader import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return [str(dev)] * n
    if torch.cuda.device_count() < n:
        raise ParallelError(f"--data-parallel-size {n} needs {n} GPUs but only {torch.cuda.device_count()} are "
                            "visible (set CUDA_VISIBLE_DEVICES or ask for fewer)")
    return [f"cuda:{i}" for i in range(n)]


def data_parallel_engine(args: argparse.Namespace, config: EngineConfig, n: int) -> DataParallelEngine:
    """`qwen-awq serve --data-parallel-size N`: the model loaded once per replica device, one engine each."""
    from qwen_awq.engine.llm_engine import LLMEngine
    from qwen_awq.eval.synthetic import model_from_args

    replicas = []
    for device in replica_devices(n, args.device):
        model, tokenizer = model_from_args(argparse.Namespace(**vars(args) | {"device": device}), need_tokenizer=True)
        with torch.cuda.device(model.device) if model.device.type == "cuda" else contextlib.nullcontext():
            replicas.append(DeviceAsyncEngine(LLMEngine(model, tokenizer, config)))
    return DataParallelEngine(replicas)

