"""Streaming detokenization must concatenate to the one-shot decode (less the U+FFFD that stand for cut or invalid
UTF-8), emit no cut characters and no skipped special-token text, for the Qwen tokenizer, a byte-level
tokenizer.json, a SentencePiece-style one and a byte-fallback one; it never shows a U+FFFD that the bytes lack."""
from __future__ import annotations

import shutil
import unicodedata

import pytest
from assets import qwen_vocab_path, write_tiny_chatml_tokenizer
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwen_awq.tokenizer import HFTokenizer, IncrementalDetokenizer, QwenTokenizer

FFFD = "\ufffd"

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
        expected = tok.decode(ids, skip_special_tokens=skip).replace(FFFD, "")  # the cut at k is invalid UTF-8
        for chunks in ([1], [2, 3], [len(ids)]):
            pieces, tail = stream(tok, ids, chunks, skip)
            assert "".join(pieces) + tail == expected
    pieces, tail = stream(tok, [start, *body, end], [1], skip=True)
    assert "".join(pieces) == text and tail == ""
    assert not any("\ufffd" in p or "<|im_" in p for p in pieces)  # no cut characters, no skipped specials


@pytest.mark.parametrize("kind", ["qwen", "hf"])
def test_finish_drops_a_cut_character(request: pytest.FixtureRequest, kind: str) -> None:
    tok = request.getfixturevalue(kind)
    ids = tok.encode("ok 龘🫠")
    k = _split_char_positions(tok, ids)[-1]
    pieces, tail = stream(tok, ids[:k], [1], skip=True)
    assert tok.decode(ids[:k]).endswith(FFFD)  # what a plain decode shows for the cut reply
    assert "".join(pieces) + tail == "ok 龘" and FFFD not in tail


def test_cut_reply_from_the_issue(qwen: QwenTokenizer) -> None:
    """'你好! 😊👏✨👍' cut inside an emoji, once mid-reply and once after 👍: Qwen splits ' 😊' over two tokens."""
    ids = qwen.encode("你好! 😊👏✨👍")
    assert [qwen.id_to_token_bytes(i) for i in ids[2:4]] == [b" \xf0\x9f\x98", b"\x8a"]
    for reply, expected in ((ids[:3], "你好! "), ([*ids, ids[2]], "你好! 😊👏✨👍 ")):
        assert qwen.decode(reply).endswith(FFFD)
        for chunks in ([1], [2], [len(reply)]):
            pieces, tail = stream(qwen, reply, chunks, skip=True)
            assert "".join(pieces) + tail == expected


def _byte_id(tok, byte: bytes) -> int:
    """The id of the single-byte token `byte` (Qwen's first 256 ranks; the byte-level alphabet)."""
    return next(i for i in range(tok.vocab_size) if i not in tok.special_ids and tok.id_to_token_bytes(i) == byte)


@pytest.mark.parametrize("kind", ["qwen", "hf"])
def test_invalid_bytes_mid_stream_are_dropped(request: pytest.FixtureRequest, kind: str) -> None:
    """'Lux' + a lone lead byte of a 3-byte character + 'totechnology' (the web page's 'Lux\ufffdtotechnology')."""
    tok = request.getfixturevalue(kind)
    ids = [*tok.encode("Lux"), _byte_id(tok, b"\xe4"), *tok.encode("totechnology")]
    assert tok.decode(ids) == "Lux\ufffdtotechnology"
    for chunks in ([1], [2, 1], [len(ids)]):
        pieces, tail = stream(tok, ids, chunks, skip=True)
        assert "".join(pieces) + tail == "Luxtotechnology"


