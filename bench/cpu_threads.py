"""CPU decode speed of the bundled model, idle and beside one busy process, torch's default threads vs the
qwen_awq.threads policy. Each measurement runs in a fresh process; writes bench/results/cpu_threads.{json,md}.

    python3 bench/cpu_threads.py [--new-tokens 128] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CHILD = """
import json, sys, torch
import qwen_awq
from qwen_awq.eval.bench import bench_decode
from qwen_awq.threads import choose_threads
mode, new_tokens, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
requested = torch.get_num_threads() if mode == "default" else None  # torch's own choice: one per core
choice = choose_threads(requested)
model, tok = qwen_awq.load(None, device="cpu", threads=requested)
result = bench_decode(model, tok, new_tokens, runs)
print(json.dumps(result | {"threads": torch.get_num_threads(), "policy": choice.reason}))
"""


def busy_process(cpu: int) -> subprocess.Popen:
    """A Python busy loop pinned to one core: the 'one other busy process' of issue 13."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))


def measure(mode: str, busy: bool, new_tokens: int, runs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    spin = busy_process(min(os.sched_getaffinity(0))) if busy else None
    try:
        time.sleep(0.5 if busy else 0)  # let the busy loop start before the policy looks
        load = Path("/proc/loadavg").read_text().split()[:3]
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(new_tokens), str(runs)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"mode": mode, "busy_process": busy, "loadavg_before": " ".join(load)}


def table(rows: list[dict]) -> str:
    lines = ["| other work | threads | how chosen | decode tok/s | loadavg (1/5/15 min) before |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        other = "one busy process (pinned to a core)" if r["busy_process"] else "none of ours"
        how = "torch default" if r["mode"] == "default" else f"policy: {r['policy']}"
        lines.append(f"| {other} | {r['threads']} | {how} | {r['tokens_per_s']:.1f} | {r['loadavg_before']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    rows = [measure(mode, busy, args.new_tokens, args.runs)
            for busy in (False, True) for mode in ("default", "policy")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_threads.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
