"""Measured W4A16 kernel choices per card: {card name: {"command", "date", "table": {(K, N): {M bucket: choice}}}}.

Written from `python3 -m qwen_awq.eval.bench_kernels --sweep` (bench/results/awq_kernel_H200_*.md); a choice is
("gemv", GemvConfig), ("mma", MmaConfig) or ("dense", None). Cards and shapes not listed take w4a16.default_choice.
"""

from __future__ import annotations

TUNED: dict[str, dict] = {}
