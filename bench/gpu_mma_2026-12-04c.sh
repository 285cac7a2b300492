#!/bin/bash
# 2026-12-04 third GPU call (issues 10 and 12): a wider grid of Triton tensor-core W4A16 tiles at M = 64..256.
#   OUT=/some/dir bash bench/gpu_mma_2026-12-04c.sh        (repo root, wheels carried in .whl)
source bench/device_env.sh
timeout 300 python3 bench/mma_triton_candidates.py --out "$OUT/mma_triton_candidates.json" --ms "${MMA_MS:-64,128,256}" \
  --budget "${MMA_BUDGET:-240}" 2>&1 | tee "$OUT/mma_triton_candidates.log" | tail -75
