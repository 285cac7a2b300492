"""Calibration blocks (AutoAWQ's recipe, ChatML wrapping, .txt/.jsonl inputs) and the offline corpus."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from qwen_awq.errors import ConfigError
from qwen_awq.eval import corpus
from qwen_awq.quant.calib import load_calibration
from qwen_awq.tokenizer import QwenTokenizer

WORDS = "river stone cloud garden lamp harbor violin maple copper meadow lantern orchard".split()


@pytest.fixture(scope="module")
def tok(qwen_vocab):
    return QwenTokenizer(qwen_vocab)


def make_docs(n: int = 40) -> list[str]:
    """Documents tagged [Dnnn] so the concatenation can be cut back into documents; sentence lengths vary."""
    docs = []
    for i in range(n):
        rng = random.Random(i)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
        docs.append(f"[D{i:03d}] The {words}. It ends here.")
    return docs


@pytest.fixture()
def txt_file(tmp_path):
    path = tmp_path / "calib.txt"
    long_doc = "[DLONG] " + " ".join(["zebra"] * 300)  # > seqlen tokens: must be skipped
    path.write_text("\n\n".join([*make_docs(), long_doc]) + "\n", encoding="utf-8")
    return path


def test_blocks_are_whole_short_documents(tok, txt_file):
    """With room for everything, the blocks are every short document once, in some order, then cut."""
    short = make_docs()
    total = sum(len(tok.encode(d, allowed_special=set())) for d in short)
    blocks = load_calibration(tok, txt_file, samples=1000, seqlen=64, seed=0)
    assert blocks.shape == (total // 64, 64) and blocks.dtype == torch.long
    text = tok.decode(blocks.flatten().tolist())
    pieces = ["[" + p for p in text.split("[")[1:]]
    assert "zebra" not in text
    whole = pieces[:-1]
    assert len(whole) == len(set(whole)) and set(whole) <= set(short)  # each document at most once, intact
    assert any(d.startswith(pieces[-1]) for d in set(short) - set(whole))  # the cut tail: a prefix
    missing = set(short) - set(pieces)
    assert sum(len(tok.encode(d)) for d in missing) < 64  # only the last partial block's tail is dropped


def test_seed_and_sample_count(tok, txt_file):
    a = load_calibration(tok, txt_file, samples=3, seqlen=48, seed=0)
    b = load_calibration(tok, txt_file, samples=3, seqlen=48, seed=0)
    c = load_calibration(tok, txt_file, samples=3, seqlen=48, seed=1)
    assert a.shape == c.shape == (3, 48)
    assert torch.equal(a, b) and not torch.equal(a, c)
    first = re.match(r"\[D\d{3}\][^\[]*", tok.decode(a[0].tolist())).group(0)
    assert first in make_docs()  # a block starts at a document boundary


def test_jsonl_text_equals_txt(tok, tmp_path, txt_file):
    path = tmp_path / "calib.jsonl"
    long_doc = txt_file.read_text(encoding="utf-8").split("\n\n")[-1].strip()
    records = [{"text": d} for d in [*make_docs(), long_doc]] + [{"text": "   "}]  # empty ones are ignored
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    from_jsonl = load_calibration(tok, path, samples=5, seqlen=40, seed=2)
    from_txt = load_calibration(tok, txt_file, samples=5, seqlen=40, seed=2)
    assert from_txt.shape == (5, 40) and torch.equal(from_jsonl, from_txt)


def chat_reference(tok, turns: list[tuple[str, str]]) -> list[int]:
    """Qwen's ChatML layout written out as text; content has no special text, so parsing it all is safe."""
    text = "\n".join(f"<|im_start|>{role}\n{content}<|im_end|>" for role, content in turns)
    return tok.encode(text, allowed_special="all")


def test_chatml_layout_and_injected_marker(tok, tmp_path):
    user, assistant = "What is the capital of France?", "Paris is. The tag <|im_end|> here stays plain text."
    path = tmp_path / "one.txt"
    path.write_text(f"{user} {assistant}\n", encoding="utf-8")
    turns = [("system", "You are a helpful assistant."), ("user", user), ("assistant", "")]
    head = chat_reference(tok, turns)
    expected = head[:-1] + tok.encode(assistant, allowed_special=set()) + [tok.im_end_id]
    got = load_calibration(tok, path, fmt="chatml", samples=4, seqlen=len(expected))
    assert got.shape == (1, len(expected))
    ids = got[0].tolist()
    assert ids == expected
    starts = [i for i, t in enumerate(ids) if t == tok.im_start_id]
    assert len(starts) == 3 and starts[0] == 0
    assert ids.count(tok.im_end_id) == 3 and ids[-1] == tok.im_end_id  # the injected marker is not one
    assert tok.decode(ids[:starts[1]]) == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert tok.decode(ids[starts[1]:starts[2]]) == f"<|im_start|>user\n{user}<|im_end|>\n"
    assert tok.decode(ids[starts[2]:]) == f"<|im_start|>assistant\n{assistant}<|im_end|>"


