"""The NVRTC dense GEMV (kernels/dense_gemv_cuda.py) against cuBLAS (F.linear) at M = 1 / 2 on Qwen-7B's four fp16
shapes and the lm_head, each candidate checked first (issue 10's fp16 row: what w4a16_tuned.DENSE_GEMV holds).
On the GPU machine from the repo root:
    python3 bench/dense_gemv_candidates.py --out $OUT/dense_gemv.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels.dense_gemv_cuda import dense_gemv
from qwen_awq.kernels.w4a16_cuda import CudaGemvConfig

LM_HEAD = (4096, 151936)  # Qwen-7B's vocabulary projection, fp16 in the AWQ model too
CONFIGS = [CudaGemvConfig(rows=r, unroll=u, warps=w)
           for r, u, w in ((1, 4, 4), (2, 4, 4), (2, 2, 4), (4, 2, 4), (1, 8, 4), (2, 4, 8), (4, 4, 4), (1, 4, 8))]


def host_costs(calls: int = 2000) -> dict[str, float]:
    """Host microseconds per eager launch (what an uncaptured decode pays per Linear): NVRTC kernel vs F.linear."""
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    out = {}
    calls_by_name = {"nvrtc": lambda: dense_gemv(x, w, None, CudaGemvConfig()), "cublas": lambda: F.linear(x, w)}
    for name, call in calls_by_name.items():
        call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        out[name] = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ms", default="1,2")
    args = p.parse_args()
    from qwen_awq.eval.peers import copy_bandwidth

    gen, bw, rows = torch.Generator().manual_seed(11), copy_bandwidth(), []
    for k, n in [*bk.SHAPES, LM_HEAD]:
        weights = [w * 0.05 for w in bk.dense_copies(k, n, gen)]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, generator=gen).half().cuda()
            ref = x.double() @ weights[0].double().t()
            row = {"K": k, "N": n, "M": m, "floor_us": 2 * (k * n + m * (k + n)) / bw * 1e6,
                   "cublas_us": bk.time_rotated(lambda x_, w: F.linear(x_, w), x, weights), "configs": []}
            for cfg in CONFIGS:
                y = dense_gemv(x, weights[0], None, cfg)
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                call = lambda x_, w, c=cfg: dense_gemv(x_, w, None, c)  # noqa: E731
                us = bk.time_rotated(call, x, weights) if err < 2e-3 else None
                row["configs"].append({"config": [cfg.rows, cfg.unroll, cfg.warps], "err": err, "us": us})
            rows.append(row)
            best = min((c for c in row["configs"] if c["us"]), key=lambda c: c["us"])
            print(f"K={k} N={n} M={m}: cuBLAS {row['cublas_us']:.1f} us, best {best['us']:.1f} {best['config']}, "
                  f"floor {row['floor_us']:.1f}", flush=True)
    host = host_costs()
    print(f"host time per eager call (us): {host}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_Bps": bw, "rows": rows, "host_us": host}, f, indent=1)
    for m in sorted({r["M"] for r in rows}):
        at_m = [r for r in rows if r["M"] == m and (r["K"], r["N"]) != LM_HEAD]
        print(f"M={m}: cuBLAS {sum(r['cublas_us'] for r in at_m):.1f} us, floor {sum(r['floor_us'] for r in at_m):.1f}")
        for i, cfg in enumerate(CONFIGS):
            ts = [r["configs"][i]["us"] for r in at_m]
            if None not in ts:
                print(f"   {sum(ts):7.1f} us  {cfg}")


if __name__ == "__main__":
    main()
