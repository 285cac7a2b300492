"""`qwen-awq bench cold-start`: write a random AWQ folder of a real model's shapes to local disk, drop its pages from
the page cache, then time in a FRESH process: interpreter start, imports, CUDA init, load (weights read and
copied, post-load hooks, tokenizer), engine (KV pool, CUDA-graph capture), first token (issue 10: < 60 s for 7B).

The child gets an empty Triton cache unless --warm-kernel-cache, so kernel compilation counts as on a new machine;
the engine is `qwen-awq serve`'s default unless engine flags say otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError
from qwen_awq.eval.bench_report import add_output_args, environment, exit_on_sigterm, md_table, write_outputs
from qwen_awq.eval.cold_start_child import MARKER


def evict_page_cache(folder: Path) -> bool:
    """Ask the kernel to drop the folder's cached pages (flushed first), so the child reads from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def run_child(folder: Path, device: str, engine: dict[str, Any], kernel_cache: str | None, timeout: float) -> dict:
    """One measured process; kernel_cache: the Triton cache folder it uses (None: the environment's)."""
    env = dict(os.environ) | ({"TRITON_CACHE_DIR": kernel_cache} if kernel_cache else {})
    command = [sys.executable, "-m", "qwen_awq.eval.cold_start_child", str(folder), "--device", device,
               "--engine", json.dumps(engine), "--spawned-at", repr(time.time())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise ConfigError(f"the cold-start process failed (status {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(MARKER):])


def measure(folder: Path, device: str, engine: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The cold child (an empty Triton cache unless --warm-kernel-cache) and, with --repeat-warm, a second one
    that finds the kernels the first compiled (the page cache is evicted before each)."""
    cache = None if args.warm_kernel_cache else tempfile.mkdtemp(prefix="qwen-awq-triton-")
    try:
        out = {"page_cache_evicted": evict_page_cache(folder)}
        out["child"] = run_child(folder, device, engine, cache, args.timeout)
        if args.repeat_warm:
            evict_page_cache(folder)
            out["child_warm"] = run_child(folder, device, engine, cache, args.timeout)
        return out
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def cold_start_markdown(result: dict[str, Any]) -> str:
    runs = [("cold", result["child"])] + ([("warm kernel cache", result["child_warm"])] if "child_warm" in result
                                          else [])
    names = list(dict.fromkeys(name for _, child in runs for name in child["stages_s"]))
    rows = [[name] + [f"{c['stages_s'][name]:.2f}" if name in c["stages_s"] else "-" for _, c in runs]
            for name in names]
    rows.append(["**total, spawn to first token**"] + [f"**{c['total_s']:.1f}**" for _, c in runs])
    env, child = result["env"], result["child"]
    return "\n".join([
        f"## Cold start: {result['model']} folder on local disk -> graphs captured -> first token\n",
        f"{env['date']}, {env['device']}. Command: `{env['command']}`. Folder {result['folder_bytes'] / 1e9:.2f} GB "
        f"(written in {result['write_s']:.1f} s; page cache {'evicted' if result['page_cache_evicted'] else 'kept'}"
        f" before each run); first run's Triton cache {'as found' if result['warm_kernel_cache'] else 'empty'}; "
        f"{child['graphs_captured']} CUDA graphs; {child['kv_report']}\n",
        md_table(["stage, seconds (sub-stages are part of their total)"] + [name for name, _ in runs], rows),
        "\nGoal: < 60 s."])


def cmd_cold_start(args: argparse.Namespace) -> int:
    from qwen_awq.cli_args import config_kwargs
    from qwen_awq.engine.llm_engine import EngineConfig
    from qwen_awq.eval.bench_engine import free_device_memory
    from qwen_awq.eval.synthetic import write_synthetic_folder

    if args.synthetic is None:
        raise ConfigError("bench cold-start needs --synthetic NAME (it writes the folder it times)")
    exit_on_sigterm()  # a timeout around the benchmark still ends the child and removes the folder
    vocab = qwen_vocab(args.tokenizer)
    work = Path(args.dir or tempfile.mkdtemp(prefix="qwen-awq-cold-"))
    folder = work / f"{args.synthetic}-{args.quant}"
    device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    start = time.perf_counter()
    write_synthetic_folder(folder, args.synthetic, quant=args.quant == "awq", seed=args.seed, device=device,
                           vocab=vocab)
    write_s = time.perf_counter() - start
    free_device_memory()  # the child must find the GPU as a fresh server would
    try:
        result = {"env": environment(), "model": f"{args.synthetic} ({args.quant})",
                  "folder_bytes": folder_bytes(folder), "write_s": write_s, "warm_kernel_cache": args.warm_kernel_cache}
        result |= measure(folder, device, config_kwargs(EngineConfig, args), args)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    write_outputs(result, cold_start_markdown(result), args.json_out, args.md_out)
    return 0


def qwen_vocab(tokenizer: str | None) -> Path | None:
    """The qwen.tiktoken file that --tokenizer names (the file, or a folder holding it), copied into folders."""
    if tokenizer is None:
        return None
    path = Path(tokenizer)
    path = path / "qwen.tiktoken" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"--tokenizer {tokenizer}: no qwen.tiktoken there (the folder written needs one)")
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register_cold_start(bench_sub: Any) -> None:
    from qwen_awq.cli_args import add_config_args
    from qwen_awq.engine.llm_engine import EngineConfig
    from qwen_awq.eval.synthetic import add_synthetic_args

    p = bench_sub.add_parser("cold-start", help="time load -> graphs captured -> first token in a fresh process",
                             description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    add_synthetic_args(p)
    p.add_argument("--dir", default=None, help="where the folder is written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the written folder")
    p.add_argument("--warm-kernel-cache", action="store_true",
                   help="let the child use the Triton cache as it is (default: an empty one)")
    p.add_argument("--repeat-warm", action="store_true",
                   help="then time a second fresh process that finds the kernels the first one compiled")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each child may take (default 600)")
    add_config_args(p.add_argument_group("engine"), EngineConfig,
                    only=("max_num_seqs", "max_model_len", "kv_cache_memory", "enforce_eager"))
    add_output_args(p)
    p.set_defaults(func=cmd_cold_start)
