"""Streaming detokenization: turn generated ids into text pieces that are always complete characters.

The pieces concatenate to the one-shot decode minus the U+FFFD characters that stand for cut or invalid UTF-8
(a reply cut inside an emoji, a model that sampled half a character): text never shows a replacement character
that the token bytes do not contain.
"""
from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_awq.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decode(errors="replace") gives for each cut or invalid UTF-8 sequence


def utf8_state(data: bytes) -> tuple[int, bool]:
    """(real U+FFFD characters in the valid parts of `data`, whether it ends inside a character that more bytes
    could still complete)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text = decoder.decode(data, final=False)
    pending, _ = decoder.getstate()
    return text.count(REPLACEMENT), bool(pending)


class IncrementalDetokenizer:
    """Decodes a short window of recent ids per step instead of the whole sequence.

    The window is the last emitted chunk of ids (the head) plus the ids not emitted yet; the new text is
    decode(window) minus decode(head). Keeping the head as context matters for decoders that strip a leading
    space from the first token (SentencePiece-style). When the window's bytes end inside a character we wait;
    U+FFFD that the bytes do not contain (invalid sequences) are dropped from the piece.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # ids before the window are dropped: their text is out
        self._head_len = 0  # window[:_head_len] is the last emitted chunk
        # Tokenizers without a bytes view (test doubles) fall back to trusting every U+FFFD.
        self._token_bytes: Callable[[int], bytes] | None = getattr(tokenizer, "id_to_token_bytes", None)

    def add(self, token_ids: list[int]) -> str:
        """Append ids; return the text that became complete (possibly "")."""
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        head, window = self._decode()
        if self._cut_at_end(window) or len(window) <= len(head):
            # A cut character, or nothing visible yet (e.g. a skipped special): keep the same head so a
            # space-stripping decoder still sees the same first token next time.
            return ""
        return self._emit(self._clean(window[len(head):]))

    def finish(self) -> str:
        """Flush the rest; a character cut at the very end is dropped (its bytes never completed)."""
        head, window = self._decode()
        if len(window) <= len(head):
            return ""
        return self._emit(self._clean(window[len(head):]))

    def _decode(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        head = decode(self._window[:self._head_len], skip_special_tokens=skip)
        return head, decode(self._window, skip_special_tokens=skip)

    def _bytes(self, ids: list[int]) -> bytes:
        assert self._token_bytes is not None
        special = self.tokenizer.special_ids if self.skip_special_tokens else frozenset()
        return b"".join(self._token_bytes(i) for i in ids if i not in special)

    def _cut_at_end(self, window: str) -> bool:
        if self._token_bytes is None:
            return window.endswith(REPLACEMENT)
        return window.endswith(REPLACEMENT) and utf8_state(self._bytes(self._window))[1]

    def _clean(self, piece: str) -> str:
        """Drop the U+FFFD in `piece` that stand for invalid bytes, keeping those the bytes really contain."""
        if REPLACEMENT not in piece or self._token_bytes is None:
            return piece
        real = utf8_state(self._bytes(self._window))[0] - utf8_state(self._bytes(self._window[:self._head_len]))[0]
        if real == 0:
            return piece.replace(REPLACEMENT, "")
        if real == piece.count(REPLACEMENT):
            return piece
        # Real and invalid ones mixed (rare): rebuild the piece from bytes. Byte-level vocabularies decode to
        # exactly their bytes, so this equals the decoder's text with the invalid sequences removed.
        window = self._bytes(self._window).decode("utf-8", errors="ignore")
        head = self._bytes(self._window[:self._head_len]).decode("utf-8", errors="ignore")
        return window[len(head):]

    def _emit(self, piece: str) -> str:
        del self._window[:self._head_len]  # the ids just emitted become the next head
        self._head_len = len(self._window)
        return piece
