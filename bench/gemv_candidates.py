"""Time every GEMV candidate of the sweep (bench_kernels_sweep.CUDA_GRID, GEMV_GRID) at M = 1 and 2 on Qwen-7B's four
shapes, next to the dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 1 row), without the
full sweep's MMA part. On the GPU machine from the repo root:
    python3 bench/gemv_candidates.py --out $OUT/gemv_candidates.json [--ms 1,2] [--budget 120]
Prints, per M, each candidate's total over the four shapes (the sweep's "any" rule) and the best per shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from functools import partial

import torch
import torch.nn.functional as F

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.eval.bench_kernels_sweep import CUDA_GRID, GEMV_GRID
from qwen_awq.kernels import w4a16 as kern


def shape_rows(k: int, n: int, ms: list[int], gen: torch.Generator, deadline: float) -> list[dict]:
    layers, ref_w = bk.rotated_layers(k, n, gen)
    dense = bk.dense_copies(k, n, gen)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).half().cuda()
        row = {"K": k, "N": n, "M": m, "floor_bytes": bk.w4_bytes(k, n, m),
               "cublas_fp16_us": bk.time_rotated(lambda x_, w: F.linear(x_, w), x, dense, rep_ms=25),
               "current_us": bk.time_rotated(kern.w4a16_triton, x, layers, rep_ms=25), "gemv": []}
        grid = [("cuda", c) for c in CUDA_GRID.get(m, [])] + [("gemv", c) for c in GEMV_GRID.get(m, [])]
        for kind, cfg in grid:
            if time.time() > deadline:
                break
            call = kern.w4a16_nvrtc_only if kind == "cuda" else kern.w4a16_gemv
            row["gemv"].append({"kind": kind, "config": dataclasses.asdict(cfg),
                                **bk.timed_candidate(partial(call, config=cfg), x, layers, ref_w)})
        rows.append(row)
        best = min((e for e in row["gemv"] if "us" in e), key=lambda e: e["us"], default={"us": float("nan")})
        print(f"== K={k} N={n} M={m}: cuBLAS {row['cublas_fp16_us']:.1f} current {row['current_us']:.1f} "
              f"best {best['us']:.1f} {best.get('config')}", flush=True)
    return rows


def totals(rows: list[dict], bw: float) -> None:
    for m in sorted({r["M"] for r in rows}):
        at_m = [r for r in rows if r["M"] == m]
        floor = sum(r["floor_bytes"] for r in at_m) / bw * 1e6
        print(f"M={m}: current {sum(r['current_us'] for r in at_m):.1f} us, cuBLAS "
              f"{sum(r['cublas_fp16_us'] for r in at_m):.1f}, floor {floor:.1f} (4 shapes summed)")
        for i, e in enumerate(at_m[0]["gemv"]):
            ts = [r["gemv"][i].get("us") for r in at_m if i < len(r["gemv"])]
            if len(ts) == len(at_m) and None not in ts:
                print(f"   {sum(ts):7.1f} us ({100 * floor / sum(ts):.0f}% of copy)  {e['kind']} {e['config']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ms", default="1,2")
    p.add_argument("--budget", type=float, default=120.0, help="seconds; later candidates are skipped past it")
    args = p.parse_args()
    from qwen_awq.eval.peers import copy_bandwidth

    gen, deadline, bw = torch.Generator().manual_seed(5), time.time() + args.budget, copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_Bps": bw, "rows": []}
    for k, n in bk.SHAPES:
        result["rows"] += shape_rows(k, n, [int(v) for v in args.ms.split(",")], gen, deadline)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    totals(result["rows"], bw)


if __name__ == "__main__":
    main()
