# The closing calls of 2026-12-04 (evening), from the repo root with the wheels carried:
#   OUT=... bash bench/gpu_final_2026-12-04h.sh decode      issue 10: bench decode (b1 / b32, int4 + HF peers, profile
#                                                           rows, peak memory), then the batch-1 AWQ step with the
#                                                           add + RMSNorm fold on / off / on in one process (ran at
#                                                           tree 63c4acd; the fold is gone since: the A/B is a no-op)
#   OUT=... bash bench/gpu_final_2026-12-04h.sh serving     issue 12: offline throughput (AWQ, fp16, HF), the AWQ row on
#                                                           int8 KV, int8 vs fp16 KV attention; issue 10: b1 decode
set -u
case "${1:?decode or serving}" in
  decode)
    TOTAL_BUDGET=${TOTAL_BUDGET:-300} bash bench/gpu_final.sh copy decode
    source bench/device_env.sh
    timeout 200 python3 bench/gpu_step_profile.py --out "$OUT/fold_ab" --batch 1 --quant awq --tokens 64 \
      --also QWEN_AWQ_NORM_FOLD=0 QWEN_AWQ_NORM_FOLD=1 2>&1 | grep -E "^\{|add_rms_norm|add_norm|\] [0-9]+s" | cut -c1-300
    ;;
  serving)  # + the batch-1 decode row again on this tree (the decode call's tree still had the fold)
    TOTAL_BUDGET=${TOTAL_BUDGET:-330} bash bench/gpu_final.sh copy throughput throughput8 int8attn
    source bench/device_env.sh
    timeout 200 python3 -m qwen_awq.cli bench decode --synthetic qwen-7b --quant awq none --tokens 256 --batch 1 \
      --runs 3 --peers int4 --peer-batch 1 --json-out "$OUT/decode_b1.json" 2>&1 | tail -12
    ;;
esac
