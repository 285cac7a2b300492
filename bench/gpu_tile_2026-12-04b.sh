#!/bin/bash
# 2026-12-04 second GPU call (issues 10 and 12): the tiled NVRTC W4A16 kernel with its x offsets hoisted, tested
# on the GPU, its occupancy-minded configs (tile_cuda_candidates.py GRID_B) at M = 16..256, then Nsight Compute on
# one config at M = 128 (4096 x 22016) beside Triton's tensor-core kernel.
#   OUT=/some/dir bash bench/gpu_tile_2026-12-04b.sh        (repo root, wheels carried in .whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 QWEN_AWQ_TEST_DEVICE=cuda
timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_w4a16_kernels.py -k "cudatile" \
  > "$OUT/tile_gpu_tests.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/tile_gpu_tests.txt" | head -30
TILE_GRID=b timeout 280 python3 bench/tile_cuda_candidates.py --out "$OUT/tile_cuda_candidates_b.json" \
  --ms "${TILE_MS:-16,32,64,128,256}" --budget "${TILE_BUDGET:-220}" 2>&1 | tee "$OUT/tile_candidates_b.log" | grep -v "^== "
LOG=$OUT/ncu_tile.txt
for spec in "tile 4096 22016 128 {\"rb\":1,\"wn\":4,\"wk\":1,\"nt\":8,\"stages\":3}" \
            "mma 4096 22016 128 {\"block_m\":64,\"block_n\":64,\"waves\":2,\"scale_w\":true}"; do
  set -- $spec
  regex=$([ "$1" = tile ] && echo w4a16_tile || echo mma_kernel)
  echo "### $spec" >>"$LOG"
  timeout 100 ncu --clock-control none -k "regex:$regex" --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section SchedulerStats --section ComputeWorkloadAnalysis \
    python3 bench/w4a16_ncu_target.py "$@" >>"$LOG" 2>&1 || echo "ncu rc=$?" >>"$LOG"
done
grep -iE "^###|Duration|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|stall|spends|Pipe|ncu rc|ERR" "$LOG" | cut -c1-230 | head -60
