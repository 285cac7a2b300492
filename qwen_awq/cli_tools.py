"""`qwen-awq quantize` and `qwen-awq eval ppl`: quantize's flags come from QuantizeConfig's fields."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from qwen_awq.cli_args import add_config_args, add_model_args, config_kwargs


def cmd_quantize(args: argparse.Namespace) -> int:
    from qwen_awq.loading import resolve_model_path
    from qwen_awq.quant.quantize import QuantizeConfig, quantize_model
    from qwen_awq.threads import apply_thread_policy

    qcfg = QuantizeConfig(**config_kwargs(QuantizeConfig, args))
    apply_thread_policy(args.threads)  # the model waits in host memory: CPU work on every device
    start = time.perf_counter()
    out = quantize_model(resolve_model_path(args.model), Path(args.output), qcfg)
    print(f"wrote {out} ({qcfg.method}, group size {qcfg.group_size}) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from qwen_awq.eval.perplexity import perplexity_of_text
    from qwen_awq.loading import load

    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            from qwen_awq.errors import ConfigError

            raise ConfigError(f"cannot read --text {args.text}: {e}") from None
    else:
        from qwen_awq.eval.corpus import heldout_text

        text = heldout_text()
    result = perplexity_of_text(model, tok, text, ctx=args.ctx)
    if args.json:
        print(json.dumps({"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows}))
    else:
        print(f"perplexity {result.ppl:.3f} over {result.tokens} tokens in {result.windows} windows of {args.ctx}")
    return 0


def register_tools(sub: Any) -> None:
    from qwen_awq.quant.quantize import QuantizeConfig
    from qwen_awq.threads import ThreadsConfig

    q = sub.add_parser("quantize", help="quantize a model to 4-bit AWQ (AutoAWQ GEMM layout)",
                       description="Quantize an fp16/bf16/fp32 model folder (or .gguf) into an AutoAWQ-compatible "
                                   "4-bit checkpoint. Calibration text never comes from the network.")
    q.add_argument("--model", default=None, help="source model folder or .gguf (default: the bundled SmolLM2)")
    q.add_argument("--output", required=True, help="destination folder (written atomically)")
    add_config_args(q, QuantizeConfig)
    add_config_args(q, ThreadsConfig)  # --threads
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="evaluation: perplexity and benchmark suites", description="Evaluate a model.")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = esub.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    add_model_args(p)
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the held-out split of the offline corpus, "
                   "never used for calibration)")
    p.add_argument("--ctx", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval_ppl)
    from qwen_awq.eval.suites import register_suites  # mmlu, ceval, gsm8k, humaneval, profile, compare

    register_suites(esub)
