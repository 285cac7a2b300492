"""What every `qwen-awq` sub-command shares: flags generated from config dataclasses, model flags, byte sizes,
sampling flags and their validation, and loading a model.

A dataclass field becomes a flag when its metadata has "help"; metadata may also name the flags ("flags"), the
choices and a unit ("bytes"). Absent flags leave the field's own default, which the help text shows.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from qwen_awq.threads import ThreadsConfig

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
TYPES = {"int": int, "float": float, "str": str, "Path": Path}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one `--help` away) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2GiB, 512MiB or a number of bytes)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def flag_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if "help" in f.metadata]


def add_config_args(parser: Any, cls: type, only: tuple[str, ...] | None = None, show_defaults: bool = True) -> None:
    """One flag per help-carrying field of the dataclass `cls` (or of the `only` ones), onto a parser or group."""
    for f in flag_fields(cls):
        if only is None or f.name in only:
            names = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
            parser.add_argument(*names, dest=f.name, default=None, help=_help(f, show_defaults), **_kind(f))


def _kind(f: Field) -> dict[str, Any]:
    kind = str(f.type).removesuffix(" | None")
    if kind == "bool":  # a flag says the opposite of the default
        return {"action": "store_false" if f.default else "store_true"}
    if kind.startswith("list["):
        return {"action": "append", "type": TYPES[kind[5:-1]]}
    typ = parse_bytes if f.metadata.get("unit") == "bytes" else TYPES[kind]
    return {"type": typ, "choices": f.metadata.get("choices")}


def _help(f: Field, show_defaults: bool) -> str:
    text, default = f.metadata["help"], f.default
    if not show_defaults or default in (MISSING, None) or isinstance(default, bool):
        return text
    if f.metadata.get("unit") == "bytes":
        unit = next(u for u in ("GiB", "MiB", "KiB", "B") if default % UNITS[u.lower()] == 0)
        default = f"{default // UNITS[unit.lower()]}{unit}"
    return f"{text} (default: {default})"


def config_kwargs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of the flags that were given, by field name (for cls(**kwargs) or as overrides)."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls) if getattr(args, f.name, None) is not None}


def parallel_config(args: argparse.Namespace):
    """The ParallelConfig of parsed flags (absent ones, or a parser without them, take the defaults)."""
    from qwen_awq.parallel.state import ParallelConfig

    return ParallelConfig(**config_kwargs(ParallelConfig, args))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf file (default: the bundled SmolLM2-135M-"
                   "Instruct in 4-bit AWQ, converted on first use and cached)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    add_config_args(p, ThreadsConfig)  # --threads (qwen_awq/threads.py)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from qwen_awq.engine.sampling_params import SamplingParams

    g = p.add_argument_group("sampling")
    add_config_args(g, SamplingParams, show_defaults=False)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given, checked now (before the slow model load): SamplingError for bad values."""
    from qwen_awq.engine.sampling_params import SamplingParams

    out = config_kwargs(SamplingParams, args)
    if args.greedy:
        out["temperature"] = 0.0
    # max_tokens only needs to admit min_tokens here: the real default comes from the model
    SamplingParams.from_defaults(None, **({"max_tokens": max(1, out.get("min_tokens", 0))} | out))
    return out


def load_for_cli(args: argparse.Namespace):
    from qwen_awq.loading import load

    print("Loading model...", file=sys.stderr, flush=True)
    return load(args.model, dtype=args.dtype, device=args.device)
