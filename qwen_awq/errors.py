"""Exceptions for errors a user can cause; the CLI prints them as one line, the server maps them to 4xx."""
from __future__ import annotations


class QwenAwqError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug in qwen-awq)."""


class ConfigError(QwenAwqError):
    """config.json / generation_config.json is missing, malformed or describes an unsupported model."""


class CheckpointError(QwenAwqError):
    """Weights are missing, truncated, corrupt or of the wrong shape or layout."""


class TokenizerError(QwenAwqError):
    """Vocabulary files are missing or an id/text cannot be handled."""


class SamplingError(QwenAwqError, ValueError):
    """A sampling parameter is out of range."""


class GrammarError(QwenAwqError, ValueError):
    """A structured-output spec (JSON schema, regex, choice list, grammar) is invalid or cannot be enforced."""


class ContextLengthError(QwenAwqError, ValueError):
    """Prompt plus requested new tokens exceed the model's context length."""


class Overloaded(QwenAwqError):
    """The engine's waiting queue is full; retry later."""


class AssetMissing(QwenAwqError):
    """An optional asset (e.g. the bundled SmolLM2 model package) is not installed."""


class ParallelError(QwenAwqError):
    """Tensor or data parallelism cannot run as asked: a split that does not divide, too few devices, a dead
    worker process."""
