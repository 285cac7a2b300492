"""The `qwen-awq` command line: chat, generate, quantize, eval, serve and bench.

User errors print one line and exit with status 2. Sub-commands register themselves from their own modules;
the flags they share (and those generated from config dataclasses) live in cli_args.py, so no sub-command
imports this module.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from qwen_awq.cli_args import Parser, add_model_args, add_sampling_args, load_for_cli, sampling_overrides
from qwen_awq.errors import QwenAwqError
from qwen_awq.threads import use_threads


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen_awq.chat import make_context
    from qwen_awq.generation import TextStream, reply_params

    overrides = sampling_overrides(args)  # bad values are reported before the model loads
    model, tok = load_for_cli(args)
    if args.chat:
        ids = make_context(tok, args.prompt, system=args.system)[1]
    else:
        ids = tok.encode(args.prompt, allowed_special=set())
    stream = TextStream(model, tok, ids, reply_params(model, tok, len(ids), **overrides))
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

    b = sub.add_parser("bench", help="benchmarks: decode, throughput, kernels, serve, serve-sweep, cold-start, "
                       "quantize", description="Benchmarks; see each sub-command's --help.")
    register_bench(b.add_subparsers(dest="bench_command", required=True, metavar="BENCH"))


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
