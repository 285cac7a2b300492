#!/bin/bash
# 2026-12-04 fifth GPU call (issue 12): where the offline row's time goes. bench throughput 128 x (512 + 256), AWQ
# and fp16, now reporting the prefill phase (until every request holds its first token), the decode seconds per
# step after it and the overlapped steps; then AWQ with 8192-token prefill steps instead of the default.
#   OUT=/some/dir bash bench/gpu_phases_2026-12-04d.sh        (repo root, wheels carried in .whl)
source bench/device_env.sh
T="python3 -m qwen_awq.cli bench throughput --synthetic qwen-7b --num-prompts 128 --input-len 512 --output-len 256"
timeout 200 $T --quant awq none --json-out "$OUT/throughput_phases.json" --md-out "$OUT/throughput_phases.md" 2>&1 | tail -6
timeout 120 $T --quant awq --max-num-batched-tokens 8192 --json-out "$OUT/throughput_phases_8k.json" 2>&1 | tail -3
