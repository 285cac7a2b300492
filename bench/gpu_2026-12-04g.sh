# One device call: the GPU tests of this session's kernels (greedy tail, add + RMSNorm fold, int8 decode), the
# engine check, the greedy-tail and fold micro-benchmarks, and the batch-1 AWQ step with the fold on and off.
#   OUT=... bash bench/gpu_2026-12-04g.sh        (repo root, wheels carried in .whl)
# Ran at tree 0e49a82; the fold (tests/test_norm_fold.py, bench/norm_fold_bench.py) was removed after the A/B of
# bench/gpu_final_2026-12-04h.sh decode: check out 0e49a82 to repeat it.
source bench/device_env.sh
OUT=${OUT:?set OUT to the results folder}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
QWEN_AWQ_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider tests/test_norm_fold.py \
  tests/test_greedy_tail_kernel.py tests/test_greedy_tail.py tests/test_paged_attention_cuda.py tests/test_engine.py \
  tests/test_w4a16_kernels.py -k "fold or cuda or graph or greedy" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
timeout 90 python3 bench/gpu_engine_check.py --out "$OUT/engine_check.json" 2>&1 | tail -2 | cut -c1-600
timeout 60 python3 bench/greedy_tail_bench.py --out "$OUT" 2>&1 | tail -12
timeout 60 python3 bench/norm_fold_bench.py --out "$OUT" --dtype fp16 bf16 2>&1 | tail -8
timeout 200 python3 bench/gpu_step_profile.py --out "$OUT" --batch 1 --quant awq --tokens 64 \
  --also QWEN_AWQ_NORM_FOLD=0 2>&1 | tee "$OUT/step_profile.txt" | grep -E "^\{|add_rms_norm|add_norm|gemv|greedy|reduce_kernel|\] [0-9]+s" | cut -c1-400
