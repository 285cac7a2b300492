#!/bin/bash
# The 2026-12-03 third closing GPU call (issues 10 and 12): the device token statistics' and overlapped engine's
# tests on the GPU, then gpu_final.sh's copy, gputests, decode, throughput, kernels (no attention) and serve
# sections on the tree with the statistics (served requests carry Qwen-Chat's repetition_penalty 1.1).
#   OUT=/some/dir bash bench/gpu_final_2026-12-03c.sh        (repo root, wheels carried in .whl, vocab in .devcache)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
QWEN_AWQ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_token_stats.py \
  tests/test_engine_overlap.py > $OUT/engine_gpu_tests.txt 2>&1
grep -E "^(FAILED|E )|passed|failed" $OUT/engine_gpu_tests.txt | head -40
SKIP_ATTENTION=1 KERNEL_MS=${KERNEL_MS:-1,2,16,32} TOTAL_BUDGET=${TOTAL_BUDGET:-430} \
  bash bench/gpu_final.sh copy gputests decode throughput kernels serve
