#!/bin/bash
# GPU call for the residual add + RMSNorm folded into the NVRTC GEMV (kernels/w4a16_cuda_norm.py), ~5 min on an
# H200: its GPU tests beside the NVRTC GEMV's and the engine's CUDA-graph tests; the kernel A/B at o_proj's and
# down_proj's shapes (bench/norm_fold_bench.py); the batch-1 AWQ decode step with the fold and with
# QWEN_AWQ_NORM_FOLD=0 in one process (bench/gpu_step_profile.py: _add_rms_norm_kernel's 64 calls a step should
# leave the kernel table, the *_add_norm1 GEMVs take the plain GEMV's place).
#   OUT=/some/dir bash bench/gpu_normfold.sh        (repo root, wheels carried in .whl)
source bench/device_env.sh
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
QWEN_AWQ_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider tests/test_norm_fold.py \
  tests/test_engine.py tests/test_w4a16_kernels.py -k "fold or cuda or graph" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30
timeout 120 python3 bench/norm_fold_bench.py --out "$OUT" --dtype fp16 bf16 2>&1 | tail -6
timeout 300 python3 bench/gpu_step_profile.py --out "$OUT" --batch 1 --quant awq --tokens 64 \
  --also QWEN_AWQ_NORM_FOLD=0 2>&1 | tee "$OUT/step_profile.txt" | grep -E "^\{|add_rms_norm|add_norm1|w4a16_gemv|\] [0-9]+s"
