"""Time the NVRTC tensor-core W4A16 kernel's configs (kernels/w4a16_cuda_mma.py) at M = 2..64 on Qwen-7B's four
shapes, next to the dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 2..16 and 32..256
rows). On the GPU machine from the repo root:
    python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates.json [--ms 2,8,16,32,64] [--budget 200]
Prints per shape and M the best config, and per M each config's total over the four shapes.
"""
from __future__ import annotations

from functools import partial

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.w4a16_cuda_mma import CudaMmaConfig as C

X = True  # x_fragments first
GRID = [C(1, 1, 8), C(2, 1, 8), C(2, 1, 4), C(2, 1, 4, 2), C(1, 1, 8, 2),
        C(1, 1, 8, 1, X), C(2, 1, 8, 1, X), C(2, 1, 4, 1, X), C(1, 1, 4, 1, X), C(1, 1, 8, 2, X), C(2, 1, 4, 2, X),
        C(4, 1, 4, 1, X), C(1, 2, 4, 1, X), C(2, 2, 4, 1, X), C(4, 1, 2, 1, X), C(1, 1, 16, 1, X), C(4, 1, 2, 2, X)]


def grid(m: int) -> list[tuple]:
    return [("cudamma", c, partial(kern.w4a16_nvrtc_only, config=c)) for c in GRID]


def main() -> None:
    bk.candidates_main(__doc__, "2,8,16,32,64", 200.0, grid)


if __name__ == "__main__":
    main()
