"""The add + RMSNorm fold (kernels/w4a16_cuda_norm.py) against what it replaces, at Qwen-7B's o_proj and down_proj
shapes, M = 1, on the H200 table's launch: per call, from one CUDA graph over rotated weights (L2 never holds
them; eval/bench_kernels_common.time_rotated), the NVRTC GEMV alone, the GEMV then the separate Triton add +
RMSNorm (today's path), and the folded kernel; with the fold's h checked bit for bit against the separate path.

  python3 bench/norm_fold_bench.py --out DIR [--dtype fp16 bf16]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qwen_awq.eval.bench_kernels_common import rotated_layers, time_rotated
from qwen_awq.kernels.rms_norm import fused_add_rms_norm
from qwen_awq.kernels.w4a16 import w4a16_nvrtc_only
from qwen_awq.kernels.w4a16_cuda import CudaGemvConfig
from qwen_awq.kernels.w4a16_cuda_norm import w4a16_add_norm

SHAPES = [(4096, 4096), (11008, 4096)]  # (K, N): o_proj, down_proj
CONFIG = CudaGemvConfig(rows=2, unroll=4, warps=8)  # the H200 table's M = 1 entry for both (kernels/w4a16_tuned.py)
EPS = 1e-6  # Qwen-7B's layer_norm_epsilon


def shape_row(k: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    layers, _ = rotated_layers(k, n, gen)  # fp16 scales, as the checkpoints store them
    x = torch.randn(1, k, generator=gen).to(dtype).cuda()
    residual = torch.randn(1, n, generator=gen).to(dtype).cuda()
    weight = (torch.rand(n, generator=gen) + 0.5).to(dtype).cuda()

    def gemv(x, w):
        return w4a16_nvrtc_only(x, w, config=CONFIG)

    def separate(x, w):
        return fused_add_rms_norm(gemv(x, w), residual, weight, EPS)

    def folded(x, w):
        return w4a16_add_norm(x, w, None, residual, weight, EPS, CONFIG)

    fold_out, ref = folded(x, layers[0]), separate(x, layers[0])
    row = {"k": k, "n": n, "dtype": str(dtype).removeprefix("torch."),
           "h_exact": bool(torch.equal(fold_out[1], ref[1])),
           "normed_max_abs_diff": float((fold_out[0].float() - ref[0].float()).abs().max()),
           "counter_clean": int(layers[0].locks.abs().sum()) == 0}
    for name, call in (("gemv_us", gemv), ("gemv_then_add_norm_us", separate), ("folded_us", folded)):
        row[name] = time_rotated(call, x, layers)
    row["saved_us"] = row["gemv_then_add_norm_us"] - row["folded_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", nargs="+", default=["fp16"], choices=["fp16", "bf16"])
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.dtype:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        for k, n in SHAPES:
            rows.append(shape_row(k, n, dtype, gen))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_fold_bench.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                         indent=1))


if __name__ == "__main__":
    main()
