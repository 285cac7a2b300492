#!/bin/bash
# The coordinator's last GPU call (issues 10 and 12): every figure the issues name, in one run on one H200.
#   OUT=/some/dir bash bench/gpu_final.sh [SECTION ...]        (run from the repo root; no SECTION: all, in order)
# Sections, by importance, with their estimate on an H200 (seconds; from bench/results and the spec's figures:
# torch.compile of the peer ~60-90 s, a 7B build on the GPU ~5 s, HF 7B init ~10 s, HF eager ~12 tok/s):
#   copy          8  device-to-device copy bandwidth (the floors' denominator)
#   fastpath     45  bench/gpu_fastpath_check.py (fused add+RMSNorm / SiLU: kernels, greedy, kernels per layer)
#   (engine)     30  bench/gpu_engine_check.py (paged kernels + CUDA graphs in the engine == dense greedy), same section;
#                    when it fails the script stops (GATE=0: go on)
#   steps        45  bench/gpu_step_profile.py: AWQ decode steps by host phase and kernel, batch 1/32/128
#   gputests     40  the pytest tests that skip without a GPU (CUDA graphs in the engine), on the GPU
#   decode      165  bench decode 256 tokens, batch 1 and 32, AWQ and fp16 (~60 s), the int4 peer at batch 1 (compile
#                    ~70 s), HF eager at batch 1 (~30 s), the profile rows at 2048 tokens, the peak-memory check
#   throughput   95  bench throughput 128 x (512 + 256): AWQ and fp16 (~25 s each with warm-up), HF generate (~35 s)
#   throughput8  35  the same AWQ row with --kv-cache-dtype int8 (not in the default list)
#   kernels      55  paged attention bench (no sweep, short budget) and bench kernels at M = 1/16/32/128 (KERNEL_MS;
#                    capped at KERNELS_CAP s, default 60)
#   int8attn     40  bench/int8_attention_bench.py: int8 vs fp16 KV decode attention (INT8ATTN_SHAPES)
#   serve        60  bench serve-sweep at concurrency 1/16/64/128, 2 x concurrency requests each (server start ~25 s)
#   coldstart    70  bench cold-start: 7B AWQ folder -> fresh process -> graphs -> first token (empty Triton
#                    cache; COLD_WARM=1 adds a second run with the kernels cached, ~30 s)
#   quantize     35  bench quantize --layers 1 (QUANT_LAYERS; QUANT_CAP s), 128 x 512 calibration tokens (per-block time, extrapolated)
#   profile8k    75  only if time is left: the profile rows at 8192 tokens
#   gemvsweep, mmatiles: kernel experiments, only when named (bench/gemv_candidates.py, bench/mma_tiles.py)
# Sum without profile8k: ~535 s (+ ~12 s setup). TOTAL_BUDGET (default 540 s) counts from the start: each section
# gets min(its cap, what is left) under `timeout` and is skipped when under MIN_SECTION_S are left, so the tail
# (quantize, profile8k) is what a slow run loses. Results go to $OUT as each section ends (at most 8 files come
# back): results.json (every section's JSON), summary.md (key figures + every table), log.txt, serve_sweep.png.
# Env: VOCAB (qwen.tiktoken), WHL_DIR (carried wheels), TOTAL_BUDGET, COLD_WARM, SKIP_ATTENTION=1, SMOKE=1 (CPU, qwen-tiny: checks
# the script, not the GPU).
set -u -o pipefail
START=$(date +%s)
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
DEADLINE=$((START + TOTAL_BUDGET))
RESERVE=8          # seconds kept for the final summary
MIN_SECTION_S=${MIN_SECTION_S:-25}
OUT=${OUT:?set OUT to the results folder}
WORK=${WORK:-/tmp/gpu_final}
LOG=$OUT/log.txt
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
PY=python3
CLI="$PY -m qwen_awq.cli"

first_existing() { for p in "$@"; do [ -e "$p" ] && { echo "$p"; return; }; done; echo ""; }
VOCAB=${VOCAB:-$(first_existing .devcache/assets/qwen.tiktoken ../assets/qwen.tiktoken)}
WHL_DIR=${WHL_DIR:-$(first_existing .whl ../../.whl)}

setup() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$LOG"
  if [ -n "$WHL_DIR" ] && ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHL_DIR"/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site:$PYTHONPATH
  else
    echo "no carried wheels found (WHL_DIR): the serve section needs fastapi/uvicorn/pydantic" | tee -a "$LOG"
  fi
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
  $PY -c "import qwen_awq.server.app" >>"$LOG" 2>&1 || echo "WARNING: the server does not import (see log.txt)" | tee -a "$LOG"
  [ -n "$VOCAB" ] || echo "WARNING: no qwen.tiktoken found (VOCAB): serve, coldstart and quantize need it" | tee -a "$LOG"
  echo "vocab: ${VOCAB:-none}; wheels: ${WHL_DIR:-none}; budget ${TOTAL_BUDGET}s" | tee -a "$LOG"
}

