"""GPU check of the RMSNorm prologue (models/fusion.norm_linear -> kernels/w4a16.w4a16_norm_matmul) in the engine:
batch-1 greedy decode of a small random AWQ model (qwen-tiny, weights x4 so that logit gaps sit well above fp16
rounding) under CUDA graphs, with the prologue on and off (QWEN_AWQ_NORM_PROLOGUE), one request at a time; the
prologue must have been taken (launches counted at capture and eager time) and the tokens equal (it rounds where
kernels/rms_norm.py rounds, and the x4 weights keep ties away; a divergence is reported with its first position).
Prints one JSON line; exits 1 on a failure (without a GPU it runs the engine on the CPU, where the prologue
declines: it checks the script).
    python3 bench/gpu_norm_prologue_check.py [--out FILE]      (< 30 s on an H200)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from unittest import mock

import torch
from gpu_fastpath_check import small_model  # bench/ is this script's directory

from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.kernels import w4a16 as kern

PROMPTS = [[101, 2024, 7, 33000, 512], [9, 8, 7], [4242]]
MAX_TOKENS = 24


def greedy(model: torch.nn.Module, on: bool) -> tuple[list[list[int]], int]:
    """Tokens per prompt (each alone: every decode step one token) and the prologue launches counted."""
    os.environ[kern.NORM_PROLOGUE_ENV] = "1" if on else "0"
    with mock.patch.object(kern, "w4a16_norm_mma_cuda", wraps=kern.w4a16_norm_mma_cuda) as launches:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, max_model_len=256, kv_cache_memory=2**26,
                                                     block_size=16))
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        out = []
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, params)
            while engine.has_unfinished():
                for o in engine.step():
                    if o.finished:
                        out.append(list(o.outputs[0].token_ids))
        return out, launches.call_count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    args = p.parse_args()
    model = small_model(True, "cuda" if torch.cuda.is_available() else "cpu")
    off, off_calls = greedy(model, False)
    on, on_calls = greedy(model, True)
    rows = []
    for i, (a, b) in enumerate(zip(off, on, strict=True)):
        diff = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        rows.append({"prompt": i, "equal": a == b, "first_diff": diff})
    result = {"prologue_launches": on_calls, "launches_when_off": off_calls, "rows": rows,
              "ok": on_calls > 0 and off_calls == 0 and all(r["equal"] for r in rows), "on": on, "off": off}
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
