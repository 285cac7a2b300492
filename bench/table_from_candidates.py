"""The W4A16 dispatcher's table with the winners of a candidate run (bench/mma_cuda_candidates.py or
bench/gemv_candidates.py JSON) put in, per (K, N) and M bucket, where they beat the dispatcher's current choice
by 2% in that run; then, optionally, a qwen-awq command run in this process under that table, so that a device call
can measure the new table before it is committed to kernels/w4a16_tuned.py. From the repo root:
    python3 bench/table_from_candidates.py CANDIDATES.json [--print] [-- bench decode ...]
--print writes the entries as w4a16_tuned.py lines (with each winner's time and the one it replaced).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.w4a16_tuned import TUNED

KINDS = ("cudamma", "cuda", "gemv", "mma")  # table kinds a candidate may carry (not the A/B-only ones)
MARGIN = 0.98  # a winner must beat the current choice by 2%: closer than that is the run's noise


def winners(result: dict) -> dict[tuple[int, int], dict[int, tuple[str, dict, float, float]]]:
    """(K, N) -> {M bucket: (kind, config fields, its us, the current choice's us)} where a candidate won."""
    out: dict = {}
    for row in result["rows"]:
        timed = [e for e in row["candidates"] if "us" in e and e["kind"] in KINDS]
        if not timed:
            continue
        best = min(timed, key=lambda e: e["us"])
        if best["us"] < MARGIN * row["current_us"]:
            out.setdefault((row["K"], row["N"]), {})[kern.m_bucket(row["M"])] = (
                best["kind"], best["config"], best["us"], row["current_us"])
    return out


def apply(wins: dict, card: str) -> None:
    """Put the winners into TUNED[card] in this process (the dispatcher's cache cleared)."""
    table = TUNED.setdefault(card, {"command": "", "date": "", "table": {}})["table"]
    for shape, per_m in wins.items():
        for m, (kind, config, _, _) in per_m.items():
            table.setdefault(shape, {})[m] = (kind, config)
    kern.choose.cache_clear()


def main() -> int:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidates")
    p.add_argument("--print", action="store_true", help="print the winners as table lines")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    with open(args.candidates) as f:
        result = json.load(f)
    wins = winners(result)
    if args.print:
        for (k, n), per_m in sorted(wins.items()):
            for m, (kind, config, us, cur) in sorted(per_m.items()):
                print(f"({k}, {n}) {m}: ({kind!r}, {config}),  # {us:.1f} us, before {cur:.1f}")
    if rest:
        apply(wins, result["device"] if torch.cuda.is_available() else kern.REFERENCE_CARD)
        from qwen_awq.cli import main as cli_main

        return cli_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
