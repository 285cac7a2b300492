#!/bin/bash
# The 2026-12-03 closing GPU call (issue 10): the NVRTC kernels' GPU tests, the host cost of one eager launch
# (NVRTC kernel vs cuBLAS), then gpu_final.sh's copy, fastpath (engine check), gputests and decode sections.
#   OUT=/some/dir bash bench/gpu_final_2026-12-03.sh        (repo root, wheels carried in .whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
QWEN_AWQ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -rf tests/test_w4a16_kernels.py tests/test_dense_gemv.py \
  -k "cuda or dense or graph" 2>&1 | tail -4 | tee $OUT/nvrtc_tests.txt
timeout 60 python3 -c "import sys; sys.path.insert(0, 'bench'); import dense_gemv_candidates as d; \
print('host us per eager launch:', d.host_costs())" 2>&1 | tail -2 | tee -a $OUT/nvrtc_tests.txt
TOTAL_BUDGET=${TOTAL_BUDGET:-340} bash bench/gpu_final.sh copy fastpath gputests decode
