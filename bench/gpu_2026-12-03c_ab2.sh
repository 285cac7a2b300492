#!/bin/bash
# 2026-12-03 (third session), second GPU call: the L2 prefetch spread over one-warp blocks and joined once per step
# (the first call's one-block prefetch joined before every GEMV halved decode), its GPU tests and its A/B.
#   OUT=/some/dir bash bench/gpu_2026-12-03c_ab2.sh        (repo root, wheels carried in .whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
QWEN_AWQ_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -rf -p no:cacheprovider tests/test_l2_prefetch.py 2>&1 \
  | tail -3 | tee $OUT/prefetch_tests.txt
timeout 300 python3 bench/l2_prefetch_ab.py --out $OUT/l2_prefetch_ab2.json --settings off during:8 during:16 after:8 \
  after:16 during:16:last after:16:last during:8:last:128 during:16:lines off 2>&1 | grep -v Warning | tail -25
