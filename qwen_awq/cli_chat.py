"""`qwen-awq chat`: an interactive, streaming, multi-turn chat with commands like Qwen's cli_demo.

From a terminal it prompts; from a pipe it reads one query per line, so sessions can be scripted.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any, TextIO

from qwen_awq.chat import DEFAULT_SYSTEM, chat_stream
from qwen_awq.cli_args import add_model_args, add_sampling_args, load_for_cli, sampling_overrides
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import QwenAwqError

HELP = """Commands:
  :help / :h             show this help
  :quit / :q / :exit     leave
  :clear / :cl           forget the conversation (start a new chat)
  :history / :his        show the conversation so far
  :seed N                set the sampling seed (each reply then reproducible)
  :conf                  show the sampling settings
  :conf key=value        change a sampling setting, e.g. :conf temperature=0.7
  :reset-conf            back to the model's default settings"""


class ChatSession:
    def __init__(self, model: Any, tokenizer: Any, system: str, overrides: dict[str, Any], out: TextIO) -> None:
        self.model, self.tokenizer, self.system, self.out = model, tokenizer, system, out
        self.initial = dict(overrides)
        self.overrides = dict(overrides)
        self.history: list[tuple[str, str]] = []

    def reply(self, query: str) -> str:
        pieces = []
        for piece in chat_stream(self.model, self.tokenizer, query, self.history, self.system, **self.overrides):
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        response = "".join(pieces).strip()
        self.history.append((query, response))
        return response

    def command(self, line: str) -> bool:
        """Run a :command; returns False when the session should end."""
        name, _, arg = line[1:].strip().partition(" ")
        if name in ("quit", "q", "exit"):
            return False
        handlers = {"help": self._help, "h": self._help, "clear": self._clear, "cl": self._clear,
                    "history": self._history, "his": self._history, "seed": self._seed, "conf": self._conf,
                    "reset-conf": self._reset}
        if name not in handlers:
            self.out.write(f"unknown command :{name} (type :help)\n")
        else:
            handlers[name](arg.strip())
        return True

    def _help(self, _: str) -> None:
        self.out.write(HELP + "\n")

    def _clear(self, _: str) -> None:
        self.history.clear()
        self.out.write("(conversation cleared)\n")

    def _history(self, _: str) -> None:
        for i, (q, r) in enumerate(self.history):
            self.out.write(f"[{i}] User: {q}\n[{i}] Assistant: {r}\n")

    def _seed(self, arg: str) -> None:
        try:
            self.overrides["seed"] = int(arg)
            self.out.write(f"(seed = {self.overrides['seed']})\n")
        except ValueError:
            self.out.write(f"usage: :seed N (an integer), got {arg!r}\n")

    def _conf(self, arg: str) -> None:
        if not arg:
            self.out.write(" ".join(f"{k}={v}" for k, v in sorted(self.overrides.items())) or "(model defaults)")
            self.out.write("\n")
            return
        key, _, value = arg.partition("=")
        types = {f.name: f.type for f in fields(SamplingParams)} | {"max_new_tokens": "int"}
        if key not in types or not value:
            self.out.write(f"usage: :conf key=value with key in {', '.join(sorted(types))}\n")
            return
        kind = str(types[key])
        try:
            parsed: Any = float(value) if "float" in kind else int(value) if "int" in kind else value
            if "bool" in kind:
                parsed = value.lower() in ("1", "true", "yes")
        except ValueError:
            self.out.write(f"{key} needs a number, got {value!r}\n")
            return
        self.overrides[key] = parsed
        self.out.write(f"({key} = {parsed})\n")

    def _reset(self, _: str) -> None:
        self.overrides = dict(self.initial)
        self.out.write("(settings reset)\n")


def run_chat(session: ChatSession, stdin: TextIO, interactive: bool) -> int:
    if interactive:
        session.out.write("Chat with the model. Type :help for commands, :quit to leave.\n")
    while True:
        if interactive:
            session.out.write("\nUser> ")
            session.out.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            if not session.command(line):
                return 0
            continue
        if interactive:
            session.out.write("\nAssistant> ")
        try:
            session.reply(line)
        except QwenAwqError as e:  # e.g. a bad :conf value: report it and keep the session
            session.out.write(f"\nerror: {e}\n")


def cmd_chat(args: argparse.Namespace) -> int:
    overrides = sampling_overrides(args)  # bad values are reported before the model loads
    model, tok = load_for_cli(args)
    session = ChatSession(model, tok, args.system, overrides, sys.stdout)
    return run_chat(session, sys.stdin, sys.stdin.isatty())


def add_chat_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat (reads one query per line from a pipe)",
                       description="Chat with a model. Type :help inside for commands.")
    add_model_args(p)
    p.add_argument("--system", default=DEFAULT_SYSTEM, help=f"system prompt (default: {DEFAULT_SYSTEM!r})")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
