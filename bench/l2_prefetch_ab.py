"""A/B of the L2 weight prefetch (kernels/l2_prefetch.py) in the engine's captured decode step: one random
Qwen-7B-shaped model, one engine per setting (graphs captured with that setting), batch-1 and batch-32 decode.

    python3 bench/l2_prefetch_ab.py --out FILE [--quant awq] [--tokens 256] [--runs 3] [--settings off during:16 ...]

A setting is `off` or MODE:MB[:lines|last][:BLOCKS] (QWEN_AWQ_L2_PREFETCH=MODE, _MB=MB, _BULK=0 with `lines`,
_LAST=1 with `last`, _BLOCKS). `off` runs first
and last, so drift between engines shows. Prints one line per row; writes JSON with the card's name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_awq.eval.bench_decode import engine_decode  # noqa: E402
from qwen_awq.eval.synthetic import load_synthetic  # noqa: E402

DEFAULT = ["off", "during:8", "during:16", "after:8", "after:16", "during:16:last", "after:16:last",
           "during:32:last", "during:16:lines", "off"]


def apply(setting: str) -> None:
    mode, *rest = setting.split(":")
    os.environ["QWEN_AWQ_L2_PREFETCH"] = mode
    os.environ["QWEN_AWQ_L2_PREFETCH_MB"] = rest[0] if rest else "16"
    flags = rest[1:]
    os.environ["QWEN_AWQ_L2_PREFETCH_BULK"] = "0" if "lines" in flags else "1"
    os.environ["QWEN_AWQ_L2_PREFETCH_LAST"] = "1" if "last" in flags else "0"
    os.environ["QWEN_AWQ_L2_PREFETCH_BLOCKS"] = next((f for f in flags if f.isdigit()), "32")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quant", choices=("awq", "none"), default="awq")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--settings", nargs="+", default=DEFAULT)
    p.add_argument("--synthetic", default="qwen-7b", help="qwen-tiny: a CPU smoke run of this script")
    args = p.parse_args()
    model = load_synthetic(args.synthetic, args.quant == "awq")
    rows = []
    for setting in args.settings:
        apply(setting)
        for b in args.batch:
            r = engine_decode(model, None, b, args.tokens, args.runs) | {"setting": setting}
            rows.append(r)
            print(f"{setting:>18} batch {b:>3}: {r['tok_per_s']:8.1f} tok/s", flush=True)
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    Path(args.out).write_text(json.dumps({"card": props.name if props else "cpu",
                                          "l2_bytes": props.L2_cache_size if props else None,
                                          "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
