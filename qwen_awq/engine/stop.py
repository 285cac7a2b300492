"""Stop-string matching over streamed text: emit what is safe, hold back a possible stop-string prefix,
and trim the first stop string to complete, even when it is split across pieces."""
from __future__ import annotations


class StopChecker:
    """Feed text pieces in order; `feed` returns the text that may be shown now.

    After a match `stopped` is true and `matched` names the stop string; the text after it is dropped.
    When generation ends for another reason, `flush()` returns the held-back tail.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # Every proper prefix of a stop string: a text ending in one of these may still become a match.
        self._prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        if self.stopped:
            raise RuntimeError("StopChecker.feed called after a stop string matched")
        text = self._held + piece
        match = self._first_match(text)
        if match is not None:
            start, stop_str = match
            self.stopped, self.matched, self._held = True, stop_str, ""
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            return text[:end]
        hold = self._hold_length(text)
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Release the held-back text (generation ended without completing a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The occurrence that ends first (on a tie, the longer one), as (start, stop string).

        Ending first is what a character-by-character stream would see first, so the result does not
        depend on how the text was split into pieces.
        """
        best: tuple[int, str] | None = None
        for stop_str in self.stop:
            start = text.find(stop_str)
            if start < 0:
                continue
            key = (start + len(stop_str), start)
            if best is None or key < (best[0] + len(best[1]), best[0]):
                best = (start, stop_str)
        return best

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for length in range(min(self._max_hold, len(text)), 0, -1):
            if text[-length:] in self._prefixes:
                return length
        return 0
