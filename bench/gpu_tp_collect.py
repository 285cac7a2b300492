"""Summarize bench/gpu_tp.sh's results folder as one JSON line (issue 16's ratios and targets); exit 1 on a miss."""
from __future__ import annotations

import json
import sys
from pathlib import Path

DECODE_TARGET, THROUGHPUT_TARGET = 1.6, 1.8  # issue 16: TP=2 decode >= 1.6x TP=1; TP=2 and DP=2 >= 1.8x TP=1


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(a, b):
    return None if a is None or b is None else b / a


def main(out: Path) -> int:
    def row(name, key):
        data = _load(out / name)
        return None if data is None or not data.get("rows") else data["rows"][0][key]

    def http(name):
        data = _load(out / name / "serve_sweep.json")
        return None if data is None else max(data["levels"], key=lambda lv: lv["concurrency"])["output_throughput"]

    check = _load(out / "check.json") or {"ok": False}
    s = {"check_ok": check.get("ok", False),
         "decode_tok_s": {"tp1": row("decode_tp1.json", "tok_per_s"), "tp2": row("decode_tp2.json", "tok_per_s")},
         "throughput_out_tok_s": {"tp1": row("throughput_tp1.json", "out_tok_per_s"),
                                  "tp2": row("throughput_tp2.json", "out_tok_per_s")},
         "http_out_tok_s": {"dp1": http("serve_dp1"), "dp2": http("serve_dp2")}}
    s["decode_tp2_over_tp1"] = _ratio(s["decode_tok_s"]["tp1"], s["decode_tok_s"]["tp2"])
    s["throughput_tp2_over_tp1"] = _ratio(s["throughput_out_tok_s"]["tp1"], s["throughput_out_tok_s"]["tp2"])
    s["http_dp2_over_dp1"] = _ratio(s["http_out_tok_s"]["dp1"], s["http_out_tok_s"]["dp2"])
    s["targets"] = {"decode": (s["decode_tp2_over_tp1"] or 0) >= DECODE_TARGET,
                    "throughput_tp2": (s["throughput_tp2_over_tp1"] or 0) >= THROUGHPUT_TARGET,
                    "throughput_dp2": (s["http_dp2_over_dp1"] or 0) >= THROUGHPUT_TARGET}
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps(s))
    return 0 if s["check_ok"] and all(s["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
