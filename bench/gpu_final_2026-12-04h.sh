# The closing calls of 2026-12-04 (evening), from the repo root with the wheels carried:
#   OUT=... bash bench/gpu_final_2026-12-04h.sh decode      issue 10: bench decode (b1 / b32, int4 + HF peers, profile
#                                                           rows, peak memory), then the batch-1 AWQ step with the
#                                                           add + RMSNorm fold on / off / on in one process (ran at
#                                                           tree 63c4acd; the fold is gone since: the A/B is a no-op)
#   OUT=... bash bench/gpu_final_2026-12-04h.sh serving     issue 12: offline throughput (AWQ, fp16, HF), the AWQ row on
#                                                           int8 KV, int8 vs fp16 KV attention, the HTTP sweep
set -u
case "${1:?decode or serving}" in
  decode)
    TOTAL_BUDGET=${TOTAL_BUDGET:-300} bash bench/gpu_final.sh copy decode
    source bench/device_env.sh
    timeout 200 python3 bench/gpu_step_profile.py --out "$OUT/fold_ab" --batch 1 --quant awq --tokens 64 \
      --also QWEN_AWQ_NORM_FOLD=0 QWEN_AWQ_NORM_FOLD=1 2>&1 | grep -E "^\{|add_rms_norm|add_norm|\] [0-9]+s" | cut -c1-300
    ;;
  serving)
    TOTAL_BUDGET=${TOTAL_BUDGET:-420} bash bench/gpu_final.sh copy throughput throughput8 int8attn serve
    ;;
esac
