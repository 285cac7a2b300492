#!/bin/bash
# The 2026-12-04 closing GPU call (issues 10 and 12): the W4A16 kernels' GPU tests (the Triton tensor-core kernel
# at the new 128-row tiles included), then gpu_final.sh's copy, gputests, decode, throughput, kernels (no attention;
# M = 1, 16, 32, 64, 128) and serve sections on the tree with the H200 table's new M = 64 / 128 entries
# (bench/results/gpu_final_H200_2026-12-04.md).
#   OUT=/some/dir bash bench/gpu_final_2026-12-04.sh        (repo root, wheels carried in .whl, vocab in .devcache)
source bench/device_env.sh
QWEN_AWQ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_w4a16_kernels.py \
  -k "mma or auto or dense" > $OUT/w4a16_gpu_tests.txt 2>&1
grep -E "^(FAILED|E )|passed|failed" $OUT/w4a16_gpu_tests.txt | head -20
SKIP_ATTENTION=1 KERNEL_MS=${KERNEL_MS:-1,16,32,64,128} KERNELS_CAP=90 TOTAL_BUDGET=${TOTAL_BUDGET:-460} \
  bash bench/gpu_final.sh copy gputests decode throughput kernels serve
