"""The decode graphs' greedy tail on the GPU: today's torch ops (fp32 copy, argmax, gather - logsumexp, stack, copy
into the graph's buffer) against kernels/greedy_tail.py, at Qwen-7B's lm_head width (151,936 fp16 logits a row).
On the GPU machine from the repo root:
    python3 bench/greedy_tail_bench.py --out DIR [--batches 1,32,128] [--vocab 151936]

Each timing is the median replay of one CUDA graph of `reps` calls over one logits buffer, divided by reps: the
logits stay in L2 as they do after the lm_head wrote them. Every path is checked against a float64 oracle (ids
exactly; the kernel's log-probs within 5e-6, torch's error is reported); a few (block, programs) splits of the kernel
are timed beside the default. Writes DIR/greedy_tail.json and prints a table; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_awq.kernels.greedy_tail import BLOCK, PROGRAMS, greedy_tail, greedy_tail_reference  # noqa: E402

WIDTH = 151936  # Qwen-7B's padded vocabulary: the lm_head's output columns
SPLITS = [(BLOCK, PROGRAMS), (1024, 256), (1024, 1024), (2048, 512), (512, 512)]  # (block, programs); default first
LOGPROB_TOL = 5e-6  # as tests/test_greedy_tail_kernel.py


def paths(vocab: int) -> dict:
    """name -> call(logits, out) writing out's (B, 2) rows as the decode graph's greedy tail does."""
    calls = {"torch": lambda x, out: out.copy_(greedy_tail_reference(x, vocab))}
    for block, programs in SPLITS:
        calls[f"kernel_b{block}_p{programs}"] = (
            lambda x, out, b=block, p=programs: greedy_tail(x, vocab, out=out, block=b, programs=p))
    return calls


def check(call, x: torch.Tensor, vocab: int) -> dict:
    x64 = x[:, :vocab].double()
    ids = x64.argmax(dim=-1)  # (B,)
    want = x64.gather(-1, ids[:, None]).squeeze(-1) - x64.logsumexp(dim=-1)  # (B,)
    out = torch.full((x.shape[0], 2), -1.0, dtype=torch.float64, device=x.device)
    call(x, out)
    err = float((out[:, 1] - want).abs().max())
    same = bool(torch.equal(out[:, 0].long(), ids))
    return {"ids_equal": same, "logprob_err": err, "ok": same and err <= LOGPROB_TOL}


def graph_us(call, x: torch.Tensor, reps: int) -> float:
    out = torch.empty(x.shape[0], 2, dtype=torch.float64, device=x.device)
    call(x, out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call(x, out)
    ms = do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    del graph
    return 1e3 * ms / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for greedy_tail.json")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--vocab", type=int, default=WIDTH, help="the ids that count (<= 151936; Qwen's tokenizer: 151851)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    gen, rows = torch.Generator().manual_seed(0), []
    for b in (int(v) for v in args.batches.split(",")):
        x = (torch.randn(b, WIDTH, generator=gen) * 3).half().cuda()  # (B, 151936) logits, as the lm_head writes
        row: dict = {"batch": b, "paths": {}}
        for name, call in paths(args.vocab).items():
            row["paths"][name] = {**check(call, x, args.vocab), "us": graph_us(call, x, args.reps)}
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "width": WIDTH, "vocab": args.vocab, "reps": args.reps,
              "rows": rows, "ok": all(e["ok"] or (k == "torch" and e["ids_equal"]) for r in rows
                                        for k, e in r["paths"].items())}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "greedy_tail.json").write_text(json.dumps(result, indent=1))
    default = f"kernel_b{BLOCK}_p{PROGRAMS}"
    print(f"{result['device']}, vocab {args.vocab} of {WIDTH} fp16 columns, us per call in a CUDA graph")
    print("| B | torch | kernel | speedup | best split (block, programs) | its us | max logprob err torch / kernel |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ps = r["paths"]
        timed = {k: v["us"] for k, v in ps.items() if k != "torch"}
        best = min(timed, key=timed.get)
        torch_us, kernel_us = ps["torch"]["us"], ps[default]["us"]
        print(f"| {r['batch']} | {torch_us:.1f} | {kernel_us:.1f} | {torch_us / kernel_us:.1f}x | {best} | "
              f"{timed[best]:.1f} | "
              f"{ps['torch']['logprob_err']:.1e} / {ps[default]['logprob_err']:.1e} |")
    print("ok" if result["ok"] else "FAILED: see greedy_tail.json")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
