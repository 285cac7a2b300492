"""Time the NVRTC tensor-core W4A16 kernel's configs (kernels/w4a16_cuda_mma.py) at M = 2..64 on Qwen-7B's four
shapes, next to the dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 2..16 and 32..256
rows). On the GPU machine from the repo root:
    python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates.json [--ms 2,8,16,32,64] [--budget 200]
Prints per shape and M the best config, and per M each config's total over the four shapes.
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
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.w4a16_cuda_mma import CudaMmaConfig as C

X = True  # x_fragments first
GRID = [C(1, 1, 8), C(2, 1, 8), C(2, 1, 4), C(2, 1, 4, 2), C(1, 1, 8, 2),
        C(1, 1, 8, 1, X), C(2, 1, 8, 1, X), C(2, 1, 4, 1, X), C(1, 1, 4, 1, X), C(1, 1, 8, 2, X), C(2, 1, 4, 2, X),
        C(4, 1, 4, 1, X), C(1, 2, 4, 1, X), C(2, 2, 4, 1, X), C(4, 1, 2, 1, X), C(1, 1, 16, 1, X), C(4, 1, 2, 2, X)]


def shape_rows(k: int, n: int, ms: list[int], gen: torch.Generator, deadline: float) -> list[dict]:
    layers, ref_w = bk.rotated_layers(k, n, gen)
    dense = bk.dense_copies(k, n, gen)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).half().cuda()
        row = {"K": k, "N": n, "M": m, "floor_bytes": bk.w4_bytes(k, n, m),
               "cublas_fp16_us": bk.time_rotated(lambda x_, w: F.linear(x_, w), x, dense, rep_ms=25),
               "current_us": bk.time_rotated(kern.w4a16_triton, x, layers, rep_ms=25), "cudamma": []}
        for cfg in GRID:
            if time.time() > deadline:
                break
            row["cudamma"].append({"config": dataclasses.asdict(cfg), **bk.timed_candidate(
                partial(kern.w4a16_nvrtc_only, config=cfg), x, layers, ref_w)})
        rows.append(row)
        best = min((e for e in row["cudamma"] if "us" in e), key=lambda e: e["us"], default=None)
        if best is None:
            failures = [e.get("error", e.get("err")) for e in row["cudamma"]][:2]
            print(f"== K={k} N={n} M={m}: no config passed: {failures}", flush=True)
            continue
        print(f"== K={k} N={n} M={m}: cuBLAS {row['cublas_fp16_us']:.1f} current {row['current_us']:.1f} "
              f"best {best['us']:.1f} ({row['cublas_fp16_us'] / best['us']:.2f}x cuBLAS) {best['config']}",
              flush=True)
    return rows


def totals(rows: list[dict], bw: float) -> None:
    for m in sorted({r["M"] for r in rows}):
        at_m = [r for r in rows if r["M"] == m]
        floor = sum(r["floor_bytes"] for r in at_m) / bw * 1e6
        cublas = sum(r["cublas_fp16_us"] for r in at_m)
        print(f"M={m}: current {sum(r['current_us'] for r in at_m):.1f} us, cuBLAS {cublas:.1f}, floor {floor:.1f}")
        for i, e in enumerate(at_m[0]["cudamma"]):
            ts = [r["cudamma"][i].get("us") for r in at_m if i < len(r["cudamma"])]
            if len(ts) == len(at_m) and None not in ts:
                print(f"   {sum(ts):7.1f} us ({100 * floor / sum(ts):.0f}% of copy, {cublas / sum(ts):.2f}x cuBLAS)"
                      f"  {e['config']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ms", default="2,8,16,32,64")
    p.add_argument("--budget", type=float, default=200.0, help="seconds; later candidates are skipped past it")
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
