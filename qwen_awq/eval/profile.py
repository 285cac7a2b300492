"""The model card's speed/memory profile: batch 1, a 1-token context, N new tokens (EOS ignored) through the simple
generate path (HF generate's counterpart), tokens/s and peak memory per N.

On CUDA the peak is torch's max_memory_allocated (weights + cache + activations) since a reset before each N; on
the CPU it is the process's peak resident set (a high-water mark that cannot be reset, so it only grows).
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError
from qwen_awq.eval.report import PUBLISHED_PROFILE

CARD_LENGTHS = (2048, 8192)  # the model card's columns
WARMUP_TOKENS = 8  # one short run first: CUDA context, kernel selection and allocator growth are not timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _generate(model: Any, start_id: int, new_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    out = model.generate([start_id], params)  # (1, 1 + new_tokens)
    return out.shape[1] - 1


def profile_model(model: Any, tokenizer: Any, lengths: tuple[int, ...] = CARD_LENGTHS, runs: int = 1
                  ) -> list[dict[str, Any]]:
    """One row per length: tokens/s (median of `runs`), peak memory; lengths beyond the context are skipped."""
    if runs < 1 or any(n < 1 for n in lengths):
        raise ConfigError(f"--runs and every --lengths value must be >= 1, got {runs} and {lengths}")
    dev, start_id = model.device, tokenizer.eos_token_id
    _generate(model, start_id, WARMUP_TOKENS)
    rows = []
    for n in lengths:
        if 1 + n > model.cfg.context_length:
            rows.append({"new_tokens": n, "skipped": f"1 + {n} tokens exceed the context of "
                                                     f"{model.cfg.context_length}"})
            continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(runs):
            _sync(dev)
            t0 = time.perf_counter()
            made = _generate(model, start_id, n)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            if made != n:
                raise RuntimeError(f"asked for {n} tokens with EOS ignored, got {made}")
        median = statistics.median(times)
        rows.append({"new_tokens": n, "runs": runs, "median_s": median, "tokens_per_s": n / median,
                     "peak_memory_bytes": _peak_bytes(dev),
                     "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS"})
    return rows


def profile_table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<40}  {'new tokens':>10}  {'tokens/s':>9}  {'peak memory':>12}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{name:<40}  {r['new_tokens']:>10}  skipped: {r['skipped']}")
        else:
            lines.append(f"{name:<40}  {r['new_tokens']:>10}  {r['tokens_per_s']:>9.2f}  "
                         f"{r['peak_memory_bytes'] / 1e9:>9.2f} GB")
    for ref, r in PUBLISHED_PROFILE.items():
        lines.append(f"{ref:<40}  {r['new_tokens']:>10}  {r['tokens_per_s']:>9.2f}  {r['peak_memory_gb']:>9.2f} GB")
    return "\n".join(lines)
