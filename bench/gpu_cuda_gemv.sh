#!/bin/bash
# Issue 10: the NVRTC W4A16 GEMV on the GPU: its tests at the real shapes, the M = 1 / 2 candidates against the
# Triton GEMV and cuBLAS (bench/gemv_candidates.py), and batch-1/2 AWQ decode with it on and off (A/B, one run).
#   OUT=/some/dir bash bench/gpu_cuda_gemv.sh        (repo root, wheels carried in .whl)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, hasattr(torch.cuda, '_compile_kernel'))"
QWEN_AWQ_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x -rf tests/test_w4a16_kernels.py -k "cuda" 2>&1 | tail -15
timeout 200 python3 bench/gemv_candidates.py --out $OUT/gemv_candidates.json --ms 1,2 --budget 140 2>&1 | tail -40
for on in 1 0; do QWEN_AWQ_CUDA_KERNELS=$on timeout 100 python3 -m qwen_awq.cli bench decode --synthetic qwen-7b --quant awq --tokens 256 --batch 1 2 --runs 3 --json-out $OUT/decode_cuda$on.json 2>&1 | tail -6; done
