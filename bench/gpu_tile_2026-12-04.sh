#!/bin/bash
# 2026-12-04 first GPU call (issues 10 and 12): the tiled NVRTC W4A16 kernel (kernels/w4a16_cuda_tile.py) tested
# against the float64 oracle on the GPU, the token statistics' and overlapped engine's GPU tests (fixed test-side
# after the last session's run), then the tiled kernel's configs at M = 16..256 on Qwen-7B's shapes.
#   OUT=/some/dir bash bench/gpu_tile_2026-12-04.sh        (repo root, wheels carried in .whl, vocab in .devcache)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 QWEN_AWQ_TEST_DEVICE=cuda
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_w4a16_kernels.py -k "cudatile or nvrtc" \
  > "$OUT/tile_gpu_tests.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/tile_gpu_tests.txt" | head -30
timeout 120 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_token_stats.py tests/test_engine_overlap.py \
  > "$OUT/engine_gpu_tests.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/engine_gpu_tests.txt" | head -20
timeout "${SWEEP_TIMEOUT:-300}" python3 bench/tile_cuda_candidates.py --out "$OUT/tile_cuda_candidates.json" \
  --ms "${TILE_MS:-16,32,64,128,256}" --budget "${TILE_BUDGET:-240}" 2>&1 | tee "$OUT/tile_candidates.log" | tail -80
