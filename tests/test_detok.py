"""Streaming detokenization must concatenate to the one-shot decode, emit no cut characters and no skipped
special-token text, for the Qwen tokenizer, a byte-level tokenizer.json and a SentencePiece-style one."""
from __future__ import annotations

import shutil

import pytest
from assets import qwen_vocab_path, write_tiny_chatml_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.tokenizer import HFTokenizer, IncrementalDetokenizer, QwenTokenizer

# Rare characters and emoji: several of them span more than one token in both vocabularies.
TEXTS = [
    "你好，世界！龘靐齉爩 是很少见的字。",
    "Emoji 🫠🪿🧌 and flags 🇨🇳🇺🇸 with a family 👨‍👩‍👧‍👦 — done.",
    "Mixed: café 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語 한국어 Ελληνικά 123\n\n  end",
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> QwenTokenizer:
    folder = tmp_path_factory.mktemp("qwen")
    shutil.copy(qwen_vocab_path(), folder / "qwen.tiktoken")
    return QwenTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    return HFTokenizer.from_folder(write_tiny_chatml_tokenizer(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def sentencepiece_like(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """Metaspace decoders drop the first token's leading space: the detokenizer must keep context for that."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(["the cat sat on the mat", "a dog ate my homework today"] * 5, trainer)
    folder = tmp_path_factory.mktemp("spm")
    tok.save(str(folder / "tokenizer.json"))
    return HFTokenizer.from_folder(folder)


def stream(tokenizer, ids: list[int], chunks: list[int], skip: bool) -> tuple[list[str], str]:
    """Feed `ids` in chunks of the given sizes (cycled); return the pieces from add() and from finish()."""
    detok, pieces, pos, i = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), [], 0, 0
    while pos < len(ids):
        size = chunks[i % len(chunks)]
        pieces.append(detok.add(ids[pos:pos + size]))
        pos, i = pos + size, i + 1
    return pieces, detok.finish()


def _split_char_positions(tokenizer, ids: list[int]) -> list[int]:
    """Indices k where ids[:k] ends inside a character (a prefix decode ends with U+FFFD)."""
    return [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]


@pytest.mark.parametrize("kind", ["qwen", "hf"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_one_shot(request: pytest.FixtureRequest, kind: str, text: str) -> None:
    tok = request.getfixturevalue(kind)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    body = tok.encode(text)
    cuts = _split_char_positions(tok, body)
    assert cuts, "test needs characters whose bytes span tokens"
    k = cuts[0]
    # Specials around the text and one inside a cut character.
    ids = [start, *tok.encode("assistant\n"), *body[:k], end, *body[k:], end]
    for skip in (True, False):
        expected = tok.decode(ids, skip_special_tokens=skip)
        for chunks in ([1], [2, 3], [len(ids)]):
            pieces, tail = stream(tok, ids, chunks, skip)
            assert "".join(pieces) + tail == expected
    pieces, tail = stream(tok, [start, *body, end], [1], skip=True)
    assert "".join(pieces) == text and tail == ""
    assert not any("\ufffd" in p or "<|im_" in p for p in pieces)  # no cut characters, no skipped specials


@pytest.mark.parametrize("kind", ["qwen", "hf"])
def test_finish_flushes_a_cut_character(request: pytest.FixtureRequest, kind: str) -> None:
    tok = request.getfixturevalue(kind)
    ids = tok.encode("ok 龘🫠")
    k = _split_char_positions(tok, ids)[-1]
    pieces, tail = stream(tok, ids[:k], [1], skip=True)
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + tail == tok.decode(ids[:k]) and tail.endswith("\ufffd")


def test_skipped_special_before_spaced_word(sentencepiece_like: HFTokenizer) -> None:
    tok = sentencepiece_like
    end = tok.token_to_id("<|im_end|>")
    # Each encode prepends "▁" to its first word, so the pieces decode as "the cat sat on ..." in one shot.
    ids = [*tok.encode("the cat"), end, *tok.encode("sat on the mat"), end, *tok.encode("a dog")]
    for skip in (True, False):
        pieces, tail = stream(tok, ids, [1], skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(stream(tok, ids, [1], True)[0]) == "the cat sat on the mat a dog"


class CountingTokenizer:
    """Records how many ids each decode call gets, to show the work per token stays bounded."""

    def __init__(self, inner) -> None:
        self.inner, self.sizes = inner, []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["qwen", "hf"])
def test_decode_window_stays_small(request: pytest.FixtureRequest, kind: str) -> None:
    tok = request.getfixturevalue(kind)
    ids = tok.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 500
    counting = CountingTokenizer(tok)
    pieces, tail = stream(counting, ids, [1], skip=True)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert max(counting.sizes) <= 10  # a head chunk plus at most one cut character's tokens


_specials = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
_text = st.lists(st.one_of(st.text(max_size=20), _specials), max_size=8).map("".join)
_chunks = st.lists(st.integers(1, 4), min_size=1, max_size=5)


@settings(max_examples=100, deadline=None)
@given(text=_text, chunks=_chunks, skip=st.booleans())
def test_random_text(qwen: QwenTokenizer, hf: HFTokenizer, text: str, chunks: list[int], skip: bool) -> None:
    for tok in (qwen, hf):
        ids = tok.encode(text)
        pieces, tail = stream(tok, ids, chunks, skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), chunks=_chunks, skip=st.booleans())
def test_random_ids_with_invalid_utf8(qwen: QwenTokenizer, hf: HFTokenizer, data, chunks, skip: bool) -> None:
    """Arbitrary id sequences, lone bytes included (ids 0..255 are single bytes in Qwen's ranks)."""
    for tok in (qwen, hf):
        any_id = st.one_of(st.integers(0, 255), st.integers(0, tok.vocab_size - 1))
        ids = data.draw(st.lists(any_id, max_size=30))
        pieces, tail = stream(tok, ids, chunks, skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
