"""Per-request sampling settings with vLLM's names and defaults, validated on construction.

`SamplingParams.from_generation_config` maps a Hugging Face generation_config onto them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from qwen_awq.errors import SamplingError

# vLLM's _SAMPLING_EPS: a temperature below this is treated as greedy (dividing by it would overflow).
GREEDY_EPS = 1e-5
# Our own cap on stop strings per request: each one is searched in every streamed piece, so keep it small.
# (TGI's default max_stop_sequences is 4; OpenAI allows 4; 16 leaves headroom for tool-use prompts.)
MAX_STOP_STRINGS = 16
# OpenAI's API caps top_logprobs at 20; vLLM's default max_logprobs is 20 as well.
MAX_LOGPROBS = 20
# OpenAI's documented range for presence_penalty and frequency_penalty.
PENALTY_RANGE = 2.0

# Hugging Face generation_config key -> SamplingParams field (do_sample is handled separately).
_HF_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
}


@dataclass
class SamplingParams:
    """vLLM-compatible sampling parameters; `stop` also accepts a single string."""

    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1 means off
    top_k: int = 0  # 0 or -1 mean off; -1 is normalized to 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output
    presence_penalty: float = 0.0  # OpenAI semantics, over output only
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token

    def __post_init__(self) -> None:
        self._normalize()
        self._check_ranges()
        self._check_counts()

    def _normalize(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [_as_int("stop_token_ids", t) for t in self.stop_token_ids]
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            setattr(self, name, _as_float(name, getattr(self, name)))

    def _check_ranges(self) -> None:
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 or -1 (0 and -1 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise SamplingError(f"{name} must be in [-2, 2], got {value}")
        if any(t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}")

    def _check_counts(self) -> None:
        self.n = _as_int("n", self.n)
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.n < 1:
            raise SamplingError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
        if self.logprobs is not None:
            self.logprobs = _as_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise SamplingError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_generation_config(cls, gen: Mapping[str, Any] | object | None,
                               **overrides: Any) -> SamplingParams:
        """Start from a HF generation_config (dict or object), then apply overrides.

        Keys that are absent or None in `gen` keep SamplingParams' defaults, and overrides that are None
        count as "not given" (so a request's unset fields fall back to the config). `do_sample` false
        means greedy unless an override sets temperature. Model-specific fallbacks are the caller's job.
        """
        values: dict[str, Any] = {}
        for key, name in _HF_KEYS.items():
            value = _lookup(gen, key)
            if value is not None:
                values[name] = value
        if _lookup(gen, "do_sample") is False:
            values["temperature"] = 0.0
        known = {f.name for f in fields(cls)}
        for name, value in overrides.items():
            if name not in known:
                raise SamplingError(f"unknown sampling parameter {name!r}; known: {', '.join(sorted(known))}")
            if value is not None:
                values[name] = value
        return cls(**values)


def _lookup(gen: Mapping[str, Any] | object | None, key: str) -> Any:
    if gen is None:
        return None
    if isinstance(gen, Mapping):
        return gen.get(key)
    return getattr(gen, key, None)


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as a token count is almost certainly a client mistake.
    integral = isinstance(value, int) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)
