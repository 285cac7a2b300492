"""Structured output: grammars (a JSON Schema, any JSON object, a regex, a fixed choice, a Lark/GBNF grammar)
compiled by llguidance once per spec and cached, one matcher per sequence, and in-place masking of the constrained
rows of a batch's logits (unconstrained rows are not touched).

llguidance sees the vocabulary as bytes: Qwen's tiktoken ranks and specials, or the folder's tokenizer.json; ids
between the tokenizer's vocabulary and the model's padded logits width are never allowed. A grammar that is
complete allows only the end-of-sequence ids; `is_terminated()` says so, and the engine ends the sequence.

In the engine: `GuidedDecoding.prefetch` starts a step's masks in a worker thread (llguidance drops the GIL) while
the model runs; the model runner's `apply_step_masks` waits for them and masks the rows before sampling; the
engine's `GuidedMatcher.follow` advances each matcher to its sequence's output after sampling.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance as llg
import torch

from qwen_awq.errors import GrammarError
from qwen_awq.tokenizer import Tokenizer

if TYPE_CHECKING:
    from qwen_awq.engine.sequence import Sequence as EngineSequence

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# JSON is emitted with Python's default separators and no other whitespace: a model may not stall in a loop of
# spaces and newlines (any whitespace is grammatical otherwise), and the output stays what json.dumps writes.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
DEFAULT_CACHE_SIZE = 128  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class GuidedSpec:
    """What one request's output must match; `value` is canonical text, so equal specs share a compiled grammar."""

    kind: Kind
    value: str = ""  # json_schema: the schema as JSON text; regex; choice: a JSON list; grammar: Lark/GBNF

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown structured-output kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind != "json_object" and not self.value:
            raise GrammarError(f"a {self.kind} constraint needs a non-empty value")

    @classmethod
    def json_object(cls) -> GuidedSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> GuidedSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
        # keys keep their order: properties are generated in the order the schema lists them
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def regex(cls, pattern: str) -> GuidedSpec:
        if not isinstance(pattern, str):
            raise GrammarError(f"a regex must be a string, got {type(pattern).__name__}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> GuidedSpec:
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError(f"guided_choice must be a non-empty list of non-empty strings, got {options!r}")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> GuidedSpec:
        if not isinstance(text, str):
            raise GrammarError(f"a grammar must be a string, got {type(text).__name__}")
        return cls("grammar", text)


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark rule body (`%json {...}`) for JSON that follows `schema`, written with JSON_OPTIONS: for grammars
    that embed JSON, such as a tool call's arguments."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def grammar_text(spec: GuidedSpec) -> str:
    """The spec in llguidance's grammar format (not yet checked)."""
    try:
        if spec.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if spec.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        return llg.grammar_from("choice" if spec.kind == "choice" else "grammar", spec.value)
    except ValueError as e:
        raise GrammarError(f"invalid {spec.kind}: {e}") from None


def build_lltokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> llg.LLTokenizer:
    """llguidance's byte-level view of either tokenizer kind, `vocab_size` (the logits width) ids wide."""
    from qwen_awq.tokenizer import HFTokenizer, QwenTokenizer
    from qwen_awq.tokenizer.qwen import PAT_STR, SPECIAL_START_ID, SPECIAL_TOKENS

    if vocab_size < tokenizer.vocab_size:
        raise GrammarError(f"logits width {vocab_size} is below the tokenizer's {tokenizer.vocab_size} ids")
    eos = sorted(set(eos_ids))
    if isinstance(tokenizer, QwenTokenizer):
        ranks = {tokenizer.id_to_token_bytes(i): i for i in range(SPECIAL_START_ID)}  # BPE bytes -> id
        return llg.LLTokenizer.from_tiktoken(encoder=ranks, special_tokens=SPECIAL_TOKENS, pattern=PAT_STR,
                                             eos_token=eos, n_vocab=vocab_size)
    if isinstance(tokenizer, HFTokenizer):
        return llg.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos)
    raise GrammarError(f"structured output does not know tokenizers of type {type(tokenizer).__name__}")


