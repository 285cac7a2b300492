# One device call (issue 10): the residual add + RMSNorm in the W4A16 tensor-core kernel's prologue at one token
# (models/fusion.norm_linear). Its GPU tests (with every other NVRTC W4A16 case, scale_after's too), the engine
# check (batch-1 greedy tokens with the prologue on == off), then, only when both pass: batch-1 AWQ decode with the
# prologue on / off / on in turn, the batch-1 step profile both ways (kernels per step), and gpu_final.sh's copy +
# decode sections (b1 / b32, AWQ and fp16, int4 + HF peers, profile rows, peak memory) on this tree with it on.
# Written on 2026-12-04 and not yet run (no device was lent after it was written).
#   OUT=... bash bench/gpu_norm_2026-12-04l.sh
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
QWEN_AWQ_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q tests/test_w4a16_kernels.py -k "cuda" 2>&1 | tail -8
tests=${PIPESTATUS[0]}
timeout 90 python3 bench/gpu_norm_prologue_check.py --out $OUT/norm_check.json 2>&1 | tail -3 | cut -c1-700
check=${PIPESTATUS[0]}
echo "tests rc $tests, engine check rc $check"
[ "$tests" = 0 ] && [ "$check" = 0 ] || exit 1
for v in 1 0 1; do
  QWEN_AWQ_NORM_PROLOGUE=$v timeout 80 python3 -m qwen_awq.cli bench decode --synthetic qwen-7b --quant awq --tokens 256 \
    --batch 1 --runs 3 --json-out $OUT/decode_prologue$v.json 2>&1 | grep "qwen-awq |" | sed "s/^/prologue=$v /"
done
QWEN_AWQ_NORM_PROLOGUE=1 timeout 120 python3 bench/gpu_step_profile.py --out $OUT/steps --batch 1 --quant awq \
  --tokens 64 --also QWEN_AWQ_NORM_PROLOGUE=0 2>&1 | grep -E "^\||rms|norm|w4a16_mma|kernels" | cut -c1-220 | head -40
# the prologue is off by default until this call has passed; the decode sections measure it on
QWEN_AWQ_NORM_PROLOGUE=1 TOTAL_BUDGET=${TOTAL_BUDGET:-270} bash bench/gpu_final.sh copy decode
