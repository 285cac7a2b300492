#!/bin/bash
# One GPU call for issue 10's kernels: the kernel tests compiled on the GPU (Qwen-7B's real shapes included), the
# tile sweep, the per-shape table and the fusion timings. Run from the repo root on the GPU machine:
#   OUT=/some/dir bash bench/w4a16_device_run.sh [test_timeout_s] [bench_args...]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 QWEN_AWQ_TEST_DEVICE=cuda OMP_NUM_THREADS=4
TEST_TIMEOUT=${1:-90}
shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "$TEST_TIMEOUT" python3 -m pytest -q -rf tests/test_w4a16_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-285}" python3 -m qwen_awq.eval.bench_kernels --out "$OUT/awq_kernel_H200_w4a16.json" "$@" 2>&1 | tee "$OUT/bench.log" \
  | grep -v "^sweep " | tail -60
