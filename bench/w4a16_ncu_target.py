"""A few plain launches of one W4A16 kernel for Nsight Compute to profile (no CUDA graph, no timing loop):
    ncu --clock-control none -k regex:mma_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy python3 bench/w4a16_ncu_target.py mma 4096 12288 128 \
        '{"block_m": 64, "block_n": 64, "waves": 2, "scale_w": true}'
kind is gemv or mma; the config is the GemvConfig / MmaConfig fields as JSON (empty: the dispatcher's choice).
"""
from __future__ import annotations

import json
import sys

import torch

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16 as kern


def main() -> None:
    kind, k, n, m = sys.argv[1], *map(int, sys.argv[2:5])
    params = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    gen = torch.Generator().manual_seed(0)
    w = bk.random_layer(k, n, gen)[1]
    x = torch.randn(m, k, generator=gen).half().cuda()
    for _ in range(4):
        if kind == "gemv":
            kern.w4a16_gemv(x, w, config=kern.GemvConfig(**params) if params else None)
        else:
            kern.w4a16_mma(x, w, config=kern.MmaConfig(**params) if params else None)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
