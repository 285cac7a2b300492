# Sourced by the dated GPU-call scripts (bench/gpu_*_2026-12-04*.sh): the carried wheels (.whl) into /tmp/site and
# the import path for the repo and them, as gpu_final.sh's setup() does for its own sections.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
