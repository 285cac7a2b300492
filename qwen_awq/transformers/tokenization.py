"""`QWenTokenizer`: a transformers PreTrainedTokenizer over our exact Qwen v1 tokenizer (qwen.tiktoken), named like
Qwen's own class so a folder's tokenizer_config.json ("tokenizer_class": "QWenTokenizer") finds it; the folder's
tokenization_qwen.py is never imported. Tokens are bytes (specials: their text), as in Qwen's tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

from qwen_awq.tokenizer import qwen as qwen_tok
from qwen_awq.tokenizer.qwen import ENDOFTEXT, SPECIAL_TOKENS, VOCAB_FILE, VOCAB_SIZE, QwenTokenizer

SPECIAL_NAMES = {i: t for t, i in SPECIAL_TOKENS.items()}


class QWenTokenizer(PreTrainedTokenizer):
    """`tokenizer(text)` parses special-token text like Qwen's (allowed_special="all"); decode skips ids beyond
    the vocabulary (the model's 151936 logits include 85 padding ids)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs: Any) -> None:
        self.qwen = QwenTokenizer(vocab_file)
        self.errors = errors
        self.vocab_file = vocab_file
        self.eod_id = SPECIAL_TOKENS[ENDOFTEXT]  # Qwen's own attribute names
        self.im_start_id, self.im_end_id = SPECIAL_TOKENS[qwen_tok.IM_START], SPECIAL_TOKENS[qwen_tok.IM_END]
        self._added_tokens_decoder = {i: AddedToken(t, special=True, normalized=False)
                                      for t, i in SPECIAL_TOKENS.items()}
        # <|endoftext|> is config.json's eos and generation_config's pad (Qwen-7B-Chat); the model's own
        # generation_config also stops at <|im_start|>/<|im_end|>.
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("model_max_length", 8192)
        kwargs.pop("added_tokens_decoder", None)  # a saved config's copy of the specials above
        super().__init__(errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> dict[bytes | str, int]:
        return self._byte_ids() | SPECIAL_TOKENS

    def _byte_ids(self) -> dict[bytes, int]:
        """BPE token bytes -> id, built on first use (tokenize never needs it: ids come from tiktoken)."""
        if not hasattr(self, "_byte_id_cache"):
            self._byte_id_cache = {self.qwen.id_to_token_bytes(i): i for i in range(qwen_tok.SPECIAL_START_ID)}
        return self._byte_id_cache

    def tokenize(self, text: str, allowed_special: Any = "all", disallowed_special: Any = (),  # type: ignore[override]
                 **kwargs: Any) -> list[bytes | str]:
        ids = self.qwen.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self._convert_id_to_token(i) for i in ids]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if isinstance(token, str):
            return self.qwen.token_to_id(token)
        found = self._byte_ids().get(token)
        if found is None:
            raise KeyError(f"{token!r} is not a token of the Qwen vocabulary")
        return found

    def _convert_id_to_token(self, index: int) -> bytes | str:
        return SPECIAL_NAMES[index] if index in SPECIAL_NAMES else self.qwen.id_to_token_bytes(index)

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        data = b"".join(t.encode("utf-8") if isinstance(t, str) else t for t in tokens)
        return data.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, errors: str | None = None,
                **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        ids = [i for i in ids if 0 <= i < VOCAB_SIZE]
        return self.qwen.decode(ids, skip_special_tokens=skip_special_tokens, errors=errors or self.errors)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}{VOCAB_FILE}"
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)
