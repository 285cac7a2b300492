"""Time the NVRTC tiled tensor-core W4A16 kernel's configs (kernels/w4a16_cuda_tile.py) at M = 16..256 on Qwen-7B's
four shapes, next to the dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 2..16 and 32..256
rows, issue 12's batch-128 decode). On the GPU machine from the repo root:
    [TILE_GRID=a|b] python3 bench/tile_cuda_candidates.py --out $OUT/tile_cuda_candidates.json [--ms 16,32,64,128,256]
        [--budget 240]
Prints per shape and M the best config, and per M each config's total over the four shapes.
"""
from __future__ import annotations

import os
from functools import partial

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.w4a16_cuda_tile import CudaTileConfig as C

# (rb, wn, wk, nt, stages): rows per block 16 rb wn, tokens per block 8 nt (fewer where M is smaller). GRID_A is
# the first call's (gpu_tile_H200_2026-12-04.md: 8 warps per SM at most); GRID_B the occupancy-minded second.
GRID_A = [C(2, 4, 1, 8, 4), C(1, 4, 1, 8, 4), C(1, 4, 2, 8, 4), C(2, 2, 2, 8, 4), C(1, 8, 1, 8, 3), C(2, 4, 1, 16, 3),
          C(1, 4, 1, 16, 4), C(4, 2, 1, 8, 3), C(2, 4, 1, 8, 6), C(1, 2, 4, 8, 4), C(1, 4, 4, 4, 4), C(2, 2, 1, 8, 4)]
GRID_B = [C(1, 4, 1, 8, 2), C(1, 4, 1, 8, 3), C(1, 8, 1, 8, 3), C(1, 8, 1, 8, 2), C(1, 16, 1, 8, 2), C(1, 4, 2, 8, 2),
          C(1, 8, 2, 4, 3), C(1, 4, 2, 4, 3), C(1, 2, 4, 2, 4), C(1, 2, 1, 8, 3), C(2, 2, 2, 8, 4), C(1, 2, 4, 8, 4),
          C(1, 8, 1, 16, 2), C(1, 2, 4, 4, 3)]
GRIDS = {"a": GRID_A, "b": GRID_B}
GRID = GRIDS[os.environ.get("TILE_GRID", "b")]


def grid(m: int) -> list[tuple]:
    return [("cudatile", c, partial(kern.w4a16_nvrtc_only, config=c)) for c in GRID]


def main() -> None:
    bk.candidates_main(__doc__, "16,32,64,128,256", 240.0, grid)


if __name__ == "__main__":
    main()
