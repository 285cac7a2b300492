#!/bin/bash
# 2026-12-03 (third session), first GPU call: the L2 weight prefetch's GPU tests and its A/B in the decode step
# (issue 10), the NVRTC tensor-core kernel's configs at M = 1, and a GIL switch-interval A/B of the server at
# concurrency 64/128 (issue 12), server starts interleaved.
#   OUT=/some/dir bash bench/gpu_2026-12-03c_ab.sh        (repo root, wheels carried in .whl, vocab in .devcache)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/card.txt
QWEN_AWQ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -rf -p no:cacheprovider tests/test_l2_prefetch.py 2>&1 \
  | tail -4 | tee $OUT/prefetch_tests.txt
timeout 240 python3 bench/l2_prefetch_ab.py --out $OUT/l2_prefetch_ab.json 2>&1 | grep -v Warning | tail -25
timeout 70 python3 bench/mma_cuda_candidates.py --out $OUT/mma_cuda_candidates_m1.json --ms 1 --budget 50 2>&1 | tail -12
for si in "" 0.5 "" 0.5; do
  QWEN_AWQ_SWITCH_INTERVAL_MS=$si timeout 100 python3 -m qwen_awq.cli bench serve-sweep --synthetic qwen-7b --quant awq \
    --tokenizer .devcache/assets/qwen.tiktoken --concurrency 64,128 --input-len 512 --output-len 256 \
    --prompts-per-level 2 --out-dir /tmp/serve_si$si --startup-timeout 90 2>&1 | tail -3
  cp /tmp/serve_si$si/serve_sweep.json $OUT/serve_si${si:-default}_$(date +%s).json 2>/dev/null
done
