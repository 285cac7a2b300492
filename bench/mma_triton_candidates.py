"""Time Triton tensor-core W4A16 tiles (kernels/w4a16_mma.py) at M = 64..256 on Qwen-7B's four shapes, next to the
dispatcher's current choice and fp16 cuBLAS, in one run (issue 10's M = 32..256 row; issue 12's batch-128 decode):
a wider grid than `bench kernels --sweep` holds for these M (K tiles of 64, 2..5 stages, 8 warps, 128-row tiles).
On the GPU machine from the repo root:
    python3 bench/mma_triton_candidates.py --out $OUT/mma_triton_candidates.json [--ms 64,128,256] [--budget 200]
Prints per shape and M the best config, and per M each config's total over the four shapes.
"""
from __future__ import annotations

from functools import partial

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.w4a16 import MmaConfig as C

# (block_m tokens, block_n weight rows, block_k, num_warps, num_stages, waves); the weights are scaled before the dot
T = [(64, 64, 128, 4, 3, 2), (64, 64, 64, 4, 4, 2), (64, 64, 64, 4, 3, 2), (64, 64, 128, 4, 2, 2),
     (64, 64, 128, 4, 4, 2), (64, 64, 128, 8, 3, 2), (64, 64, 128, 4, 3, 1), (64, 128, 128, 8, 3, 2),
     (64, 128, 64, 8, 4, 2), (64, 128, 128, 4, 3, 2), (128, 64, 128, 4, 3, 2), (128, 64, 64, 4, 4, 2),
     (128, 128, 64, 8, 3, 2), (128, 128, 128, 8, 2, 2), (32, 64, 128, 4, 3, 2), (128, 64, 128, 8, 3, 2),
     (64, 64, 64, 4, 5, 4), (128, 128, 64, 8, 4, 1)]
GRID = [C(block_m=bm, block_n=bn, block_k=bk_, num_warps=nw, num_stages=ns, waves=wv, scale_w=True)
        for bm, bn, bk_, nw, ns, wv in T]


def grid(m: int) -> list[tuple]:
    return [("mma", c, partial(kern.w4a16_mma, config=c)) for c in GRID]


def main() -> None:
    bk.candidates_main(__doc__, "64,128,256", 200.0, grid)


if __name__ == "__main__":
    main()
