"""Tokenizers: the small interface every other module uses, and `load_tokenizer` to pick one for a folder."""
from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal, Protocol

from qwen_awq.errors import TokenizerError
from qwen_awq.tokenizer.detok import IncrementalDetokenizer
from qwen_awq.tokenizer.hf import HFTokenizer
from qwen_awq.tokenizer.qwen import VOCAB_FILE, QwenTokenizer

__all__ = ["HFTokenizer", "IncrementalDetokenizer", "QwenTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    """What the engine, chat and server code may rely on, whichever tokenizer backs a model."""

    vocab_size: int
    eos_token_id: int
    bos_token_id: int | None
    stop_token_ids: frozenset[int]  # ids that end a chat turn
    special_ids: frozenset[int]
    im_start_id: int | None  # ChatML markers, when the vocabulary has them
    im_end_id: int | None
    chat_template: str | None  # Jinja source from tokenizer_config.json; None for Qwen v1

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = "all",
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]: ...

    def decode(
        self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace"
    ) -> str: ...

    def token_to_id(self, text: str) -> int: ...


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """qwen.tiktoken -> QwenTokenizer, tokenizer.json -> HFTokenizer. Nothing in the folder is executed."""
    folder = Path(folder)
    if (folder / VOCAB_FILE).is_file():
        return QwenTokenizer.from_folder(folder)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(folder)
    raise TokenizerError(f"no tokenizer in {folder}: expected {VOCAB_FILE} (Qwen v1) or tokenizer.json")
