"""Focused tile experiment for the tensor-core W4A16 kernel at batch-like M (issue 10: M >= 64 ran at 0.6-0.7x fp16
cuBLAS on the H200, bench/results/awq_kernel_H200_w4a16.md), on the GPU machine from the repo root:
    python3 bench/mma_tiles.py --out $OUT/mma_tiles.json [--ms 64,128,256] [--budget 120]

Offline SASS of the 64 x 64 tile (bench/kernel_asm.py, sm_90): wgmma with the dequantized weights as the register
operand, weights staged by cp.async; per 128-k step each thread spends ~100 ALU instructions on its 64 weights
(LOP3 + HADD2 + HMUL2) and ~110 on addresses/predicates. At M = 128 a 64-row N tile re-reads x (1 MB) from L2 per
tile: 192 MB of L2 reads at N = 12288. Larger N tiles cut both the x re-reads and the per-weight ALU share per MAC;
this times them (each checked against the exact dequantized reference first) next to dense + cuBLAS and cuBLAS
fp16 in the same run.
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

Mc = kern.MmaConfig
CANDIDATES = {  # per M: the tuned choice first (w4a16_tuned "any"), then larger tiles
    64: [Mc(block_m=64, block_n=64, waves=4, scale_w=True), Mc(block_m=64, block_n=128, num_warps=4, waves=2,
         scale_w=True), Mc(block_m=64, block_n=128, num_warps=8, waves=2, scale_w=True),
         Mc(block_m=64, block_n=256, num_warps=8, waves=2, scale_w=True),
         Mc(block_m=64, block_n=128, num_warps=4, num_stages=4, waves=2, scale_w=True)],
    128: [Mc(block_m=64, block_n=64, waves=2, scale_w=True), Mc(block_m=128, block_n=64, waves=2, scale_w=True),
          Mc(block_m=128, block_n=64, num_stages=4, waves=2, scale_w=True),
          Mc(block_m=128, block_n=64, num_warps=8, waves=2, scale_w=True),
          Mc(block_m=128, block_n=128, num_warps=8, waves=2, scale_w=True),
          Mc(block_m=128, block_n=128, num_warps=8, waves=1, scale_w=True),
          Mc(block_m=128, block_n=256, num_warps=8, waves=1, scale_w=True),
          Mc(block_m=64, block_n=128, num_warps=4, waves=2, scale_w=True),
          Mc(block_m=64, block_n=256, num_warps=8, waves=2, scale_w=True),
          Mc(block_m=128, block_n=128, num_warps=8, num_stages=4, waves=2, scale_w=True),
          Mc(block_m=128, block_n=128, num_warps=8, waves=2, scale_w=False)],
    256: [Mc(block_m=128, block_n=64, waves=2, scale_w=True), Mc(block_m=128, block_n=128, num_warps=8, waves=2,
          scale_w=True), Mc(block_m=128, block_n=256, num_warps=8, waves=1, scale_w=True),
          Mc(block_m=256, block_n=128, num_warps=8, waves=1, scale_w=True),
          Mc(block_m=128, block_n=128, num_warps=8, num_stages=4, waves=1, scale_w=True)],
}


def _time(fn, x, layers) -> float:
    return bk.time_rotated(fn, x, layers, rep_ms=25)


def shape_rows(k: int, n: int, ms: list[int], gen: torch.Generator, deadline: float) -> list[dict]:
    layers, ref_w = bk.rotated_layers(k, n, gen)
    dense_ws = bk.dense_copies(k, n, gen)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).half().cuda()
        row = {"K": k, "N": n, "M": m, "cublas_fp16_us": _time(lambda x_, w: F.linear(x_, w), x, dense_ws),
               "dense_us": _time(lambda x_, w: kern.w4a16_dense(x_, w), x, layers), "mma": []}
        for cfg in CANDIDATES[m]:
            if time.time() > deadline:
                break
            entry = {"config": dataclasses.asdict(cfg),
                     **bk.timed_candidate(partial(kern.w4a16_mma, config=cfg), x, layers, ref_w)}
            row["mma"].append(entry)
            print(f"K={k} N={n} M={m} {cfg}: {entry.get('us', entry)}", flush=True)
        rows.append(row)
        best = min((e["us"] for e in row["mma"] if "us" in e), default=float("nan"))
        print(f"== K={k} N={n} M={m}: cuBLAS {row['cublas_fp16_us']:.1f} dense {row['dense_us']:.1f} "
              f"best mma {best:.1f} us", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ms", default="64,128,256")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; later candidates are skipped past it")
    args = p.parse_args()
    gen, deadline = torch.Generator().manual_seed(3), time.time() + args.budget
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for k, n in bk.SHAPES:
        result["rows"] += shape_rows(k, n, [int(v) for v in args.ms.split(",")], gen, deadline)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
