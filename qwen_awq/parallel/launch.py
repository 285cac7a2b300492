"""Start a tensor-parallel engine from one process: spawn the workers (no torchrun), join them as rank 0, load
rank 0's shard and build its engine, whose runner sends each step to the workers; stop them all cleanly.
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen_awq.engine.decode_input import DecodeInput
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.model_runner import ModelRunner
from qwen_awq.engine.sampler import SampleOutput
from qwen_awq.engine.scheduler import ScheduledBatch
from qwen_awq.engine.step_input import StepInput
from qwen_awq.errors import ParallelError
from qwen_awq.parallel.state import (
    ParallelState,
    broadcast_object,
    check_devices,
    destroy_group,
    init_group,
    rank_device,
)
from qwen_awq.parallel.worker import StepMessage, WorkerSpec, agree_on_engine, report_loaded, step_to, worker_main
from qwen_awq.ports import free_port

JOIN_TIMEOUT_S = 10.0  # a worker that has not exited this long after the stop message is terminated
WATCH_INTERVAL_S = 0.5  # how often the NCCL watchdog looks at the workers


@dataclass
class WorkerGroup:
    """Rank 0's handle on its workers: sends step messages, notices a dead worker, shuts everything down."""

    state: ParallelState
    procs: list[mp.Process]
    broken: str | None = None  # why the group can no longer run steps
    closed: bool = field(default=False)

    def dead(self) -> str | None:
        """A line naming the first worker that exited, if any did."""
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                return f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def check(self) -> None:
        self.broken = self.broken or self.dead()
        if self.broken:
            raise ParallelError(f"{self.broken}; the engine cannot run: restart it")

    def send(self, msg: StepMessage | None) -> None:
        self.check()
        try:
            broadcast_object(msg, self.state)
        except RuntimeError as e:
            self.fail(e)

    def fail(self, e: Exception) -> None:
        """A collective failed: a worker died (name it) or the group broke; raise ParallelError either way."""
        self.broken = self.dead() or f"tensor-parallel group failed ({type(e).__name__}: {e})"
        raise ParallelError(f"{self.broken}; the engine cannot run: restart it") from e

    def watch(self) -> None:
        """Under NCCL a collective whose peer died waits for the group timeout (then the process is torn down):
        a thread aborts the communicators as soon as a worker exits, so the blocked step raises at once."""
        if self.state.group is None or dist.get_backend(self.state.group) != "nccl":
            return  # gloo raises on its own when a peer's socket closes
        threading.Thread(target=self._watch, name="qwen-awq-tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while not self.closed:
            death = self.dead()
            if death is not None:
                self.broken = self.broken or death
                dist.distributed_c10d._abort_process_group()  # torch's (private) ncclCommAbort of every group
                return
            time.sleep(WATCH_INTERVAL_S)

    def new_engine(self, model, tokenizer, config: EngineConfig) -> LLMEngine:
        """An LLMEngine on rank 0 whose steps run on every rank; each worker builds its twin from `config`."""
        self.send(config)
        engine = LLMEngine(model, tokenizer, agree_on_engine(self.state, model, config))
        engine.runner = TensorParallelRunner(engine.runner, self)
        return engine

    def close(self) -> None:
        """Stop message, join, terminate stragglers, leave the process group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.broken is None and self.dead() is None:
            try:
                broadcast_object(None, self.state)
            except RuntimeError:
                pass  # a worker died meanwhile: it is reaped below
        for p in self.procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
        with contextlib.suppress(RuntimeError):  # already aborted by the watchdog
            destroy_group(self.state)  # local under gloo and NCCL: a dead peer does not block it


class TensorParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: each step's inputs are built on the host, sent to the workers, then run here."""

    device_input_ids = False  # the workers get the host's inputs: no overlapped decode

    def __init__(self, runner: ModelRunner, group: WorkerGroup) -> None:
        super().__init__(runner.model, runner.pool, runner.vocab_size, runner.graphs)
        self.group = group

    def step_input(self, batch: ScheduledBatch) -> StepInput | DecodeInput:
        if self._is_graph_decode(batch):  # packed on the host already: every rank copies it into its graph inputs
            packed = self.graphs.pack(batch.entries)
            self.group.send(StepMessage(packed, bool(batch.sampling)))
            return packed
        host = StepInput.build(batch.entries, self.pool.block_size, torch.device("cpu"))
        self.group.send(StepMessage(host, bool(batch.sampling)))
        return step_to(host, self.device)

    def step(self, batch: ScheduledBatch) -> SampleOutput | None:
        self.group.check()
        try:
            out = super().step(batch)
        except RuntimeError as e:  # a collective inside the model lost its peer
            self.group.fail(e)
        self.group.check()  # the watchdog aborted NCCL during this step: its tokens are not to be trusted
        return out


def _spawn(spec: WorkerSpec) -> list[mp.Process]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(rank, spec), daemon=True, name=f"qwen-awq-tp{rank}")
             for rank in range(1, spec.world)]
    for p in procs:
        p.start()
    return procs


def start_tensor_parallel(folder: str | Path, dtype: str, device: str, world: int, model_class=None):
    """(rank 0's model shard, the WorkerGroup) for `world` ranks, each rank holding its shard; engines come
    from group.new_engine. The group closes when the model is garbage collected, the process exits, or
    its `close` is called."""
    from qwen_awq.models.loader import resolve_device

    dev = resolve_device(device)
    check_devices(world, dev)
    spec = WorkerSpec(str(folder), str(dtype), dev.type, world, free_port())
    procs = _spawn(spec)
    state = init_group(0, world, spec.port, rank_device(0, dev))
    group = WorkerGroup(state, procs)
    group.watch()
    try:
        model = _load_rank0(folder, dtype, rank_device(0, dev), state, model_class)
    except BaseException:
        group.close()
        raise
    model.tp_workers = group  # engine_for finds the group here (benchmarks build several engines per model)
    weakref.finalize(model, group.close)
    return model, group


def _load_rank0(folder, dtype: str, device: torch.device, state: ParallelState, model_class):
    """Rank 0's shard; whatever fails on any rank is raised here, after every rank has heard of it."""
    from qwen_awq.models.loader import load_model

    kwargs = {} if model_class is None else {"model_class": model_class}
    try:
        model = load_model(folder, dtype=dtype, device=device, parallel=state, **kwargs)
    except Exception as e:
        with contextlib.suppress(ParallelError):  # the workers hear of it and exit; the user sees rank 0's error
            report_loaded(state, f"{type(e).__name__}: {e}")
        raise
    report_loaded(state, None)
    return model


def engine_for(model, tokenizer, config: EngineConfig) -> LLMEngine:
    """An engine for `model`: a plain LLMEngine, or a tensor-parallel one when the model is a rank-0 shard."""
    group = getattr(model, "tp_workers", None)
    return LLMEngine(model, tokenizer, config) if group is None else group.new_engine(model, tokenizer, config)


def load_tensor_parallel(path: str | Path | None, dtype: str, device: str, world: int, config: EngineConfig):
    """`qwen_awq.load` under tensor parallelism: (rank 0's ChatModel shard, tokenizer, engine, WorkerGroup)."""
    from qwen_awq.chat import ChatModel
    from qwen_awq.loading import resolve_model_path
    from qwen_awq.tokenizer import load_tokenizer

    folder = resolve_model_path(path)
    tokenizer = load_tokenizer(folder)
    model, group = start_tensor_parallel(folder, dtype, device, world, ChatModel)
    return model, tokenizer, group.new_engine(model, tokenizer, config), group

