"""Time every GEMV candidate of the sweep (bench_kernels_sweep.CUDA_GRID, GEMV_GRID) at M = 1 and 2 on Qwen-7B's four
shapes, next to the dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 1 row), without the
full sweep's MMA part. On the GPU machine from the repo root:
    python3 bench/gemv_candidates.py --out $OUT/gemv_candidates.json [--ms 1,2] [--budget 120]
Prints, per M, each candidate's total over the four shapes (the sweep's "any" rule) and the best per shape.
"""
from __future__ import annotations

from functools import partial

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.eval.bench_kernels_sweep import CUDA_GRID, GEMV_GRID
from qwen_awq.kernels import w4a16 as kern


def grid(m: int) -> list[tuple]:
    return ([("cuda", c, partial(kern.w4a16_nvrtc_only, config=c)) for c in CUDA_GRID.get(m, [])]
            + [("gemv", c, partial(kern.w4a16_gemv, config=c)) for c in GEMV_GRID.get(m, [])])


def main() -> None:
    bk.candidates_main(__doc__, "1,2", 120.0, grid)


if __name__ == "__main__":
    main()
