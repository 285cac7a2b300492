# Ran on the working tree before 2026-12-04k, when the A/B was the environment switch QWEN_AWQ_MMA_SCALE_AFTER
# (now CudaMmaConfig.scale_after); kept as the record of calls i and j (bench/results/w4a16_scale_after_H200_2026-12-04.md).
# One device call (issue 10): the NVRTC tensor-core kernel with its per-step scaling (SCALE_AFTER): its GPU tests
# against float64 oracles, its configs at M = 1..32 next to the weight-scaled path (cudamma_ws) and the dispatcher's
# current choice, and batch-1 decode with SCALE_AFTER on / off. From the repo root:
#   OUT=... bash bench/gpu_mma_2026-12-04i.sh
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
QWEN_AWQ_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x tests/test_w4a16_kernels.py -k "cuda" 2>&1 | tail -6
timeout 260 python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates.json --ms 1,2,8,16,32 --budget 230 \
  2>&1 | tail -75
for sa in 1 0; do
  QWEN_AWQ_MMA_SCALE_AFTER=$sa timeout 90 python3 -m qwen_awq.cli bench decode --synthetic qwen-7b --quant awq \
    --tokens 256 --batch 1 --runs 3 --json-out $OUT/decode_sa$sa.json 2>&1 | tail -4
done