collect() { $PY bench/gpu_final_collect.py --work "$WORK" --out "$OUT" "$@" >>"$LOG" 2>&1; }

# run_section NAME ESTIMATE CAP COMMAND...: under `timeout`, output to log.txt (its tail to stdout)
run_section() {
  local name=$1 est=$2 cap=$3; shift 3
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  if ((left < MIN_SECTION_S)); then
    printf '%s\tskipped\t0\t%s\t0\n' "$name" "$est" >>"$WORK/sections.tsv"
    echo "=== [$name] skipped: ${left}s left" | tee -a "$LOG"
    return
  fi
  local limit=$((cap < left ? cap : left)) t0=$(date +%s)
  echo "=== [$name] start at +$((t0 - START))s (estimate ${est}s, limit ${limit}s)" | tee -a "$LOG"
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG" | tee "$WORK/$name.out" | tail -n 4
  local rc=${PIPESTATUS[0]} took=$(($(date +%s) - t0))
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$est" "$limit" >>"$WORK/sections.tsv"
  echo "=== [$name] rc=$rc in ${took}s" | tee -a "$LOG"
  collect
}

# Sizes: the issues' by default; SMOKE=1 runs every section on the CPU with qwen-tiny (checks the script only).
if [ "${SMOKE:-0}" = 1 ]; then
  M=qwen-tiny DEV=(--device cpu) DECODE=(--tokens 4 --batch 1 2 --runs 1 --profile 8) P8K=16
  THROUGHPUT=(--num-prompts 4 --input-len 16 --output-len 4) SERVE=(--concurrency 1,2 --input-len 16 --output-len 4)
  QUANT=(--samples 4 --seqlen 32) ATTN=(--smoke --budget 60)
  export TRITON_INTERPRET=1
else
  M=qwen-7b DEV=() DECODE=(--tokens 256 --batch 1 32 --runs 3 --profile 2048) P8K=8192
  THROUGHPUT=(--num-prompts 128 --input-len 512 --output-len 256)
  SERVE=(--concurrency 1,16,64,128 --input-len 512 --output-len 256) QUANT=(--samples 128 --seqlen 512)
  ATTN=(--budget 70)
fi
COLD=()
[ "${COLD_WARM:-0}" = 1 ] && COLD=(--repeat-warm)

