#!/bin/bash
# 2026-12-04 sixth GPU call (issue 12): the engine's step budget now defaults to 8192 tokens on a GPU. AWQ offline
# 128 x (512 + 256) at 2048 and 16384 beside the new default, then gpu_final.sh's copy, gputests, throughput (the
# default, with the HF peer) and serve sections (HTTP at concurrency 1..128 against that offline row).
#   OUT=/some/dir bash bench/gpu_budget_2026-12-04e.sh        (repo root, wheels carried in .whl, vocab in .devcache)
source bench/device_env.sh
T="python3 -m qwen_awq.cli bench throughput --synthetic qwen-7b --num-prompts 128 --input-len 512 --output-len 256 --quant awq"
for budget in 2048 16384; do
  timeout 90 $T --max-num-batched-tokens $budget --json-out "$OUT/throughput_budget_$budget.json" 2>&1 | grep "LLMEngine"
done
SKIP_ATTENTION=1 TOTAL_BUDGET=${TOTAL_BUDGET:-250} bash bench/gpu_final.sh copy gputests throughput serve
