"""`qwen-awq quantize` and `qwen-awq eval ppl`: flags mirror QuantizeConfig and the perplexity function."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def cmd_quantize(args: argparse.Namespace) -> int:
    from qwen_awq import resolve_model_path
    from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

    qcfg = QuantizeConfig(group_size=args.group_size, method=args.method, samples=args.samples, seqlen=args.seqlen,
                          calib_path=args.calib, calib_format=args.calib_format, clip=not args.no_clip,
                          device=args.device, seed=args.seed, max_shard_size=args.max_shard_size,
                          overwrite=args.overwrite)
    start = time.perf_counter()
    out = quantize_model(resolve_model_path(args.model), Path(args.output), qcfg)
    print(f"wrote {out} ({args.method}, group size {args.group_size}) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import qwen_awq
    from qwen_awq.eval.perplexity import perplexity_of_text

    model, tok = qwen_awq.load(args.model, dtype=args.dtype, device=args.device)
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
    from qwen_awq.cli import add_model_args, parse_bytes

    q = sub.add_parser("quantize", help="quantize a model to 4-bit AWQ (AutoAWQ GEMM layout)",
                       description="Quantize an fp16/bf16/fp32 model folder (or .gguf) into an AutoAWQ-compatible "
                                   "4-bit checkpoint. Calibration text never comes from the network.")
    q.add_argument("--model", default=None, help="source model folder or .gguf (default: the bundled SmolLM2)")
    q.add_argument("--output", required=True, help="destination folder (written atomically)")
    q.add_argument("--group-size", type=int, default=128, help="input channels per scale/zero group (default 128)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq", help="awq search or round-to-nearest")
    q.add_argument("--calib", type=Path, default=None, help="local .txt (blank-line separated) or .jsonl calibration "
                   "file (default: the offline corpus shipped by the gensim wheel)")
    q.add_argument("--calib-format", choices=["text", "chatml"], default="text",
                   help="chatml wraps documents into chat turns (advised for chat models)")
    q.add_argument("--samples", type=int, default=128, help="calibration blocks (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration block (default 512)")
    q.add_argument("--no-clip", action="store_true", help="skip the weight-clipping search")
    q.add_argument("--device", default="auto", help="where each block is searched: cpu, cuda or auto")
    q.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    q.add_argument("--max-shard-size", type=parse_bytes, default=2 << 30, help="largest safetensors shard (2GiB)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
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
