"""Streaming detokenization: turn generated ids into text pieces that are always complete characters and
concatenate to exactly the one-shot decode.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_awq.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decode(errors="replace") gives for a UTF-8 sequence cut at the end


class IncrementalDetokenizer:
    """Decodes a short window of recent ids per step instead of the whole sequence.

    The window is the last emitted chunk of ids (the head) plus the ids not emitted yet; the new text is
    decode(window) minus decode(head). Keeping the head as context matters for decoders that strip a leading
    space from the first token (SentencePiece-style). A trailing U+FFFD means a character may still be cut,
    so we wait.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # ids before the window are dropped: their text is out
        self._head_len = 0  # window[:_head_len] is the last emitted chunk

    def add(self, token_ids: list[int]) -> str:
        """Append ids; return the text that became complete (possibly "")."""
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        head, window = self._decode()
        if window.endswith(REPLACEMENT) or len(window) <= len(head):
            # A cut character, or nothing visible yet (e.g. a skipped special): keep the same head so a
            # space-stripping decoder still sees the same first token next time.
            return ""
        return self._emit(window[len(head):])

    def finish(self) -> str:
        """Flush the rest, with any cut character as U+FFFD (what one-shot decode gives)."""
        head, window = self._decode()
        if len(window) <= len(head):
            return ""
        return self._emit(window[len(head):])

    def _decode(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        head = decode(self._window[:self._head_len], skip_special_tokens=skip)
        return head, decode(self._window, skip_special_tokens=skip)

    def _emit(self, piece: str) -> str:
        del self._window[:self._head_len]  # the ids just emitted become the next head
        self._head_len = len(self._window)
        return piece
