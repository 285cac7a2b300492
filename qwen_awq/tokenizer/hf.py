"""Tokenizer for Llama-family folders: `tokenizer.json` through the `tokenizers` library, specials and chat
template from `tokenizer_config.json`. Same interface as QwenTokenizer.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer as RustTokenizer

from qwen_awq.errors import TokenizerError

AllowedSpecial = Literal["all"] | Collection[str]
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
# Used only when tokenizer_config.json names no eos_token: the end-of-text markers of common families.
EOS_FALLBACKS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>")
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable Latin-1 bytes stand for themselves, the other bytes
    for code points 256, 257, ... in byte order (the ByteLevel pre-tokenizer of `tokenizers`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _is_byte_level(spec: dict[str, Any]) -> bool:
    """Whether tokenizer.json's decoder is (or contains) ByteLevel."""
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The template from tokenizer_config.json, else chat_template.jinja (newer transformers)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}], "default" is what transformers uses
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _check_encodable(text: str) -> None:
    """A lone UTF-16 surrogate (JSON "\\ud800") has no UTF-8 form, so `tokenizers` cannot take the text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"the text holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}), "
                             "which is not a character; send valid Unicode") from None


def _ids(tokenizer: RustTokenizer, text: str) -> list[int]:
    # encode_batch_fast releases the GIL while it works (encode holds it: seconds for megabytes of text, during
    # which no other thread of the process, such as a server's event loop, can run) and skips char offsets.
    return tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts transformers keeps in tokenizer_config.json."""

    def __init__(
        self, tokenizer: RustTokenizer, config: dict[str, Any], chat_template: str | None = None
    ) -> None:
        self._tok = tokenizer
        # encode_special_tokens is a mutable switch on the Rust object; a second copy keeps encode reentrant.
        spec = tokenizer.to_str()
        self._plain = RustTokenizer.from_str(spec)
        self._plain.encode_special_tokens = True
        self._byte_alphabet = _byte_level_alphabet() if _is_byte_level(json.loads(spec)) else None
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        added = tokenizer.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self._specials = {t.content: i for i, t in added.items() if t.special}
        self.special_ids: frozenset[int] = frozenset(self._specials.values())
        self.eos_token_id: int = self._resolve_eos(config)
        bos = _token_content(config.get("bos_token"))
        self.bos_token_id: int | None = self.token_to_id(bos) if bos else None
        self.add_bos_token: bool = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.im_start_id: int | None = tokenizer.token_to_id("<|im_start|>")
        self.im_end_id: int | None = tokenizer.token_to_id("<|im_end|>")
        markers = {tokenizer.token_to_id(m) for m in CHATML_MARKERS} - {None}
        self.stop_token_ids: frozenset[int] = frozenset({self.eos_token_id, *markers})
        self.chat_template: str | None = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} not found: a Llama-family folder needs tokenizer.json")
        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on malformed files
            raise TokenizerError(f"cannot load {path}: {exc}") from exc
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        return cls(tokenizer, config, _chat_template(folder, config))

    def _resolve_eos(self, config: dict[str, Any]) -> int:
        eos = _token_content(config.get("eos_token"))
        if eos:
            return self.token_to_id(eos)
        for candidate in EOS_FALLBACKS:
            found = self._tok.token_to_id(candidate)
            if found is not None:
                return found
        raise TokenizerError(
            f"tokenizer_config.json has no eos_token and none of {EOS_FALLBACKS} is in the vocabulary"
        )

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = "all",
        disallowed_special: AllowedSpecial = (),
    ) -> list[int]:
        """"all" parses special-token text, an empty set encodes it as plain text; BOS iff add_bos_token."""
        allowed = set(self._specials) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self._specials) - allowed if disallowed_special == "all" else set(disallowed_special)
        unknown = (allowed | disallowed) - self._specials.keys()
        if unknown:
            raise TokenizerError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        found = sorted(name for name in disallowed if name in text)
        if found:
            raise TokenizerError(f"text contains disallowed special tokens {found}")
        _check_encodable(text)
        if allowed == set(self._specials):
            ids = _ids(self._tok, text)
        elif not allowed:
            ids = _ids(self._plain, text)
        else:
            ids = self._encode_some_specials(text, allowed)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]  # a template that already starts with BOS must not get two
        return ids

    def _encode_some_specials(self, text: str, allowed: set[str]) -> list[int]:
        """Split on the allowed specials (longest first, as `tokenizers` does); encode gaps plainly."""
        pattern = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
        ids: list[int] = []
        for piece in re.split(f"({pattern})", text):
            if piece in allowed:
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(_ids(self._plain, piece))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Invalid UTF-8 always becomes U+FFFD (the Rust decoder's only mode); `errors` exists for parity."""
        if errors != "replace":
            raise TokenizerError(f"HFTokenizer.decode supports only errors='replace', got {errors!r}")
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its text; SentencePiece: "▁" is a space)."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if token_id in self._added_ids:
            return token.encode("utf-8")
        if self._byte_alphabet is not None:
            return bytes(self._byte_alphabet[c] for c in token)
        byte = BYTE_TOKEN.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace("\u2581", " ").encode("utf-8")

    def to_json(self) -> str:
        """The tokenizer.json text, for libraries that build their own view of the vocabulary (llguidance)."""
        return self._tok.to_str()

    def token_to_id(self, text: str) -> int:
        found = self._tok.token_to_id(text)
        if found is None:
            raise TokenizerError(f"{text!r} is not a token of this tokenizer")
        return found

    @property
    def normalizer_keeps_text(self) -> bool:
        """Whether normalization never deletes text (none, Unicode normal forms, prepends, non-empty
        replacements, lowercasing), so that one token stands for a bounded number of input bytes."""
        spec = self._tok.normalizer
        if spec is None:
            return True
        state = json.loads(spec.__getstate__())
        parts = state.get("normalizers", []) if state.get("type") == "Sequence" else [state]
        keeping = {"NFC", "NFD", "NFKC", "NFKD", "Prepend", "Lowercase"}
        return all(n.get("type") in keeping or (n.get("type") == "Replace" and n.get("content")) for n in parts)