class GuidedMatcher:
    """One sequence's position in its grammar: the next allowed ids, then each sampled id in turn."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, owner: GuidedDecoding | None = None) -> None:
        self._matcher, self.vocab_size, self.owner = matcher, vocab_size, owner
        self.words = (vocab_size + 31) // 32  # int32 words of a bitmask, bit i of word k = id 32k + i
        self.num_accepted = 0  # ids consumed since the initial state

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the allowed ids into `out` (words,) int32, a contiguous CPU tensor."""
        if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != \
                self.words:
            raise ValueError(f"bitmask row must be a contiguous CPU int32 tensor of {self.words} words")
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), self.words * 4)

    def allowed_mask(self) -> torch.Tensor:
        """(vocab_size,) bool: the ids the grammar allows next."""
        bits = torch.empty(self.words, dtype=torch.int32)
        self.fill_bitmask(bits)
        return unpack_bitmask(bits[None], self.vocab_size)[0]

    def accept(self, token_id: int) -> None:
        """Advance past a sampled id; an id the mask did not allow is a bug in the caller."""
        if not self._matcher.consume_token(int(token_id)):
            raise RuntimeError(f"token {token_id} is not allowed by the grammar: {self._matcher.get_error()}")
        self.num_accepted += 1

    def follow(self, output_ids: Sequence[int]) -> None:
        """Bring the matcher to the end of a sequence's output ids: accept those it has not seen; when the output
        is shorter than what was accepted (tokens taken back), roll back first. Recompute after preemption keeps
        the output, so there the matcher simply stays where it is."""
        extra = self.num_accepted - len(output_ids)
        if extra > 0:
            if not self._matcher.rollback(extra):
                raise RuntimeError(f"cannot roll the grammar back by {extra} tokens: {self._matcher.get_error()}")
            self.num_accepted -= extra
        for token in output_ids[self.num_accepted:]:
            self.accept(token)

    def is_terminated(self) -> bool:
        """The grammar is complete (only end-of-sequence could follow) or end-of-sequence was accepted."""
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The text so far is a complete match (end-of-sequence is allowed now)."""
        return self._matcher.is_accepting()


class GuidedDecoding:
    """Structured output for one model: llguidance's tokenizer (built once: about a second for 150k ids), an LRU
    of compiled grammars keyed by spec (safe to use from several threads), and the masks of a step: computed by
    llguidance's thread pool, started early by `prefetch` so that they overlap the model's forward pass."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.lltokenizer = build_lltokenizer(tokenizer, vocab_size, eos_ids)
        self.cache_size = cache_size
        self._compiled: OrderedDict[GuidedSpec, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles in its CPU threads while the engine thread copies
        self._executor = llg.LLExecutor()
        self._worker: ThreadPoolExecutor | None = None  # one thread: prefetched steps never overlap
        self._pending: tuple[tuple[GuidedMatcher, ...], Future[torch.Tensor]] | None = None

    def compile(self, spec: GuidedSpec) -> llg.LLMatcher:
        """The spec's checked grammar in its initial state (cached); raises GrammarError with the reason."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        compiled = _compile(spec, self.lltokenizer)  # outside the lock: a large grammar takes a while
        with self._lock:
            self._compiled[spec] = compiled
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: GuidedSpec) -> GuidedMatcher:
        """A fresh per-sequence matcher (a copy of the compiled grammar's initial state)."""
        compiled = self.compile(spec)
        with self._lock:
            return GuidedMatcher(compiled.deep_copy(), self.vocab_size, self)

    def fill(self, matchers: Sequence[GuidedMatcher]) -> torch.Tensor:
        """(len(matchers), words) int32 CPU bitmasks of the matchers' next ids, computed in parallel."""
        pinned = torch.cuda.is_available()  # a pinned buffer makes the copy to the GPU asynchronous
        bitmask = torch.empty((len(matchers), (self.vocab_size + 31) // 32), dtype=torch.int32, pin_memory=pinned)
        pairs = [(m._matcher, j) for j, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers))
        return bitmask

    def prefetch(self, matchers: Sequence[GuidedMatcher | None]) -> None:
        """Start computing the masks of a step's sampling rows (None: unconstrained) in the background."""
        rows = tuple(m for m in matchers if m is not None)
        if not rows:
            self._pending = None
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="qwen-awq-guided")
        self._pending = (rows, self._worker.submit(self.fill, rows))

    def apply_masks(self, logits: torch.Tensor, matchers: Sequence[GuidedMatcher | None]) -> None:
        """Mask, in place, the rows of logits (rows, vocab) whose matcher is not None, with the prefetched masks
        when they were started for exactly these matchers (else computed now)."""
        check_rows(logits, matchers)
        rows = [i for i, m in enumerate(matchers) if m is not None]
        pending, self._pending = self._pending, None
        if not rows:
            return
        constrained = [matchers[i] for i in rows]
        if pending is not None and len(pending[0]) == len(rows) and all(
                a is b for a, b in zip(pending[0], constrained, strict=True)):
            bitmask = pending[1].result()
        else:
            if pending is not None:  # stale: let it finish, so that no matcher is in two computations at once
                pending[1].exception()
            bitmask = self.fill(constrained)
        mask_rows(logits, rows, bitmask)


def _compile(spec: GuidedSpec, lltokenizer: llg.LLTokenizer) -> llg.LLMatcher:
    grammar = grammar_text(spec)
    problem = llg.LLMatcher.validate_grammar(grammar, lltokenizer)
    if problem:
        raise GrammarError(f"invalid {spec.kind}: {problem}")
    compiled = llg.LLMatcher(lltokenizer, grammar, log_level=0)
    if compiled.is_error():
        raise GrammarError(f"invalid {spec.kind}: {compiled.get_error()}")
    return compiled


def apply_step_masks(logits: torch.Tensor, seqs: Sequence[EngineSequence]) -> None:
    """The model runner's hook: mask, in place, the rows of a step's logits (S, V) whose sequence carries a
    matcher, before penalties and temperature; rows of unconstrained sequences are not touched."""
    matchers = [seq.matcher for seq in seqs]
    owner = next((m.owner for m in matchers if m is not None), None)
    if owner is not None:
        owner.apply_masks(logits, matchers)


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, width) bool; ids past the mask's 32 * words are not allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (rows, words, 32): bit i of word k is id 32k + i
    allowed = bits.reshape(bitmask.shape[0], -1).bool()  # (rows, 32 * words)
    if allowed.shape[1] >= width:
        return allowed[:, :width]
    return torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)


def check_rows(logits: torch.Tensor, matchers: Sequence[GuidedMatcher | None]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits {tuple(logits.shape)} need one matcher (or None) per row, got {len(matchers)}")
    if len({m.words for m in matchers if m is not None}) > 1:
        raise ValueError("matchers of one batch must share a vocabulary width")


def mask_rows(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the ids that `bitmask` (len(rows), words) int32 does not allow in those rows."""
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])  # (R, V)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))  # index_put_: writes only those rows


def apply_guided_masks(logits: torch.Tensor, matchers: Sequence[GuidedMatcher | None],
                       executor: llg.LLExecutor | None = None) -> None:
    """Set to -inf, in place, the disallowed ids of each row of logits (rows, vocab) whose matcher is not None."""
    check_rows(logits, matchers)
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = torch.empty((len(rows), matchers[rows[0]].words), dtype=torch.int32)  # (constrained rows, words)
    if executor is not None:
        pairs = [(matchers[i]._matcher, j) for j, i in enumerate(rows)]
        executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, len(rows))
    else:
        for j, i in enumerate(rows):
            matchers[i].fill_bitmask(bitmask[j])
    mask_rows(logits, rows, bitmask)
