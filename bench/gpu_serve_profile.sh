#!/bin/bash
# Where the HTTP path loses against the offline engine (issue 12), on the GPU machine: the offline 128 x (512 + 256)
# run and the same load through `qwen-awq serve`, each with the GPU's utilization sampled every 100 ms
# (nvidia-smi), the server's threads sampled by py-spy (carried wheel) during the load.
#   OUT=/some/dir bash bench/gpu_serve_profile.sh      (repo root; wheels in .whl, incl. py-spy; vocab in .devcache)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PATH=/tmp/site/bin:$PATH
V=.devcache/assets/qwen.tiktoken URL=http://127.0.0.1:8011
CLI="python3 -m qwen_awq.cli"
util() { nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader -lms 100 > "$1" & echo $!; }
U=$(util $OUT/util_offline.csv)
timeout 150 $CLI bench throughput --synthetic qwen-7b --quant awq --num-prompts 128 --input-len 512 --output-len 256 \
  --json-out $OUT/throughput.json 2>&1 | tail -4
kill $U
$CLI serve --synthetic qwen-7b --quant awq --tokenizer $V --host 127.0.0.1 --port 8011 --max-num-seqs 128 \
  --max-model-len 768 --no-prefix-caching > $OUT/server.log 2>&1 &
S=$!
for i in $(seq 1 120); do curl -sf $URL/health >/dev/null && break; sleep 1; done
echo "server up after ~${i} s"
timeout 60 $CLI bench serve --url $URL --concurrency 8 --num-prompts 8 --input-len 512 --output-len 16 >/dev/null 2>&1
py-spy record -p $S -r 100 -f raw -o $OUT/serve.raw --nonblocking > $OUT/pyspy.log 2>&1 &
P=$!
U=$(util $OUT/util_serve.csv)
timeout 150 $CLI bench serve --url $URL --concurrency 128 --num-prompts 256 --input-len 512 --output-len 256 \
  --json $OUT/serve.json 2>&1 | tail -4
kill -INT $P; sleep 3; kill $U; kill -INT $S; sleep 5; kill -9 $S 2>/dev/null
tail -3 $OUT/pyspy.log
python3 -c "
import sys; sys.path.insert(0, 'bench')
from serve_overhead import summarize_profile
print(summarize_profile('$OUT/serve.raw', 30))" > $OUT/serve_profile.txt 2>&1
head -70 $OUT/serve_profile.txt
for f in offline serve; do python3 -c "
import sys
v=[int(l.split(',')[1].split()[0]) for l in open('$OUT/util_$f.csv') if l.count(',')==1]
busy=[x for x in v if x>0]
print('$f', 'samples', len(v), 'mean util of nonzero samples', sum(busy)/max(len(busy),1), 'share >= 95:', sum(x>=95 for x in busy)/max(len(busy),1))"; done
