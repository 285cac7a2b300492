# One device call (issue 12, int8 KV): the NVRTC int8 decode kernel's GPU tests, the engine check with int8 KV,
# then int8 vs fp16 KV attention timings in one run. From the repo root: OUT=... bash bench/gpu_int8_2026-12-04f.sh
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
QWEN_AWQ_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x tests/test_paged_attention_cuda.py 2>&1 | tail -15
timeout 120 python3 bench/gpu_engine_check.py --out $OUT/engine_check.json 2>&1 | tail -3
timeout 240 python3 bench/int8_attention_bench.py --out $OUT 2>&1 | tail -30
