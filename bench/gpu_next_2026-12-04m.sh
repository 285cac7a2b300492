# A device call for the next session (written 2026-12-04, not yet run): issue 12's offline row on a fresh machine
# (the warm-up through the prefill phase, 83f0d7b, unmeasured on the GPU), then issue 10's buckets this session's
# sweep left out: the tensor-core kernel at M = 4 and 64 with and without scale_after next to the table's choice,
# and the table lines of the winners (bench/table_from_candidates.py --print; --write TAG puts them in).
#   OUT=... bash bench/gpu_next_2026-12-04m.sh
TOTAL_BUDGET=${TOTAL_BUDGET:-200} bash bench/gpu_final.sh copy throughput
source bench/device_env.sh
timeout 200 python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates_m.json --ms 4,64 --budget 170 \
  > $OUT/candidates_log.txt 2>&1; grep -A6 "^M=" $OUT/candidates_log.txt | cut -c1-160
python3 bench/table_from_candidates.py $OUT/mma_cuda_candidates_m.json --print