sec_copy() {
  run_section copy 8 60 $PY -c "import json, torch; from qwen_awq.eval.peers import copy_bandwidth; \
bw = copy_bandwidth(); json.dump({'device': torch.cuda.get_device_name(), 'copy_bytes_per_s': bw}, \
open('$WORK/copy.json', 'w')); print(f'copy bandwidth {bw / 1e9:.0f} GB/s (read + write)')"
}
sec_fastpath() {
  if [ -f bench/gpu_fastpath_check.py ]; then
    run_section fastpath 45 "${FASTPATH_CAP:-75}" $PY bench/gpu_fastpath_check.py --out "$WORK/fastpath.json"
  else
    echo "=== [fastpath] bench/gpu_fastpath_check.py absent" | tee -a "$LOG"
  fi
  run_section engine 30 "${ENGINE_CAP:-60}" $PY bench/gpu_engine_check.py --out "$WORK/engine.json"
  # a wrong engine makes every later figure meaningless: stop here (GATE=0 runs on regardless)
  if [ "${GATE:-1}" = 1 ] && ! $PY -c "import json, sys; sys.exit(not json.load(open('$WORK/engine.json'))['ok'])" 2>/dev/null; then
    echo "=== engine check failed: stopping before the measurements" | tee -a "$LOG"
    $PY bench/gpu_final_collect.py --work "$WORK" --out "$OUT" --print >>"$LOG" 2>&1
    exit 1
  fi
}
sec_steps() {
  run_section steps 45 90 $PY bench/gpu_step_profile.py --out "$WORK/steps" --model $M "${DEV[@]}" \
    --batch 1 32 128 --quant awq --tokens 64 ${STEPS_EXTRA:-}
}
sec_gputests() {  # the suite's tests that skip without a GPU (AutoAWQ's needs its package: not on this image)
  (export QWEN_AWQ_TEST_DEVICE=cuda; run_section gputests 40 120 $PY -m pytest -q -p no:cacheprovider \
    tests/test_engine.py tests/test_greedy_tail.py tests/test_greedy_tail_kernel.py tests/test_paged_attention_cuda.py \
    -k "cuda or greedy")
}
sec_decode() {
  run_section decode 165 250 $CLI bench decode --synthetic $M "${DEV[@]}" --quant awq none "${DECODE[@]}" \
    --peers int4 hf --peer-batch 1 --profile-runs 1 --json-out "$WORK/decode.json"
}
sec_throughput() {
  run_section throughput 95 170 $CLI bench throughput --synthetic $M "${DEV[@]}" --quant awq none \
    "${THROUGHPUT[@]}" --peers --json-out "$WORK/throughput.json"
}
sec_throughput8() {  # the offline row again on Qwen's int8 KV cache (AWQ weights)
  run_section throughput8 35 90 $CLI bench throughput --synthetic $M "${DEV[@]}" --quant awq "${THROUGHPUT[@]}" \
    --kv-cache-dtype int8 --json-out "$WORK/throughput8.json"
}
sec_kernels() {
  [ "${SKIP_ATTENTION:-0}" = 1 ] || run_section attention 25 45 $PY bench/attention_bench.py --out "$WORK/attention" \
    "${ATTN[@]}"
  run_section kernels 30 "${KERNELS_CAP:-60}" $CLI bench kernels --out "$WORK/kernels.json" --ms "${KERNEL_MS:-1,16,32,128}"
}
sec_int8attn() {  # int8 vs fp16 KV decode attention in one run (the NVRTC int8 kernel's candidates): its JSON to $OUT
  run_section int8attn 40 "${INT8ATTN_CAP:-90}" $PY bench/int8_attention_bench.py --out "$OUT/int8attn" \
    --shapes ${INT8ATTN_SHAPES:-64x1024 128x768 1x2048}
}
sec_serve() {
  local offline=()
  [ -f "$WORK/throughput.json" ] && offline=(--offline "$WORK/throughput.json")
  run_section serve 60 150 $CLI bench serve-sweep --synthetic $M "${DEV[@]}" --quant awq --tokenizer "$VOCAB" \
    "${SERVE[@]}" --prompts-per-level 2 "${offline[@]}" --out-dir "$WORK/serve" --startup-timeout 120
  # the sweep stops its server itself, also on SIGTERM; this catches a SIGKILL (only the pid it started)
  if [ -f "$WORK/serve/server.pid" ]; then kill "$(cat "$WORK/serve/server.pid")" 2>/dev/null; fi
  cat "$WORK/serve/server.log" >>"$LOG" 2>/dev/null
}
sec_coldstart() {
  run_section coldstart 70 200 $CLI bench cold-start --synthetic $M "${DEV[@]}" --tokenizer "$VOCAB" \
    --dir "$WORK/cold" --timeout 150 "${COLD[@]}" --json-out "$WORK/cold_start.json"
  # `qwen-awq serve`'s default captures graphs up to the full 32768-token context; should that fail (the gather
  # attention path materializes every table width), time a bounded context instead, labelled by its flag
  if [ ! -f "$WORK/cold_start.json" ]; then
    run_section coldstart_8k 60 120 $CLI bench cold-start --synthetic $M "${DEV[@]}" --tokenizer "$VOCAB" \
      --dir "$WORK/cold" --timeout 110 --max-model-len 8192 --json-out "$WORK/cold_start.json"
  fi
  rm -rf "$WORK/cold"
}
sec_quantize() {
  run_section quantize 35 "${QUANT_CAP:-120}" $CLI bench quantize --synthetic $M "${DEV[@]}" --layers "${QUANT_LAYERS:-1}" --tokenizer "$VOCAB" \
    "${QUANT[@]}" --dir "$WORK/quant" --json-out "$WORK/quantize.json"
  rm -rf "$WORK/quant"
}
sec_gemvsweep() {  # not in the default list: every GEMV sweep candidate at M = 1/2 (bench/gemv_candidates.py)
  run_section gemvsweep 60 "${GEMV_CAP:-150}" $PY bench/gemv_candidates.py --out "$WORK/gemv_candidates.json" \
    --budget "${GEMV_BUDGET:-110}"
}
sec_mmatiles() {  # not in the default list: larger tensor-core tiles at MMA_MS (bench/mma_tiles.py)
  run_section mmatiles 60 150 $PY bench/mma_tiles.py --out "$WORK/mma_tiles.json" --ms "${MMA_MS:-128}" --budget 100
}
sec_profile8k() {
  run_section profile8k 75 120 $CLI bench decode --synthetic $M "${DEV[@]}" --quant awq none --tokens 8 \
    --batch 1 --runs 1 --profile $P8K --json-out "$WORK/profile8k.json"
}

ALL=(copy gputests fastpath steps decode throughput kernels int8attn serve coldstart quantize profile8k)
SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=("${ALL[@]}")
for s in "${SECTIONS[@]}"; do
  declare -F "sec_$s" >/dev/null || { echo "unknown section $s; choose from ${ALL[*]}"; exit 2; }
done
: >"$WORK/sections.tsv"
setup
for s in "${SECTIONS[@]}"; do "sec_$s"; done
$PY bench/gpu_final_collect.py --work "$WORK" --out "$OUT" --print 2>&1 | tee -a "$LOG"
echo "total $(($(date +%s) - START))s" | tee -a "$LOG"
