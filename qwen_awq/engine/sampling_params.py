"""Per-request sampling settings with vLLM's names and defaults, validated on construction.

`SamplingParams.from_defaults` is the one place where a request's settings are resolved from the model's
generation defaults (a Hugging Face generation_config) and the caller's overrides.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from qwen_awq.engine.guided import GuidedSpec
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
# A reply's length when neither the request nor the model's generation_config says (Qwen-7B-Chat's
# generation_config max_new_tokens); chat-style surfaces use it, vLLM-compatible ones keep max_tokens=16.
REPLY_MAX_TOKENS = 512



def _cli(text: str, fallback: str) -> dict[str, str]:
    """Field metadata for the CLI's sampling flags (cli_args.py): help text with the chat-style default."""
    return {"help": f"{text} (default: the model's generation_config, else {fallback})"}


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
_HF_ONLY = ("max_new_tokens", "min_new_tokens")  # HF names that differ from ours


@dataclass
class SamplingParams:
    """vLLM-compatible sampling parameters; `stop` also accepts a single string."""

    n: int = 1
    temperature: float = field(default=1.0, metadata=_cli("softmax temperature; 0 = greedy", "1.0"))
    top_p: float = field(default=1.0, metadata=_cli("nucleus sampling mass in (0, 1]; 1 = off", "1"))
    top_k: int = field(default=0, metadata=_cli("keep the k most likely tokens; 0 or -1 = off", "0"))
    min_p: float = field(default=0.0, metadata=_cli("drop tokens below min_p x the top probability; 0 = off", "0"))
    repetition_penalty: float = field(  # HF semantics, over prompt + output
        default=1.0, metadata=_cli("HF repetition penalty over prompt and output; 1 = off", "1"))
    presence_penalty: float = field(  # OpenAI semantics, over output only
        default=0.0, metadata={"help": "OpenAI presence penalty in [-2, 2] (default: 0)"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "OpenAI frequency penalty in [-2, 2] (default: 0)"})
    seed: int | None = field(default=None, metadata={"help": "random seed, for reproducible sampling"})
    max_tokens: int = field(default=16, metadata={
        "flags": ("--max-new-tokens", "--max-tokens"),
        "help": f"most tokens to generate (default: the model's generation_config max_new_tokens, else "
                f"{REPLY_MAX_TOKENS}, cut to the context left after the prompt)"})
    min_tokens: int = field(default=0, metadata={
        "flags": ("--min-new-tokens", "--min-tokens"),
        "help": "fewest tokens to generate before a stop token may end the reply (default: 0)"})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "stop string (repeatable); trimmed from the output"})
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past end-of-sequence tokens"})
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token
    # Structured output (vLLM's guided decoding): every sample matches it; min_tokens does not apply to it (a
    # finished grammar allows only end ids), and a complete match ends the sample with "stop", ignore_eos or not.
    guided: GuidedSpec | None = None

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
        if self.guided is not None and not isinstance(self.guided, GuidedSpec):
            raise SamplingError(f"guided must be a GuidedSpec (e.g. GuidedSpec.json_schema(schema)), got "
                                f"{type(self.guided).__name__}")

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
    def from_defaults(cls, defaults: Mapping[str, Any] | object | None, *, room: int | None = None,
                      default_max_tokens: int | None = None, **overrides: Any) -> SamplingParams:
        """Resolve a request: the caller's overrides, then `defaults` (a HF generation_config as a dict or an
        object, e.g. the model's GenerationDefaults), then vLLM's defaults.

        Overrides that are None count as "not given"; HF names (max_new_tokens, min_new_tokens, do_sample) are
        accepted. do_sample false means greedy, unless an override sets a temperature above 0. Unless given,
        max_tokens is the defaults' max_new_tokens, else `default_max_tokens`, else vLLM's 16, cut to `room`
        (the context left after the prompt) but never below 1, so that a full context is refused with numbers.
        """
        values = {name: _lookup(defaults, key) for key, name in _HF_KEYS.items()}
        values = {k: v for k, v in values.items() if v is not None}
        given = _given(cls, overrides)
        do_sample = given.pop("do_sample", _lookup(defaults, "do_sample"))
        if do_sample is False and not given.get("temperature"):
            given["temperature"] = 0.0
        if "max_tokens" not in given and "max_tokens" not in values and default_max_tokens is not None:
            values["max_tokens"] = default_max_tokens
        if "max_tokens" not in given and room is not None:
            values["max_tokens"] = max(1, min(values.get("max_tokens", cls.max_tokens), room))
        return cls(**(values | given))


def _given(cls: type[SamplingParams], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides that were given, under SamplingParams' names (do_sample kept as is)."""
    known = {f.name for f in fields(cls)}
    given: dict[str, Any] = {}
    for name, value in overrides.items():
        field_name = _HF_KEYS.get(name, name) if name in _HF_ONLY else name
        if field_name not in known and name != "do_sample":
            raise SamplingError(f"unknown sampling parameter {name!r}; known: {', '.join(sorted(known))}")
        if value is not None:
            given[field_name] = value
    return given


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