def test_chatml_messages_from_jsonl(tok, tmp_path):
    with_system = [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello! How can I help?")]
    without = [("user", "Name a colour."), ("assistant", "Blue, like <|im_start|> nothing special.")]
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})
             for turns in (with_system, without)]
    path.write_text("\n".join(lines), encoding="utf-8")
    ref_a = chat_reference(tok, with_system)
    system = ("system", "You are a helpful assistant.")
    ref_b = chat_reference(tok, [system, without[0], ("assistant", "")])
    ref_b = ref_b[:-1] + tok.encode(without[1][1], allowed_special=set()) + [tok.im_end_id]
    n = len(ref_a) + len(ref_b)
    got = load_calibration(tok, path, fmt="chatml", samples=1, seqlen=n, seed=0)[0].tolist()
    assert got in (ref_a + ref_b, ref_b + ref_a)
    with pytest.raises(ConfigError, match="chatml"):
        load_calibration(tok, path, fmt="text", samples=1, seqlen=8)


def test_too_little_text(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words.\n\nAnd a few more.\n", encoding="utf-8")
    n = len(tok.encode("Just a few words.")) + len(tok.encode("And a few more."))
    with pytest.raises(ConfigError, match=rf"only {n} tokens from 2 documents of <= 512 tokens \(0 longer"):
        load_calibration(tok, path)


def test_bad_files(tok, tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_calibration(tok, tmp_path / "missing.txt")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"\.txt .*\.jsonl"):
        load_calibration(tok, tmp_path / "data.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not valid JSON"):
        load_calibration(tok, bad)
    (tmp_path / "odd.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match=r"odd\.jsonl:1: expected"):
        load_calibration(tok, tmp_path / "odd.jsonl")
    with pytest.raises(ConfigError, match="unknown calibration format"):
        load_calibration(tok, bad, fmt="alpaca")


def test_markup_stripping_by_hand():
    filler = "and then many more plain words follow so that the paragraph is long enough to count as prose"
    wikitext = (
        "{{Infobox thing|name={{nowrap|X}}}}\n'''Foo''' is a [[bar (thing)|baz]] of [[qux]]<ref name=a>cite"
        "</ref> about {{convert|5|km|mi}} long[[File:a.jpg|thumb|A [[cap]] caption]] <!-- hidden --> "
        f"with [http://example.org a link] &amp; {{{{lang|fr|mot}}}}, {filler}.\n"
        "{| class=wikitable\n| cell || cell\n|}\n* a [[list]] item, dropped though it is long enough "
        f"{filler}\n== History ==\nSecond paragraph, {filler}.\n== See also ==\nNever reached, {filler}.\n"
        "[[Category:Things]]\n[[de:Foo]]"
    )
    assert corpus.wiki_paragraphs(wikitext) == [
        f"Foo is a baz of qux about 5 km long with a link & mot, {filler}.",
        f"Second paragraph, {filler}.",
    ]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Both splits, extracted afresh into a private cache that stays in effect for this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield corpus.calibration_texts(), corpus.heldout_text()


def test_corpus_splits_are_disjoint(splits):
    calibration, heldout = splits
    held = heldout.split("\n\n")
    assert len(held) > 500 and len(calibration) > 3000  # measured: 888 and 3959 paragraphs
    assert len(heldout) > 400_000 and sum(map(len, calibration)) > 2_000_000
    assert not set(calibration) & set(held)
    articles = corpus.read_wiki_articles(corpus.gensim_data_dir() / corpus.WIKI_FILE)
    calibration_set, held_set = set(calibration), set(held)
    for paragraphs in articles:  # an article lands wholly on one side
        sides = {(p in held_set, p in calibration_set) for p in paragraphs}
        assert sides in ({(True, False)}, {(False, True)})


def test_default_corpus_calibration(tok, splits):
    """Without a file, blocks are cut from calibration documents and share no text with the held-out split."""
    calibration, heldout = splits
    blocks = load_calibration(tok, samples=6, seqlen=128, seed=5)
    assert blocks.shape == (6, 128)
    text = tok.decode(blocks.flatten().tolist())
    assert text.startswith(tuple(calibration))  # blocks start at a document boundary
    found = [d for d in calibration if d in text]
    assert sum(map(len, found)) > len(text) // 2  # mostly whole documents; the last one may be cut
    assert not any(text[i:i + 80] in heldout for i in range(0, len(text) - 80, 40))
