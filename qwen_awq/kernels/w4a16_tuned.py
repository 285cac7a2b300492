"""Measured W4A16 kernel choices per card: {card name: {"command", "date", "table": {(K, N): {M bucket: choice}}}}.

Written from `python3 -m qwen_awq.eval.bench_kernels --sweep` (bench/results/awq_kernel_H200_w4a16.md); a choice is
("gemv", GemvConfig fields), ("mma", MmaConfig fields), ("cuda", CudaGemvConfig fields), ("cudamma",
CudaMmaConfig fields) or ("dense", None); the NVRTC entries (cuda, cudamma) come from bench/gemv_candidates.py and
bench/mma_cuda_candidates.py, and the Triton MMA entries at M = 64 and 128 from bench/mma_triton_candidates.py; "any"
holds, per bucket, the choice with
the least total time over Qwen-7B's four shapes. Cards and shapes not listed take w4a16.default_choice.
"""

# ruff: noqa: E501  (a measured data table: one entry per line)
from __future__ import annotations

TUNED: dict[str, dict] = {
    "NVIDIA H200": {
        # on the lent machine, from the repo root: OUT=... bash bench/w4a16_device_run.sh 75 --sweep
        "command": "python3 -m qwen_awq.eval.bench_kernels --out $OUT/awq_kernel_H200_w4a16.json --sweep",
        "date": "2026-12-02",
        "table": {
            "any": {
                1: ("gemv", {"block_n": 8, "lanes": 128, "chunks": 1, "num_warps": 4, "prefetch": True, "progs_per_sm": 3, "block_m": 1}),
                2: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 1, "xperm": False}),
                4: ("cudamma", {"rb": 1, "wn": 1, "wk": 16, "unroll": 1, "xperm": True}),
                8: ("cudamma", {"rb": 1, "wn": 1, "wk": 16, "unroll": 1, "xperm": True}),
                16: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 1, "xperm": True}),
                32: ("mma", {"block_m": 32, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "scale_w": True}),
                64: ("mma", {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 119.0 us over the four shapes, table before 127.9 (mma_triton_candidates_H200_2026-12-04)
                128: ("mma", {"block_m": 128, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 175.6 us over the four shapes, 64-row tiles 196.0-198.1 (mma_triton_candidates_H200_2026-12-04)
                256: ("dense", None),  # measured: the MMA won the total by 4% but lost 4096 x 4096 by 15%
                512: ("dense", None),
            },
            (4096, 12288): {
                1: ("cudamma", {"rb": 2, "wn": 1, "wk": 8, "unroll": 1, "xperm": False, "scale_after": True}),  # 12.4 us, table before 13.0 (mma_cuda_candidates_H200_2026-12-04k)
                2: ("cudamma", {"rb": 2, "wn": 1, "wk": 8, "unroll": 1, "xperm": False, "scale_after": True}),  # 12.6 us, table before 13.4 (mma_cuda_candidates_H200_2026-12-04k)
                4: ("cudamma", {"rb": 2, "wn": 1, "wk": 8, "unroll": 1, "xperm": False}),  # 13.4 us, Triton 22.6 (mma_cuda_candidates_H200_2026-12-03)
                8: ("cudamma", {"rb": 2, "wn": 1, "wk": 8, "unroll": 1, "xperm": False, "scale_after": True}),  # 12.7 us, table before 13.5 (mma_cuda_candidates_H200_2026-12-04k)
                16: ("cudamma", {"rb": 1, "wn": 1, "wk": 4, "unroll": 1, "xperm": True, "scale_after": True}),  # 17.0 us, table before 17.8 (mma_cuda_candidates_H200_2026-12-04k)
                32: ("cudamma", {"rb": 2, "wn": 1, "wk": 4, "unroll": 1, "xperm": True, "scale_after": True}),  # 20.1 us, table before 21.0 (mma_cuda_candidates_H200_2026-12-04k)
                64: ("mma", {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "scale_w": True}),
                128: ("mma", {"block_m": 128, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 40.3 us, 64-row tiles 43.3 (mma_triton_candidates_H200_2026-12-04)
                256: ("dense", None),
                512: ("dense", None),
            },
            (4096, 4096): {
                1: ("cudamma", {"rb": 1, "wn": 1, "wk": 16, "unroll": 2, "xperm": False, "scale_after": False}),  # 6.5 us, table before 7.5 (mma_cuda_candidates_H200_2026-12-04k)
                2: ("cudamma", {"rb": 1, "wn": 2, "wk": 16, "unroll": 1, "xperm": False, "scale_after": True}),  # 6.7 us, table before 7.5 (mma_cuda_candidates_H200_2026-12-04k)
                4: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 2, "xperm": False}),  # 7.8 us, Triton 10.3 (mma_cuda_candidates_H200_2026-12-03)
                8: ("cudamma", {"rb": 1, "wn": 2, "wk": 16, "unroll": 1, "xperm": False, "scale_after": True}),  # 7.1 us, table before 7.8 (mma_cuda_candidates_H200_2026-12-04k)
                16: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 1, "xperm": False}),  # 9.3 us, Triton 10.6 (mma_cuda_candidates_H200_2026-12-03)
                32: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 1, "xperm": True}),  # 11.0 us, Triton 12.8 (mma_cuda_candidates_H200_2026-12-03)
                64: ("mma", {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 15.0 us, dense 20.8 (mma_triton_candidates_H200_2026-12-04)
                128: ("mma", {"block_m": 128, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 21.4 us, 64-row tiles 22.0 (mma_triton_candidates_H200_2026-12-04)
                256: ("dense", None),
                512: ("dense", None),
            },
            (4096, 22016): {
                1: ("gemv", {"block_n": 8, "lanes": 128, "chunks": 1, "num_warps": 4, "prefetch": True, "progs_per_sm": 3, "block_m": 1}),
                2: ("cudamma", {"rb": 2, "wn": 2, "wk": 4, "unroll": 1, "xperm": False, "scale_after": True}),  # 21.5 us, table before 22.4 (mma_cuda_candidates_H200_2026-12-04k)
                4: ("cudamma", {"rb": 2, "wn": 1, "wk": 4, "unroll": 1, "xperm": False}),  # 22.5 us, Triton 35.7 (mma_cuda_candidates_H200_2026-12-03)
                8: ("cudamma", {"rb": 2, "wn": 2, "wk": 4, "unroll": 1, "xperm": False, "scale_after": True}),  # 21.9 us, table before 22.6 (mma_cuda_candidates_H200_2026-12-04k)
                16: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 1, "xperm": True}),  # 27.7 us, Triton 36.3 (mma_cuda_candidates_H200_2026-12-03)
                32: ("cudamma", {"rb": 2, "wn": 1, "wk": 4, "unroll": 1, "xperm": True, "scale_after": True}),  # 35.0 us, table before 36.8 (mma_cuda_candidates_H200_2026-12-04k)
                64: ("mma", {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "scale_w": True}),
                128: ("mma", {"block_m": 128, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4, "waves": 2, "scale_w": True}),  # 68.9 us, 64-row tiles 83.1 (mma_triton_candidates_H200_2026-12-04)
                256: ("mma", {"block_m": 128, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),
                512: ("dense", None),
            },
            (11008, 4096): {
                1: ("cudamma", {"rb": 1, "wn": 2, "wk": 16, "unroll": 1, "xperm": False, "scale_after": True}),  # 13.0 us, table before 15.2 (mma_cuda_candidates_H200_2026-12-04k)
                2: ("cudamma", {"rb": 1, "wn": 2, "wk": 16, "unroll": 1, "xperm": False, "scale_after": True}),  # 13.1 us, table before 15.5 (mma_cuda_candidates_H200_2026-12-04k)
                4: ("cudamma", {"rb": 1, "wn": 1, "wk": 16, "unroll": 1, "xperm": True}),  # 15.6 us, Triton 19.8 (mma_cuda_candidates_H200_2026-12-03)
                8: ("cudamma", {"rb": 1, "wn": 2, "wk": 16, "unroll": 1, "xperm": False, "scale_after": True}),  # 13.5 us, table before 15.5 (mma_cuda_candidates_H200_2026-12-04k)
                16: ("cudamma", {"rb": 1, "wn": 1, "wk": 8, "unroll": 1, "xperm": True, "scale_after": True}),  # 18.0 us, table before 18.9 (mma_cuda_candidates_H200_2026-12-04k)
                32: ("mma", {"block_m": 32, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 4, "scale_w": True}),
                64: ("mma", {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 28.5 us, waves 4 35.8 (mma_triton_candidates_H200_2026-12-04)
                128: ("mma", {"block_m": 128, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),  # 40.1 us, 64-row tiles 47.5 (mma_triton_candidates_H200_2026-12-04)
                256: ("mma", {"block_m": 128, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3, "waves": 2, "scale_w": True}),
                512: ("dense", None),
            },
        },
    },
}

# The NVRTC dense GEMV (kernels/dense_gemv_cuda.py) per card and (K, N), at M <= 4: only where it beat cuBLAS.
DENSE_GEMV: dict[str, dict[tuple[int, int], dict]] = {
    "NVIDIA H200": {  # bench/dense_gemv_candidates.py, 2026-12-03 (gemv_cuda_H200_2026-12-03.md); M = 1 (M = 2)
        (4096, 4096): {"rows": 1, "unroll": 4, "warps": 4},  # 12.7 (13.0) us vs cuBLAS 14.0 (14.1)
        (4096, 151936): {"rows": 2, "unroll": 2, "warps": 4},  # the lm_head: 287.5 (290.2) vs 299.2 (300.1)
    },
}
