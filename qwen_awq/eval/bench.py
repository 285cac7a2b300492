"""`qwen-awq bench ...`: the sub-commands, each registered from its own module: decode (eval/bench_decode.py),
throughput (bench_throughput.py), kernels (bench_kernels.py), serve (bench_serve.py), serve-sweep
(bench_serve_sweep.py), cold-start (bench_cold_start.py), quantize (bench_quantize.py), step-kernels (profile_step.py).
"""
from __future__ import annotations

from typing import Any


def register_bench(bench_sub: Any) -> None:
    from qwen_awq.eval.bench_cold_start import register_cold_start
    from qwen_awq.eval.bench_decode import register_decode
    from qwen_awq.eval.bench_kernels import register_kernels
    from qwen_awq.eval.bench_quantize import register_quantize
    from qwen_awq.eval.bench_serve import register_bench_serve
    from qwen_awq.eval.bench_serve_sweep import register_serve_sweep
    from qwen_awq.eval.bench_throughput import register_throughput
    from qwen_awq.eval.profile_step import register_step_kernels

    for register in (register_decode, register_throughput, register_kernels, register_bench_serve,
                     register_serve_sweep, register_cold_start, register_quantize, register_step_kernels):
        register(bench_sub)
