"""The parallel state of one process (rank, world size, process groups) and the collectives the decoder uses.

World size 1 is today's single-process path: nothing is sharded and no collective runs. The state is an explicit
object handed to the loader and the decoder's parallel layers, never module-level state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from qwen_awq.errors import ParallelError

# Long enough for a 7B shard to load and a first CUDA-graph capture, short enough that a lost peer surfaces.
INIT_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes serve one model; fields with help metadata are `qwen-awq serve` flags."""

    tensor_parallel_size: int = field(default=1, metadata={
        "flags": ("--tensor-parallel-size", "-tp"),
        "help": "GPUs (or CPU processes) that each hold a 1/N shard of every layer and of the KV cache"})
    data_parallel_size: int = field(default=1, metadata={
        "flags": ("--data-parallel-size", "-dp"),
        "help": "engine replicas behind the one HTTP front end; requests go to the least-loaded one"})

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ParallelError("--tensor-parallel-size and --data-parallel-size must be at least 1")


@dataclass(frozen=True)
class ParallelState:
    """This process's place in a tensor-parallel group; `group` carries the model's collectives (NCCL or
    gloo), `cpu_group` the engine's per-step messages (always gloo: they are Python objects on the host)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    cpu_group: Any = None

    @property
    def parallel(self) -> bool:
        return self.world > 1


SINGLE = ParallelState()


def check_devices(world: int, device: torch.device) -> None:
    """Refuse, in one line, a CUDA group larger than the GPUs this process sees."""
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ParallelError(f"--tensor-parallel-size {world} needs {world} GPUs but only "
                            f"{torch.cuda.device_count()} are visible (set CUDA_VISIBLE_DEVICES or ask for fewer)")


def rank_device(rank: int, device: torch.device) -> torch.device:
    """Rank r runs on cuda:r; on the CPU every rank shares the host."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_group(rank: int, world: int, port: int, device: torch.device) -> ParallelState:
    """Join the default process group (NCCL on CUDA, gloo on CPU) plus a gloo group for host messages."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=INIT_TIMEOUT)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    if backend == "nccl":  # NCCL builds its communicator on the first collective: not inside a graph capture
        dist.all_reduce(torch.zeros(1, device=device))
    return ParallelState(rank, world, dist.group.WORLD, cpu_group)


def destroy_group(state: ParallelState) -> None:
    if state.parallel and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Sum over ranks, in place (the row-parallel partial sums of o_proj and down_proj)."""
    dist.all_reduce(x, group=state.group)
    return x


def all_gather_last(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """(..., n) on each rank -> (..., world * n), rank r's columns at [r*n, (r+1)*n): the vocab-parallel logits."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(state.world)]
    dist.all_gather(parts, x, group=state.group)
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: Any, state: ParallelState) -> Any:
    """Rank 0's `obj` on every rank, over the host group (each step's inputs, setup and stop messages)."""
    box = [obj if state.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=state.cpu_group)
    return box[0]


def gather_objects(obj: Any, state: ParallelState) -> list[Any]:
    """Every rank's `obj`, on every rank (each worker's ready-or-error report)."""
    out: list[Any] = [None] * state.world
    dist.all_gather_object(out, obj, group=state.cpu_group)
    return out
