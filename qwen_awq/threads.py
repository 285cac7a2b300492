"""CPU thread policy: torch's intra-op thread count from the cores this process may use and how busy they are.

torch starts one OpenMP thread per core. When another process keeps a core busy, those threads spin against it
and decode slows down about 3x on 2 cores (bench/results/cpu_threads.md); one thread per *free* core avoids it.
`--threads N` or OMP_NUM_THREADS=N override the choice.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen_awq.errors import ConfigError

SAMPLE_SECONDS = 0.2  # long enough for /proc/stat's 10 ms ticks to resolve a core's load to about 5%
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
THREADS_HELP = ("CPU threads for torch (default: one per core this process may use that other processes leave "
                "free; OMP_NUM_THREADS=N also sets it)")


@dataclass(frozen=True)
class ThreadsConfig:
    """The `--threads` flag; None picks from free cores (the policy below)."""

    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: float  # cores this process may use (affinity, cgroup quota)
    busy: float  # of those, cores kept busy by other processes when measured
    reason: str


def cgroup_cpu_limit() -> float | None:
    """The cgroup CPU quota in cores (cpu.max "quota period", or v1's cfs files), None when unlimited."""
    try:
        if CGROUP_V2.is_file():
            quota, period = CGROUP_V2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_path, period_path = CGROUP_V1
        if quota_path.is_file():
            quota = int(quota_path.read_text())
            return None if quota <= 0 else quota / int(period_path.read_text())
    except (OSError, ValueError):
        return None
    return None


def allowed_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cpus` from /proc/stat; None where there is no /proc."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(cpus: set[int], seconds: float = SAMPLE_SECONDS) -> float:
    """Cores of `cpus` that other processes keep busy: /proc/stat over a short sample, minus our own CPU time
    (an instantaneous view; /proc/loadavg's 1-minute average lags behind and counts us too)."""
    before, own_before, t0 = _cpu_ticks(cpus), time.process_time(), time.monotonic()
    if before is None:
        return 0.0
    time.sleep(seconds)
    after, own, elapsed = _cpu_ticks(cpus), time.process_time() - own_before, time.monotonic() - t0
    assert after is not None
    total = after[1] - before[1]
    if total <= 0:
        return 0.0
    busy = len(cpus) * (after[0] - before[0]) / total  # in cores
    return max(0.0, busy - own / elapsed)


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """An explicit request, else OMP_NUM_THREADS, else one thread per usable core that is not busy (at least 1)."""
    cpus = allowed_cpus()
    limit = cgroup_cpu_limit()
    cores = min(float(len(cpus)), limit) if limit else float(len(cpus))
    if requested is not None:
        ThreadsConfig(requested)
        return ThreadChoice(requested, cores, 0.0, "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), cores, 0.0, "OMP_NUM_THREADS")
    busy = busy_cores(cpus)
    # Round the free share to the nearest core: a core 40% busy still runs one of our threads well.
    threads = max(1, min(math.floor(cores) or 1, round(cores - busy)))
    return ThreadChoice(threads, cores, busy, f"{cores:g} usable cores, {busy:.1f} busy with other work")


def apply_thread_policy(requested: int | None = None) -> ThreadChoice:
    """Set torch's intra-op threads by `choose_threads` (call where a model loads on the CPU)."""
    import torch

    choice = choose_threads(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


def use_threads(threads: int) -> None:
    """`--threads N`: the same as OMP_NUM_THREADS=N for this process, so every later load keeps N."""
    ThreadsConfig(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    apply_thread_policy(threads)
