"""Calibration tokens for the AWQ search: documents of <= seqlen tokens, concatenated and cut into seqlen
blocks (AutoAWQ's recipe, spec/awq.md "Calibration default"), from the offline corpus or a .txt / .jsonl file.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_awq.chat import DEFAULT_SYSTEM
from qwen_awq.errors import ConfigError
from qwen_awq.eval.corpus import calibration_texts
from qwen_awq.tokenizer import Tokenizer

FORMATS = ("text", "chatml")
# Qwen-7B-Chat's default system prompt (its generation code and chat template use it).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Document:
    """One calibration document: plain text, or (role, content) turns from a .jsonl "messages" list."""

    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if bool(self.text) == bool(self.messages):
            raise ValueError("a Document holds either text or messages")


def load_calibration(
    tokenizer: Tokenizer,
    path: Path | None = None,
    fmt: str = "text",
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Token blocks (n_blocks <= samples, seqlen) from `path` or the offline corpus, deterministic for `seed`.

    Documents are visited in a seeded random order; longer than seqlen tokens are skipped, the rest are
    concatenated until `samples` blocks are filled (or the text runs out).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown calibration format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if samples < 1 or seqlen < 2:
        raise ConfigError(f"calibration needs samples >= 1 and seqlen >= 2, got {samples} and {seqlen}")
    if fmt == "chatml" and (tokenizer.im_start_id is None or tokenizer.im_end_id is None):
        raise ConfigError("--calib-format chatml needs <|im_start|> and <|im_end|> tokens; use text")
    source = str(path) if path is not None else "the offline calibration corpus"
    docs = read_documents(Path(path)) if path is not None else [Document(text=t) for t in calibration_texts()]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids, used, skipped = _concatenate(tokenizer, [docs[i] for i in order], fmt, samples * seqlen, seqlen)
    n_blocks = min(samples, len(ids) // seqlen)
    if n_blocks == 0:
        raise ConfigError(
            f"{source}: only {len(ids)} tokens from {used} documents of <= {seqlen} tokens ({skipped} longer "
            f"ones skipped); calibration needs at least {seqlen}: add text or lower --seqlen"
        )
    return torch.tensor(ids[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen)  # (blocks, seqlen)


def _concatenate(
    tokenizer: Tokenizer, docs: list[Document], fmt: str, want: int, seqlen: int
) -> tuple[list[int], int, int]:
    """(ids of the accepted documents in order until `want` tokens, documents used, documents skipped)."""
    ids: list[int] = []
    used = skipped = 0
    for doc in docs:
        if len(ids) >= want:
            break
        doc_ids = encode_document(tokenizer, doc, fmt)
        if len(doc_ids) > seqlen:
            skipped += 1
            continue
        ids.extend(doc_ids)
        used += 1
    return ids, used, skipped


def encode_document(tokenizer: Tokenizer, doc: Document, fmt: str) -> list[int]:
    """Token ids of one document; its text is data, so special-token text in it stays plain tokens."""
    if fmt == "text":
        if doc.messages:
            raise ConfigError("calibration records with \"messages\" need --calib-format chatml")
        return _plain(tokenizer, doc.text, keep_bos=True)
    messages = doc.messages or _as_chat(doc.text)
    if messages[0][0] != "system":
        messages = (("system", DEFAULT_SYSTEM), *messages)
    return chatml_ids(tokenizer, messages)


def chatml_ids(tokenizer: Tokenizer, messages: tuple[tuple[str, str], ...]) -> list[int]:
    """`<|im_start|>role\\ncontent<|im_end|>` per turn, turns joined by "\\n", as Qwen's make_context builds
    them: role, newline and content are encoded separately and the markers are inserted as ids."""
    start, end = tokenizer.im_start_id, tokenizer.im_end_id
    if start is None or end is None:
        raise ConfigError("this tokenizer has no <|im_start|>/<|im_end|> tokens; use --calib-format text")
    newline = _plain(tokenizer, "\n")
    ids: list[int] = []
    for turn, (role, content) in enumerate(messages):
        if turn:
            ids.extend(newline)
        ids.extend([start, *_plain(tokenizer, role), *newline, *_plain(tokenizer, content), end])
    return ids


def _as_chat(text: str) -> tuple[tuple[str, str], ...]:
    """A plain document as one exchange: its first sentence is the user's turn, the rest the assistant's."""
    parts = SENTENCE_END.split(text, maxsplit=1)
    if len(parts) == 1:  # a single sentence: split it between the words in the middle
        words = text.split(" ")
        half = max(1, len(words) // 2)
        parts = [" ".join(words[:half]), " ".join(words[half:])]
    return (("user", parts[0]), ("assistant", parts[1]))


def _plain(tokenizer: Tokenizer, text: str, keep_bos: bool = False) -> list[int]:
    """Encode with special-token parsing off; a BOS the tokenizer adds by itself is kept only when asked."""
    ids = tokenizer.encode(text, allowed_special=set(), disallowed_special=())
    bos = tokenizer.bos_token_id
    if not keep_bos and bos is not None and ids[:1] == [bos]:
        return ids[1:]
    return ids


def read_documents(path: Path) -> list[Document]:
    """.txt: documents separated by blank lines; .jsonl: one {"text": ...} or {"messages": [...]} per line."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"calibration file {path} must be .txt (blank-line separated) or .jsonl")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc}") from exc
    if suffix == ".txt":
        chunks = re.split(r"\n\s*\n", content)
        return [Document(text=c.strip()) for c in chunks if c.strip()]
    lines = enumerate(content.splitlines(), start=1)
    docs = [_parse_record(path, n, line) for n, line in lines if line.strip()]
    return [d for d in docs if d is not None]


def _parse_record(path: Path, lineno: int, line: str) -> Document | None:
    """One .jsonl line; None for a record whose text is empty (nothing to calibrate on)."""
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        text = record["text"].strip()
        return Document(text=text) if text else None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected an object with a \"text\" string or a \"messages\" list")
    turns = []
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f"{where}: each message needs string \"role\" and \"content\" fields")
        turns.append((m["role"], m["content"]))
    return Document(messages=tuple(turns))
