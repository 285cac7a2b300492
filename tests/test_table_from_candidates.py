"""bench/table_from_candidates.py: the winners of a kernel-candidate run (those beating the dispatcher's current
choice by the margin), and their rewrite into kernels/w4a16_tuned.py's source."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("table_from_candidates", ROOT / "bench" / "table_from_candidates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(k, n, m, current, *timed):
    return {"K": k, "N": n, "M": m, "current_us": current,
            "candidates": [{"kind": kind, "config": cfg, "us": us} for kind, cfg, us in timed]
            + [{"kind": "cudamma", "config": {"rb": 9}, "error": "did not compile"}]}


A = {"rb": 1, "wn": 2, "wk": 16, "unroll": 1, "xperm": False, "scale_after": True}
B = {"rb": 2, "wn": 1, "wk": 8, "unroll": 1, "xperm": False, "scale_after": False}
RESULT = {"device": "NVIDIA H200", "rows": [
    _row(4096, 4096, 1, 7.5, ("cudamma", A, 6.6), ("cudamma", B, 7.0)),  # A wins
    _row(4096, 4096, 2, 7.5, ("cudamma", A, 7.4)),  # within 2%: the table keeps its choice
    _row(4096, 4096, 3, 7.9, ("cudamma", B, 7.0)),  # bucket 4, which this source has no line for
    _row(11008, 4096, 1, 15.2, ("cudamma_ws", A, 1.0), ("cudamma", B, 14.0)),  # unknown kinds never win
]}
SOURCE = '''TUNED = {
    "NVIDIA H200": {
        "table": {
            (4096, 4096): {
                1: ("cuda", {"rows": 2, "unroll": 4, "warps": 8}),  # old
                2: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 2, "xperm": False}),  # old
            },
            (11008, 4096): {
                1: ("cuda", {"rows": 2, "unroll": 4, "warps": 8}),  # old
            },
        },
    },
    "Other card": {
        "table": {
            (4096, 4096): {
                1: ("cuda", {"rows": 1, "unroll": 4, "warps": 4}),
            },
        },
    },
}
'''


def test_winners_beat_the_current_choice_by_the_margin():
    wins = _tool().winners(RESULT)
    assert wins == {(4096, 4096): {1: ("cudamma", A, 6.6, 7.5), 4: ("cudamma", B, 7.0, 7.9)},
                    (11008, 4096): {1: ("cudamma", B, 14.0, 15.2)}}


def test_rewrite_replaces_the_cards_lines_and_names_the_missing():
    tool = _tool()
    source, missing = tool.rewrite(SOURCE, "NVIDIA H200", tool.winners(RESULT), "run_x")
    assert missing == [((4096, 4096), 4)]
    space: dict = {}
    exec(source, space)  # still Python, every other line as it was
    h200, other = space["TUNED"]["NVIDIA H200"]["table"], space["TUNED"]["Other card"]["table"]
    assert h200[(4096, 4096)][1] == ("cudamma", A) and h200[(11008, 4096)][1] == ("cudamma", B)
    assert h200[(4096, 4096)][2][0] == "cudamma" and h200[(4096, 4096)][2][1]["wk"] == 8  # not a winner: kept
    assert other[(4096, 4096)][1] == ("cuda", {"rows": 1, "unroll": 4, "warps": 4})  # another card: untouched
    assert "# 6.6 us, table before 7.5 (run_x)" in source
