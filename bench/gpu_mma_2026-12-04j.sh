# Ran on the working tree before 2026-12-04k, when the A/B was the environment switch QWEN_AWQ_MMA_SCALE_AFTER
# (now CudaMmaConfig.scale_after); kept as the record of calls i and j (bench/results/w4a16_scale_after_H200_2026-12-04.md).
# One device call (issue 10), after call i: the tensor-core kernel's per-step scaling with the fold deferred past
# the next step's loads. Its GPU tests, its configs at M = 1..16 (more K warps and steps in flight for M <= 8) with
# the weight-scaled A/B, then batch-1 decode: the committed table with the weight-scaled kernel (the tree before
# SCALE_AFTER), and the table with this run's winners (bench/table_from_candidates.py) next to the int4 peer.
#   OUT=... bash bench/gpu_mma_2026-12-04j.sh
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
QWEN_AWQ_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x tests/test_w4a16_kernels.py -k "cuda" 2>&1 | tail -4
timeout 200 python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates.json --ms 1,2,4,8,16 --budget 175 \
  2>&1 | grep -A8 "^M="
python3 bench/table_from_candidates.py $OUT/mma_cuda_candidates.json --print
QWEN_AWQ_MMA_SCALE_AFTER=0 timeout 80 python3 -m qwen_awq.cli bench decode --synthetic qwen-7b --quant awq \
  --tokens 256 --batch 1 --runs 3 --json-out $OUT/decode_before.json 2>&1 | grep "qwen-awq |"
timeout 200 python3 bench/table_from_candidates.py $OUT/mma_cuda_candidates.json -- bench decode --synthetic qwen-7b \
  --quant awq --tokens 256 --batch 1 --runs 3 --peers int4 --json-out $OUT/decode_table.json 2>&1 | grep "| 1 |"
