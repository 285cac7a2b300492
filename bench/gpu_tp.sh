#!/bin/bash
# Issue 16 on an nvidia-h200-x2 machine: tensor and data parallelism against one GPU, in one run.
#   OUT=/some/dir bash bench/gpu_tp.sh        (from the repo root; prints a JSON summary, exits nonzero on a miss)
# Sections (H200 estimates): TP=1 AWQ batch-1 decode 256 tokens (~20 s, builds qwen-7b on the GPU); TP=2 the same
# (~45 s the first time: the synthetic AWQ folder, 4 GB, is written once to $XDG_CACHE_HOME for the workers, then
# two ranks load their shards and capture graphs with NCCL inside); 128 x (512 + 256) offline throughput at TP=1
# and TP=2 (~30 s each); the same 128 concurrent requests over HTTP with --data-parallel-size 1 and 2 (~60 s each,
# needs fastapi/uvicorn and qwen.tiktoken: VOCAB). About 5 minutes in all: over the usual 60 s, as loading a 7B
# model four times must be. Targets (issue 16): decode TP=2 >= 1.6x TP=1; throughput TP=2 and DP=2 >= 1.8x TP=1.
# A correctness gate comes first (bench/gpu_tp_check.py, ~60 s): a tiny synthetic Qwen in fp32, TP=2 vs TP=1
# greedy tokens (exact), a worker killed mid-generation (ParallelError within 30 s, nothing left running), and the
# 7B AWQ model's TP=2 vs TP=1 greedy agreement (the W4A16 kernels on the sharded shapes, K = 5504 for down_proj).
# SECTIONS="check decode throughput serve" (default: all) picks what runs; the summary marks what is missing.
set -u -o pipefail
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/qwen-awq-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # KINDS.md: multicast stays off
CLI="python3 -m qwen_awq.cli"
M="--synthetic qwen-7b --quant awq"
VOCAB=${VOCAB:-$(ls .devcache/assets/qwen.tiktoken ../assets/qwen.tiktoken 2>/dev/null | head -1)}
nvidia-smi --query-gpu=name,memory.total --format=csv >>"$LOG" 2>&1
python3 -c 'import torch; print("cuda devices", torch.cuda.device_count())' 2>&1 | tee -a "$LOG"

run() {  # run NAME CMD...: stdout/stderr to the log, its status kept
  local name=$1; shift
  echo "== $name: $*" >>"$LOG"
  local t0=$(date +%s)
  timeout 300 "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

SECTIONS=${SECTIONS:-check decode throughput serve}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
want check && run check python3 bench/gpu_tp_check.py --out "$OUT/check.json"
want decode && run decode_tp1 $CLI bench decode $M --tokens 256 --batch 1 --runs 3 --json-out "$OUT/decode_tp1.json"
want decode && run decode_tp2 $CLI bench decode $M --tokens 256 --batch 1 --runs 3 --tensor-parallel-size 2 \
  --json-out "$OUT/decode_tp2.json"
THR=(--num-prompts 128 --input-len 512 --output-len 256)
want throughput && run throughput_tp1 $CLI bench throughput $M "${THR[@]}" --json-out "$OUT/throughput_tp1.json"
want throughput && run throughput_tp2 $CLI bench throughput $M "${THR[@]}" --tensor-parallel-size 2 --json-out "$OUT/throughput_tp2.json"
if want serve && [ -n "$VOCAB" ]; then
  SWEEP=(bench serve-sweep $M --tokenizer "$VOCAB" --concurrency 128 --num-prompts 128 --input-len 512
         --output-len 256 --startup-timeout 240)
  run serve_dp1 $CLI "${SWEEP[@]}" --out-dir "$OUT/serve_dp1"
  run serve_dp2 $CLI "${SWEEP[@]}" --out-dir "$OUT/serve_dp2" --server-arg=--data-parallel-size --server-arg=2
elif want serve; then
  echo "no qwen.tiktoken (VOCAB): the DP=2 HTTP rows are skipped" | tee -a "$LOG"
fi
python3 bench/gpu_tp_collect.py "$OUT"
