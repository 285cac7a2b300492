"""The `qwen-awq` command line: chat, generate, quantize, eval, serve and bench.

User errors print one line and exit with status 2; sampling flags mirror SamplingParams' fields.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from qwen_awq.errors import QwenAwqError
from qwen_awq.threads import THREADS_HELP, use_threads

# flag, SamplingParams field (None: HF-style alias handled by default_params), type, help
SAMPLING_FLAGS: list[tuple[str, str, type, str]] = [
    ("--temperature", "temperature", float, "softmax temperature; 0 = greedy (default: the model's config)"),
    ("--top-p", "top_p", float, "nucleus sampling mass in (0, 1]; 1 = off"),
    ("--top-k", "top_k", int, "keep the k most likely tokens; 0 = off"),
    ("--min-p", "min_p", float, "drop tokens below min_p x the top probability; 0 = off"),
    ("--repetition-penalty", "repetition_penalty", float, "HF repetition penalty over prompt and output; 1 = off"),
    ("--presence-penalty", "presence_penalty", float, "OpenAI presence penalty in [-2, 2]"),
    ("--frequency-penalty", "frequency_penalty", float, "OpenAI frequency penalty in [-2, 2]"),
    ("--seed", "seed", int, "random seed, for reproducible sampling"),
    ("--max-new-tokens", "max_new_tokens", int, "most tokens to generate (default: the model's config, or 512)"),
    ("--min-new-tokens", "min_new_tokens", int, "fewest tokens to generate before a stop token may end the reply"),
]


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2GiB, 512MiB or a number of bytes)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf file (default: the bundled SmolLM2-135M-"
                   "Instruct in 4-bit AWQ, converted on first use and cached)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    for flag, dest, typ, help_text in SAMPLING_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, default=None, help=help_text)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable); trimmed from the output")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {dest: getattr(args, dest) for _, dest, _, _ in SAMPLING_FLAGS}
    if args.greedy:
        out["temperature"] = 0.0
    out["stop"] = args.stop
    out["ignore_eos"] = args.ignore_eos or None
    return {k: v for k, v in out.items() if v is not None}


def load_for_cli(args: argparse.Namespace):
    import qwen_awq

    print("Loading model...", file=sys.stderr, flush=True)
    return qwen_awq.load(args.model, dtype=args.dtype, device=args.device)


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen_awq.chat import make_context
    from qwen_awq.generation import TextStream, default_params

    model, tok = load_for_cli(args)
    params = default_params(model, **sampling_overrides(args))
    if args.chat:
        ids = make_context(tok, args.prompt, system=args.system)[1]
    else:
        ids = tok.encode(args.prompt, allowed_special=set())
    stream = TextStream(model, tok, ids, params)
    if args.json:
        out = stream.run()
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason},
                         ensure_ascii=False))
        return 0
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qwen_awq import __version__
    from qwen_awq.cli_chat import add_chat_parser

    parser = Parser(prog="qwen-awq", description="Run, quantize (AWQ) and serve Qwen-7B-Chat "
                                     "and Llama-family chat models.")
    parser.add_argument("--version", action="version", version=f"qwen-awq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_chat_parser(sub)
    g = sub.add_parser("generate", help="one completion for a prompt",
                       description="Generate one completion; --chat wraps the prompt in the chat format.")
    add_model_args(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="treat the prompt as a user message in the chat format")
    g.add_argument("--system", default="You are a helpful assistant.", help="system prompt with --chat")
    g.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason"} as JSON')
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Sub-commands that live beside their subsystem (quantize, eval, serve, bench)."""
    from qwen_awq.cli_tools import register_tools
    from qwen_awq.server.serve import register_serve

    return [register_tools, register_serve, _register_bench]


def _register_bench(sub: Any) -> None:
    from qwen_awq.eval.bench import register_bench

    b = sub.add_parser("bench", help="benchmarks: throughput, decode, serve",
                       description="Benchmarks; see each sub-command's --help.")
    from qwen_awq.eval.bench_serve import register_bench_serve

    bench_sub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    register_bench(bench_sub)
    register_bench_serve(bench_sub)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one `--help` away) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    try:
        if getattr(args, "threads", None) is not None:  # --threads N acts like OMP_NUM_THREADS=N (qwen_awq.threads)
            use_threads(args.threads)
        return args.func(args)
    except QwenAwqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
