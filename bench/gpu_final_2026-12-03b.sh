#!/bin/bash
# The 2026-12-03 second closing GPU call (issue 10): the NVRTC kernels' GPU tests (GEMVs and the tensor-core
# kernel for M = 2..64), then gpu_final.sh's copy, fastpath (engine check), gputests, decode, kernels (no attention)
# and coldstart sections.
#   OUT=/some/dir bash bench/gpu_final_2026-12-03b.sh        (repo root, wheels carried in .whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
QWEN_AWQ_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -rf -p no:cacheprovider tests/test_w4a16_kernels.py \
  tests/test_dense_gemv.py -k "cuda or dense or graph or nvrtc" 2>&1 | tail -4 | tee $OUT/nvrtc_tests.txt
SKIP_ATTENTION=1 KERNEL_MS=${KERNEL_MS:-1,2,16,32} TOTAL_BUDGET=${TOTAL_BUDGET:-470} \
  bash bench/gpu_final.sh copy fastpath gputests decode kernels coldstart
