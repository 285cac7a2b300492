"""What every `qwen-awq bench` result carries and how it is written: the run's environment and exact command, JSON
and a Markdown table beside it, sizes in GB (10^9 bytes, as the spec's floors), and the timing of named stages
inside a public call (cold start, quantizer) without editing the timed modules.
"""
from __future__ import annotations

import datetime
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

GB = 1e9  # the spec's floors count decimal gigabytes


def environment() -> dict[str, Any]:
    """Card, library versions, date and the exact command line of this run."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "triton", "transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "versions": versions,
            "date": datetime.date.today().isoformat(), "command": "qwen-awq " + " ".join(sys.argv[1:])}


def gb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:.2f} GB"


def num(value: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def header(result: dict[str, Any], title: str) -> str:
    env = result["env"]
    v = env["versions"]
    bw = result.get("copy_bytes_per_s")
    copy = f"; copy bandwidth {bw / GB:.0f} GB/s (read + write)" if bw else ""
    return (f"## {title}\n\n{env['date']}, {env['device']}, torch {v['torch']}, triton {v['triton']}, "
            f"transformers {v['transformers']}{copy}. Command: `{env['command']}`\n")


def write_outputs(result: dict[str, Any], markdown: str, json_out: str | None, md_out: str | None) -> None:
    """Print the Markdown; write the JSON (and the Markdown beside it, or at md_out)."""
    print(markdown, flush=True)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        Path(md_out or path.with_suffix(".md")).write_text(markdown + "\n")
    elif md_out:
        Path(md_out).write_text(markdown + "\n")


def checkpoint(result: dict[str, Any], json_out: str | None) -> None:
    """Write what is measured so far (a time limit that kills the run keeps it); the final write replaces it."""
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({**result, "partial": True}, indent=1, default=str))


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a `timeout` around the benchmark) into SystemExit, so `finally` blocks stop the processes
    this one started (a server, a measured child) instead of leaving them holding the GPU."""
    import signal

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def add_output_args(p: Any) -> None:
    p.add_argument("--json-out", default=None, help="write the result as JSON here (a .md table goes beside it)")
    p.add_argument("--md-out", default=None, help="write the Markdown table here instead of beside --json-out")


class StageTimer:
    """Seconds spent in named functions, summed and per call, while `timing()` is active.

    A wrapped function synchronizes the GPU before it returns, so a stage's time includes its queued kernels.
    Benchmark-only: the functions are replaced on their modules (or classes) for the duration and put back after.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}
        self.missing: list[str] = []

    def _wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                self.calls.setdefault(label, []).append(time.perf_counter() - start)
        return timed

    @contextmanager
    def timing(self, targets: dict[str, tuple[Any, str]]) -> Iterator[StageTimer]:
        """targets: label -> (module or class, attribute). An attribute that no longer exists is listed in
        `missing` (the code moved on; the other stages are still timed)."""
        saved = []
        for label, (owner, attr) in targets.items():
            original = owner.__dict__.get(attr)
            if original is None:
                self.missing.append(label)
                continue
            saved.append((owner, attr, original))
            setattr(owner, attr, self._wrap(label, original))
        try:
            yield self
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)

    def totals(self) -> dict[str, float]:
        return {label: sum(times) for label, times in self.calls.items()}
