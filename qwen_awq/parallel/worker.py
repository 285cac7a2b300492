"""Tensor-parallel workers (ranks 1..N-1): load a shard, build the same engine as rank 0, then mirror its steps.

Rank 0 schedules and samples; each step it broadcasts a `StepMessage` and every worker runs the same forward on
its shard of the weights and of the KV pool, so that the collectives inside the model pair up. A `None` message
ends the loop. Workers never sample: the logits they compute are discarded.
"""
from __future__ import annotations

import gc
import sys
import traceback
from dataclasses import dataclass, fields, replace

import torch

from qwen_awq.engine.decode_input import DecodeInput
from qwen_awq.engine.kv_cache import PagedMetadata
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine, kv_budget
from qwen_awq.engine.model_runner import ModelRunner
from qwen_awq.engine.step_input import StepInput
from qwen_awq.errors import ParallelError, QwenAwqError
from qwen_awq.parallel.state import (
    ParallelState,
    broadcast_object,
    destroy_group,
    gather_objects,
    init_group,
    rank_device,
)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild rank 0's engine on its own shard (picklable: sent at spawn)."""

    folder: str
    dtype: str
    device: str  # "cpu" or "cuda"; rank r uses cuda:r
    world: int
    port: int


@dataclass
class StepMessage:
    """One engine step as rank 0 runs it: its inputs on the host (packed ones replay a captured decode graph)."""

    step: StepInput | DecodeInput
    sample: bool  # compute logits (the vocab-parallel gather is a collective: every rank joins it)


def _to(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (StepInput, PagedMetadata)):
        return replace(x, **{f.name: _to(getattr(x, f.name), device) for f in fields(x)})
    return x


def step_to(step: StepInput, device: torch.device) -> StepInput:
    """The same step with every tensor on `device`."""
    return _to(step, device)


def run_message(runner: ModelRunner, msg: StepMessage) -> None:
    """Run the forward rank 0 runs for this step (ModelRunner.run), discarding the logits; a packed decode step
    stays on the host: the graph's one copy moves it."""
    step = msg.step if isinstance(msg.step, DecodeInput) else step_to(msg.step, runner.device)
    runner.run(step, msg.sample)


def report_loaded(state: ParallelState, error: str | None) -> None:
    """Every rank says whether its shard loaded; if any did not, every rank raises (rank 0 says which)."""
    failed = [f"rank {r}: {e}" for r, e in enumerate(gather_objects(error, state)) if e is not None]
    if failed:
        raise ParallelError("tensor-parallel startup failed: " + "; ".join(failed))


def agree_on_engine(state: ParallelState, model, config: EngineConfig) -> EngineConfig:
    """`config` with the smallest KV budget of all ranks, so every rank's pool has the same blocks."""
    budgets = gather_objects(kv_budget(config, model.device), state)
    return replace(config, kv_cache_memory=min(budgets))


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Entry point of a spawned worker process."""
    from qwen_awq.models.loader import load_model

    device = rank_device(rank, torch.device(spec.device))
    state = init_group(rank, spec.world, spec.port, device)
    try:
        model, error = None, None
        try:
            model = load_model(spec.folder, dtype=spec.dtype, device=device, parallel=state)
        except QwenAwqError as e:  # a user error: rank 0 raises it as one line
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug: its traceback belongs in the log
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        try:
            report_loaded(state, error)
        except ParallelError:
            return  # rank 0 reports it
        _serve(model, state)
    except RuntimeError as e:  # rank 0 exited without its stop message (killed, or its process ended first)
        print(f"qwen-awq tensor-parallel worker rank {rank}: lost rank 0 ({str(e).splitlines()[0][:120]}); "
              "exiting", file=sys.stderr)
    finally:
        destroy_group(state)


@torch.inference_mode()
def _serve(model, state: ParallelState) -> None:
    """Mirror rank 0: an EngineConfig builds a new engine (as rank 0's WorkerGroup.new_engine does, capturing
    its decode graphs together with rank 0), a StepMessage runs one step, None stops."""
    runner = None
    while (msg := broadcast_object(None, state)) is not None:
        if isinstance(msg, EngineConfig):
            runner = None
            gc.collect()  # the previous engine's pool and graphs go before the new ones are allocated
            runner = LLMEngine(model, None, agree_on_engine(state, model, msg)).runner
        else:
            run_message(runner, msg)
