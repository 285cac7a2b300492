"""The `qwen-awq` command line, run as a user runs it (a subprocess), on the real small default model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("bundled_model")  # the CLI's default model, built once before these run


def run_cli(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_awq.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def test_generate_json_answers_paris():
    r = run_cli("generate", "--prompt", "What is the capital of France?", "--chat", "--greedy",
                "--max-new-tokens", "24", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"] and out["finish_reason"] == "stop"
    assert isinstance(out["token_ids"], list) and len(out["token_ids"]) <= 24


def test_replies_run_to_their_stop_token_by_default():
    """Without --max-new-tokens a reply is not cut at vLLM's 16 tokens: the CLI, model.chat and --help agree on one
    default (the model's max_new_tokens, else 512)."""
    import qwen_awq
    from qwen_awq.cli import build_parser
    from qwen_awq.engine.sampling_params import REPLY_MAX_TOKENS

    query = "Explain what a CPU does in one sentence."
    r = run_cli("generate", "--prompt", query, "--chat", "--greedy", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and 16 < len(out["token_ids"]) < REPLY_MAX_TOKENS
    model, tok = qwen_awq.load(None, device="cpu")
    assert model.generation_config.max_new_tokens is None  # so the 512 applies to the bundled model
    response, _ = model.chat(tok, query, temperature=0)
    assert response == out["text"].strip()
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    flag = next(a for a in generate._actions if "--max-new-tokens" in a.option_strings)
    assert f"else {REPLY_MAX_TOKENS}" in flag.help


def test_piped_chat_session_is_multi_turn():
    queries = "What is the capital of France?\n:seed 1\n:history\nAnd what is the capital of Germany?\n"
    r = run_cli("chat", "--greedy", "--max-new-tokens", "24", "--device", "cpu", stdin=queries)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Paris" in lines[0]
    assert "(seed = 1)" in r.stdout and "[0] User: What is the capital of France?" in r.stdout
    assert "Berlin" in lines[-1]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "model folder /no/such/model does not exist"),
    (["generate", "--model", __file__, "--prompt", "x"], "is a file, not a model: pass a model folder"),
    (["generate", "--prompt", "x", "--top-p", "1.5", "--device", "cpu"], "top_p"),
    (["chat", "--min-new-tokens", "-1"], "min_tokens"),
    (["generate", "--prompt", "x", "--device", "cuda:7"] if not _cuda() else ["generate", "--dtype", "int3",
      "--prompt", "x"], "CUDA" if not _cuda() else "int3"),
])
def test_user_errors_are_one_line_with_status_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len([line for line in err if line != "Loading model..."]) == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    if message in ("top_p", "min_tokens"):  # sampling flags are checked before the model loads
        assert "Loading model..." not in r.stderr


def test_config_flags_come_from_dataclass_fields_and_keep_their_names():
    from qwen_awq.cli import build_parser
    from qwen_awq.engine.llm_engine import EngineConfig
    from qwen_awq.quant.quantize import QuantizeConfig

    parser = build_parser()
    serve = parser.parse_args(["serve", "--max-queue", "3", "--no-prefix-caching", "--kv-cache-memory", "1MiB",
                               "--block-size", "32", "--enforce-eager"])
    from qwen_awq.server.serve import engine_config

    assert engine_config(serve) == EngineConfig(max_waiting=3, enable_prefix_caching=False, kv_cache_memory=1 << 20,
                                                block_size=32, enforce_eager=True)
    assert engine_config(parser.parse_args(["serve"])) == EngineConfig()  # absent flags: the dataclass defaults
    from qwen_awq.cli_args import config_kwargs

    q = parser.parse_args(["quantize", "--output", "o", "--calib", "c.txt", "--no-clip", "--group-size", "64",
                           "--max-shard-size", "2GiB", "--method", "rtn"])
    qcfg = QuantizeConfig(**config_kwargs(QuantizeConfig, q))
    assert (qcfg.calib_path.name, qcfg.clip, qcfg.group_size, qcfg.max_shard_size, qcfg.method) == (
        "c.txt", False, 64, 2 << 30, "rtn")
    g = parser.parse_args(["generate", "--prompt", "p", "--max-new-tokens", "5", "--stop", "a", "--stop", "b",
                           "--ignore-eos", "--greedy"])
    from qwen_awq.cli_args import sampling_overrides

    assert sampling_overrides(g) == {"max_tokens": 5, "stop": ["a", "b"], "ignore_eos": True, "temperature": 0.0}
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    seqlen = next(a for a in quantize._actions if "--seqlen" in a.option_strings)
    assert seqlen.help.endswith(f"(default: {QuantizeConfig().seqlen})")


def test_every_flag_has_help():
    from qwen_awq.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.dest != "help":
                yield parser.prog, action

    missing = [f"{prog} {a.option_strings or a.dest}" for prog, a in walk(build_parser()) if not a.help]
    assert missing == []