@pytest.mark.parametrize("kind", ["qwen", "hf"])
def test_real_replacement_character_is_kept(request: pytest.FixtureRequest, kind: str) -> None:
    """A U+FFFD that the text really contains (bytes EF BF BD) streams through, once."""
    tok = request.getfixturevalue(kind)
    ids = tok.encode("bad \ufffd char 龘")
    for chunks in ([1], [3], [len(ids)]):
        pieces, tail = stream(tok, ids, chunks, skip=True)
        assert "".join(pieces) + tail == "bad \ufffd char 龘"
    mixed = [*tok.encode("a\ufffd"), _byte_id(tok, b"\xe4"), *tok.encode("b")]  # a real one and an invalid byte
    pieces, tail = stream(tok, mixed, [len(mixed)], skip=True)
    assert "".join(pieces) + tail == "a\ufffdb"


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A Llama-2-style SentencePiece BPE: characters outside the vocabulary become <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["\u2581", "a", "b", "c", "o", "k", "\u2581o", "\u2581ok"]
    vocab = {"<unk>": 0, "<|im_end|>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    vocab |= {p: len(vocab) + i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "o"), ("\u2581o", "k")], unk_token="<unk>",
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<|im_end|>"])
    folder = tmp_path_factory.mktemp("byte-fallback")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    return HFTokenizer.from_folder(folder)


def test_byte_fallback_tokens(byte_fallback: HFTokenizer) -> None:
    tok = byte_fallback
    ids = tok.encode("ok 龘🫠 abc")
    assert sum(tok.id_to_token_bytes(i) in {bytes([b]) for b in range(128, 256)} for i in ids) == 7  # 3 + 4 bytes
    assert tok.decode(ids) == "ok 龘🫠 abc"
    assert b"".join(tok.id_to_token_bytes(i) for i in ids) == " ok 龘🫠 abc".encode()  # "▁" is the leading space
    for chunks in ([1], [2, 3]):
        pieces, tail = stream(tok, ids, chunks, skip=True)
        assert "".join(pieces) + tail == "ok 龘🫠 abc" and not any(FFFD in p for p in pieces)
    cut = ids[:ids.index(tok.token_to_id("<0xF0>")) + 2]  # 'ok 龘' + two bytes of 🫠
    assert tok.decode(cut).endswith(FFFD)
    assert "".join(stream(tok, cut, [1], skip=True)[0]) + stream(tok, cut, [1], skip=True)[1] == "ok 龘"
    middle = [*cut, *tok.encode("abc")]  # the cut bytes are followed by more text: invalid, dropped
    assert FFFD in tok.decode(middle)
    pieces, tail = stream(tok, middle, [1], skip=True)
    assert "".join(pieces) + tail == "ok 龘 abc"


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
        if FFFD not in text:
            assert not any(FFFD in p for p in [*pieces, tail])
        # id_to_token_bytes (also what OpenAI logprobs report) gives back exactly the text's bytes
        want = unicodedata.normalize("NFC", text) if tok is qwen else text
        assert b"".join(tok.id_to_token_bytes(i) for i in ids) == want.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(data=st.data(), chunks=_chunks, skip=st.booleans())
def test_random_ids_with_invalid_utf8(qwen: QwenTokenizer, hf: HFTokenizer, data, chunks, skip: bool) -> None:
    """Arbitrary id sequences, lone bytes included (ids 0..255 are single bytes in Qwen's ranks): the stream is
    the bytes decoded with invalid sequences dropped (Qwen: tiktoken's errors="ignore"; the byte-level tokenizer:
    its lossy decode without U+FFFD, when the bytes hold no real one)."""
    for tok in (qwen, hf):
        any_id = st.one_of(st.integers(0, 255), st.integers(0, tok.vocab_size - 1))
        ids = data.draw(st.lists(any_id, max_size=30))
        pieces, tail = stream(tok, ids, chunks, skip)
        if tok is qwen:
            expected = qwen.decode(ids, skip_special_tokens=skip, errors="ignore")
        else:
            kept = [i for i in ids if not (skip and i in hf.special_ids)]
            assume(b"\xef\xbf\xbd" not in b"".join(hf.id_to_token_bytes(i) for i in kept))
            expected = hf.decode(ids, skip_special_tokens=skip).replace(FFFD, "")
        assert "".join(pieces) + tail == expected
