"""Qwen v1's tiktoken BPE tokenizer, built from `qwen.tiktoken` with the exact split pattern and special ids.

Reproduces Qwen's tokenization_qwen.py without executing it (see spec/qwen.md, Tokenizer section).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import unicodedata
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

import tiktoken

from qwen_awq.errors import TokenizerError

VOCAB_FILE = "qwen.tiktoken"
VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # spec/qwen.md
# Like cl100k_base but with \p{N} alone, so every digit is its own piece (spec/qwen.md).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_START_ID = 151643  # first id after the 151643 BPE ranks
SPECIAL_TOKENS: dict[str, int] = {
    tok: SPECIAL_START_ID + i
    for i, tok in enumerate((ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{n}|>" for n in range(205))))
}
VOCAB_SIZE = SPECIAL_START_ID + len(SPECIAL_TOKENS)  # 151851

AllowedSpecial = Literal["all"] | Collection[str]


def _parse_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """Parse `base64(token) rank` lines; the ranks must be exactly 0..151642 so the special ids line up."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from exc
    if sorted(ranks.values()) != list(range(SPECIAL_START_ID)):
        raise TokenizerError(
            f"{path}: expected {SPECIAL_START_ID} distinct ranks 0..{SPECIAL_START_ID - 1}, "
            f"found {len(ranks)}; is this Qwen v1's qwen.tiktoken?"
        )
    return ranks


def _as_set(names: AllowedSpecial) -> Literal["all"] | frozenset[str]:
    """tiktoken wants "all" or a set; lists and tuples are accepted here, unknown names are a mistake."""
    if names == "all":
        return "all"
    chosen = frozenset(names)
    unknown = chosen - SPECIAL_TOKENS.keys()
    if unknown:
        raise TokenizerError(f"not Qwen special tokens: {sorted(unknown)}")
    return chosen


class QwenTokenizer:
    """Qwen v1 tokenizer: NFC-normalize, split with PAT_STR, byte-level BPE, plus 208 special tokens."""

    vocab_size: int = VOCAB_SIZE
    eos_token_id: int = SPECIAL_TOKENS[ENDOFTEXT]  # config.json's eos; chat turns end with <|im_end|>
    bos_token_id: int | None = None  # Qwen prepends nothing
    im_start_id: int | None = SPECIAL_TOKENS[IM_START]
    im_end_id: int | None = SPECIAL_TOKENS[IM_END]
    stop_token_ids: frozenset[int] = frozenset(SPECIAL_TOKENS[t] for t in (ENDOFTEXT, IM_START, IM_END))
    special_ids: frozenset[int] = frozenset(SPECIAL_TOKENS.values())
    chat_template: str | None = None  # Qwen v1 ships no Jinja template; ChatML is built in code

    def __init__(self, vocab_path: str | Path) -> None:
        path = Path(vocab_path)
        if not path.is_file():
            raise TokenizerError(f"Qwen vocabulary file not found: {path} (every Qwen v1 model has one)")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != VOCAB_SHA256:
            warnings.warn(
                f"{path}: sha256 {digest} differs from Qwen v1's qwen.tiktoken ({VOCAB_SHA256}); "
                "token ids may not match the model",
                stacklevel=2,
            )
        self._ranks = _parse_ranks(path, data)
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=self._ranks, special_tokens=SPECIAL_TOKENS
        )
        self.path = path

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenTokenizer:
        return cls(Path(folder) / VOCAB_FILE)

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
    ) -> list[int]:
        """Qwen's defaults: special-token text is parsed; `allowed_special=set()` encodes it as plain BPE."""
        allowed = _as_set(allowed_special)
        disallowed = _as_set(disallowed_special)
        text = unicodedata.normalize("NFC", text)
        try:
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        except ValueError as exc:  # tiktoken's "disallowed special token" check
            raise TokenizerError(str(exc).splitlines()[0]) from exc

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        ids = list(ids)
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < SPECIAL_START_ID]
        return self._enc.decode(ids, errors=errors)

    def token_to_id(self, text: str) -> int:
        if text in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[text]
        rank = self._ranks.get(text.encode("utf-8"))
        if rank is None:
            raise TokenizerError(f"{text!r} is not a single token in the Qwen vocabulary")
        return rank

    def id_to_token_bytes(self, token_id: int) -> bytes:
        self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id)

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= VOCAB_SIZE):
            bad = next(i for i in ids if not 0 <= i < VOCAB_SIZE)
            raise TokenizerError(f"token id {bad} is outside the Qwen vocabulary (0..{VOCAB_SIZE - 1})")
