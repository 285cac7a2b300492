"""Per-sequence output bookkeeping: turns sampled ids into streamed text (incremental detokenization + stop
strings) and decides when a sequence ends and why."""
from __future__ import annotations

from collections.abc import Iterable

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.sequence import FinishReason
from qwen_awq.engine.stop import StopChecker
from qwen_awq.errors import SamplingError
from qwen_awq.tokenizer import IncrementalDetokenizer, Tokenizer


def eos_ids(tokenizer: Tokenizer | None, model_eos: Iterable[int] = ()) -> frozenset[int]:
    """Ids that end generation unless ignore_eos: the tokenizer's turn-ending ids (Qwen: all three) and the model's."""
    if tokenizer is None:
        return frozenset(model_eos)
    return frozenset(tokenizer.stop_token_ids) | {tokenizer.eos_token_id} | frozenset(model_eos)


def row_stop_ids(params: SamplingParams, eos: frozenset[int]) -> frozenset[int]:
    """Ids that end this request: eos (unless ignore_eos) plus the request's own stop_token_ids."""
    return (frozenset() if params.ignore_eos else eos) | frozenset(params.stop_token_ids)


class OutputTracker:
    """Feed sampled ids one at a time; `add` returns the text that may be shown now and sets `finish_reason`.

    Without a tokenizer it tracks ids only (text stays empty) and refuses stop strings.
    """

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, eos: frozenset[int], prompt_len: int,
                 max_model_len: int) -> None:
        if params.stop and tokenizer is None:
            raise SamplingError("stop strings need a tokenizer: pass tokenizer=...")
        self.params = params
        self.stop_ids = row_stop_ids(params, eos)
        self.eos = eos
        self.detok = None if tokenizer is None else \
            IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stops = StopChecker(params.stop, params.include_stop_str_in_output)
        self.limit = min(params.max_tokens, max_model_len - prompt_len)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None  # the id or string that stopped it (vLLM's field)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, grammar_done: bool = False) -> str:
        """`grammar_done`: the sequence's structured-output grammar is complete, which ends it with "stop" (an end
        id it took to get there is a stop id then, even with ignore_eos)."""
        if self.finished:
            raise RuntimeError("token added to a finished sequence")
        self.token_ids.append(token)
        if token in self.stop_ids or (grammar_done and token in self.eos):
            self.finish_reason, self.stop_reason = FinishReason.STOP, token
            return self._emit("", final=True)
        piece = self.stops.feed(self.detok.add([token])) if self.detok is not None else ""
        if self.stops.stopped:
            self.finish_reason, self.stop_reason = FinishReason.STOP, self.stops.matched
            return self._emit(piece, final=False)
        if grammar_done:
            self.finish_reason = FinishReason.STOP
            return self._emit(piece, final=True)
        if len(self.token_ids) >= self.limit:
            self.finish_reason = FinishReason.LENGTH
            return self._emit(piece, final=True)
        return self._emit(piece, final=False)

    def _emit(self, piece: str, final: bool) -> str:
        """On a natural end, release held-back detokenizer bytes and stop-string prefixes."""
        if final:
            tail = self.detok.finish() if self.detok is not None else ""
            piece += self.stops.feed(tail) if tail and not self.stops.stopped else ""
            if not self.stops.stopped:
                piece += self.stops.flush()
        self.text += piece
        return piece
