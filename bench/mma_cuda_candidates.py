"""Time the NVRTC tensor-core W4A16 kernel's configs (kernels/w4a16_cuda_mma.py) at M = 1..64 on Qwen-7B's four
shapes, next to the dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 2..16 and 32..256
rows), each config with and without scale_after (an A/B in one run). On the GPU machine from the repo root:
    python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates.json [--ms 1,2,8,16,32,64] [--budget 200]
Prints per shape and M the best config, and per M each config's total over the four shapes.
"""
from __future__ import annotations

import dataclasses
from functools import partial

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.w4a16_cuda_mma import CudaMmaConfig as C

X = True  # x_fragments first
GRID = [C(1, 1, 8), C(2, 1, 8), C(2, 1, 4), C(2, 1, 4, 2), C(1, 1, 8, 2),
        C(1, 1, 8, 1, X), C(2, 1, 8, 1, X), C(2, 1, 4, 1, X), C(1, 1, 4, 1, X), C(1, 1, 8, 2, X), C(2, 1, 4, 2, X),
        C(4, 1, 4, 1, X), C(1, 2, 4, 1, X), C(2, 2, 4, 1, X), C(4, 1, 2, 1, X), C(1, 1, 16, 1, X), C(4, 1, 2, 2, X)]


# M <= 8 (one 8-token tile): the GRID's better half at M = 1 (2026-12-04i call 1), more K warps and more steps in
# flight per warp, which the x tile no longer limits
SMALL_M = [C(1, 1, 8), C(2, 1, 8), C(1, 1, 8, 2), C(1, 1, 8, 1, X), C(1, 1, 16, 1, X), C(1, 1, 16, 2),
           C(1, 1, 16, 4), C(2, 1, 16, 2), C(2, 2, 8), C(2, 2, 4, 2), C(1, 2, 8, 2),
           C(1, 2, 16), C(1, 1, 8, 4), C(2, 1, 8, 2), C(4, 1, 8), C(2, 2, 4), C(2, 1, 16)]
def grid(m: int) -> list[tuple]:
    """Each config twice: scaling each dequantized weight, then each 128-k step's sums (scale_after)."""
    configs = SMALL_M if m <= 8 else GRID
    configs = configs + [dataclasses.replace(c, scale_after=True) for c in configs]
    return [("cudamma", c, partial(kern.w4a16_nvrtc_only, config=c)) for c in configs]


def main() -> None:
    bk.candidates_main(__doc__, "1,2,8,16,32,64", 200.0, grid)


if __name__ == "__main__":
    main()
