# One device call (issue 10), after calls i and j: CudaMmaConfig.scale_after per config (a field, no longer an
# environment switch). The tensor-core kernel's GPU tests, every config at M = 1, 2, 8, 16, 32 with and without
# scale_after next to the committed table's choice, then decode at batch 1 and 32: the committed table (AWQ), and
# the table with this run's winners (bench/table_from_candidates.py; AWQ and fp16, the int4 peer at batch 1).
#   OUT=... bash bench/gpu_mma_2026-12-04k.sh
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
QWEN_AWQ_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x tests/test_w4a16_kernels.py -k "cuda" 2>&1 | tail -4
timeout 230 python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates.json --ms 1,2,8,16,32 --budget 200 \
  > $OUT/candidates_log.txt 2>&1; grep "^M=\|^==" $OUT/candidates_log.txt | grep "^M=" ; tail -3 $OUT/candidates_log.txt
python3 bench/table_from_candidates.py $OUT/mma_cuda_candidates.json --print
timeout 90 python3 -m qwen_awq.cli bench decode --synthetic qwen-7b --quant awq --tokens 256 --batch 1 32 --runs 3 \
  --json-out $OUT/decode_before.json 2>&1 | grep "qwen-awq |"
timeout 230 python3 bench/table_from_candidates.py $OUT/mma_cuda_candidates.json -- bench decode --synthetic qwen-7b \
  --quant awq none --tokens 256 --batch 1 32 --runs 3 --peers int4 --peer-batch 1 --json-out $OUT/decode_table.json \
  2>&1 | grep "^| "
