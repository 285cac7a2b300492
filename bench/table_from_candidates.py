"""The W4A16 dispatcher's table with the winners of a candidate run (bench/mma_cuda_candidates.py or
bench/gemv_candidates.py JSON) put in, per (K, N) and M bucket, where they beat the dispatcher's current choice
by 2% in that run; then, optionally, a qwen-awq command run in this process under that table, so that a device call
can measure the new table before it is committed to kernels/w4a16_tuned.py. From the repo root:
    python3 bench/table_from_candidates.py CANDIDATES.json [--print] [--write TAG] [-- bench decode ...]
--print writes the entries as w4a16_tuned.py lines (with each winner's time and the one it replaced); --write puts
them into kernels/w4a16_tuned.py in place of the card's entries for those (K, N) and M buckets (the comment names
TAG, the candidate run's results file), and lists the winners it found no entry for.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

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


TUNED_PY = Path(__file__).resolve().parent.parent / "qwen_awq" / "kernels" / "w4a16_tuned.py"


def entry_line(m: int, kind: str, config: dict, us: float, before: float, tag: str) -> str:
    fields = json.dumps(config, separators=(", ", ": ")).replace("true", "True").replace("false", "False")
    return f'{" " * 16}{m}: ("{kind}", {fields}),  # {us:.1f} us, table before {before:.1f} ({tag})'


def rewrite(source: str, card: str, wins: dict, tag: str) -> tuple[str, list[tuple[tuple[int, int], int]]]:
    """w4a16_tuned.py's source with the card's (K, N) / M-bucket lines replaced by the winners, and the winners
    that had no line to replace."""
    start = source.index(f'    "{card}": {{')
    end = source.find('\n    "', start + 1)
    end = len(source) if end < 0 else end
    card_src, missing = source[start:end], []
    for (k, n), per_m in sorted(wins.items()):
        head = card_src.find(f"            ({k}, {n}): {{")
        for m, (kind, config, us, before) in sorted(per_m.items()):
            if head < 0:
                missing.append(((k, n), m))
                continue
            stop = card_src.index("            },", head)
            block, line = card_src[head:stop], re.compile(rf"^ {{16}}{m}: .*$", re.M)
            if not line.search(block):
                missing.append(((k, n), m))
                continue
            block = line.sub(entry_line(m, kind, config, us, before, tag).replace("\\", "\\\\"), block, count=1)
            card_src = card_src[:head] + block + card_src[stop:]
    return source[:start] + card_src + source[end:], missing


def main() -> int:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidates")
    p.add_argument("--print", action="store_true", help="print the winners as table lines")
    p.add_argument("--write", metavar="TAG", help="put the winners into kernels/w4a16_tuned.py, citing TAG")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    with open(args.candidates) as f:
        result = json.load(f)
    wins = winners(result)
    if args.print:
        for (k, n), per_m in sorted(wins.items()):
            for m, (kind, config, us, cur) in sorted(per_m.items()):
                print(f"({k}, {n}) {m}: ({kind!r}, {config}),  # {us:.1f} us, before {cur:.1f}")
    if args.write:
        source, missing = rewrite(TUNED_PY.read_text(), result["device"], wins, args.write)
        TUNED_PY.write_text(source)
        for shape, m in missing:
            print(f"no entry for {shape} at M bucket {m} in {TUNED_PY.name}: add it by hand")
    if rest:
        apply(wins, result["device"] if torch.cuda.is_available() else kern.REFERENCE_CARD)
        from qwen_awq.cli import main as cli_main

        return cli_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
