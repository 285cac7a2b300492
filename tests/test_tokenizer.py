"""Tokenizers against independent references: dashscope's Qwen tokenizer class, the spec's vectors, and
transformers' PreTrainedTokenizerFast for tokenizer.json folders."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import types
import unicodedata
import warnings
from pathlib import Path

import pytest
from assets import CHATML_SPECIALS, TINY_CHAT_TEMPLATE, qwen_vocab_path, write_tiny_chatml_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.errors import TokenizerError
from qwen_awq.tokenizer import HFTokenizer, QwenTokenizer, load_tokenizer

CORPUS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll've SAID 'TIS so",
    "你好，世界！今天天气怎么样？", "通义千问是阿里云研发的大语言模型。",
    'def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n',
    "for (int i = 0; i < 10; ++i) { a[i] = i; }\r\n",
    "😀👍🏽👨‍👩‍👧‍👦 🇨🇳 flags 🎉🎉", "café naïve cafe\u0301 \u1100\u1161 A\u030a",
    "3.14159265358979 and 12345678901234567890", "2024-01-01T12:00:00Z $1,000.00",
    "a    b\t\t\tc\n\n\n   d   ", "   leading", "trailing   \n  ", "\n\n\n\n", " \r\n \r\n",
    "Русский текст, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|extra_3|> <|extra_204|> <|extra_205|> <|im_end",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>"]
SPEC_VECTORS = [
    ("Hello world", [9707, 1879]), ("你好", [108386]), ("system", [8948]), ("user", [872]),
    ("assistant", [77091]), ("\n", [198]), ("Human:", [33975, 25]), ("Observation:", [37763, 367, 25]),
]
INJECTION = 'print("<|endoftext|>")'
ROLES = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _dashscope_qwen_class() -> type:
    """dashscope's own QwenTokenizer; its package __init__ needs deps we skip, so load the module by path."""
    try:
        from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer as Reference
        return Reference
    except ImportError:
        pass
    pkg_dir = qwen_vocab_path().parent.parent / "tokenizers"
    pkg = types.ModuleType("_dashscope_tokenizers")
    pkg.__path__ = [str(pkg_dir)]  # lets the module's relative import of tokenizer_base resolve
    sys.modules[pkg.__name__] = pkg
    name = f"{pkg.__name__}.qwen_tokenizer"
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "qwen_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.QwenTokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen")
    shutil.copy(qwen_vocab_path(), folder / "qwen.tiktoken")
    return folder


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> QwenTokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real file must not trigger the hash warning
        return QwenTokenizer.from_folder(qwen_dir)


@pytest.fixture(scope="module")
def reference(qwen_dir: Path):
    return _dashscope_qwen_class()(str(qwen_dir / "qwen.tiktoken"))


@pytest.mark.parametrize(("text", "ids"), SPEC_VECTORS)
def test_spec_vectors(qwen: QwenTokenizer, text: str, ids: list[int]) -> None:
    assert qwen.encode(text) == ids
    assert qwen.decode(ids) == text


def test_injection_both_ways(qwen: QwenTokenizer) -> None:
    as_text = [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert qwen.encode(INJECTION, allowed_special=set()) == as_text
    assert qwen.encode(INJECTION) == [1350, 445, 151643, 899]
    assert qwen.encode(INJECTION, allowed_special=["<|endoftext|>"]) == [1350, 445, 151643, 899]
    assert qwen.encode(INJECTION, allowed_special={"<|im_end|>"}) == as_text
    with pytest.raises(TokenizerError, match="endoftext"):
        qwen.encode(INJECTION, allowed_special=set(), disallowed_special="all")
    with pytest.raises(TokenizerError, match="endoftext"):
        qwen.encode(INJECTION, allowed_special=(), disallowed_special=["<|endoftext|>"])


def test_special_tokens_and_attributes(qwen: QwenTokenizer) -> None:
    assert qwen.vocab_size == 151851
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    assert [qwen.token_to_id(n) for n in names] == list(range(151643, 151851))
    assert [qwen.encode(n) for n in names] == [[i] for i in range(151643, 151851)]
    assert qwen.special_ids == frozenset(range(151643, 151851))
    assert qwen.stop_token_ids == {151643, 151644, 151645}
    assert (qwen.eos_token_id, qwen.im_start_id, qwen.im_end_id) == (151643, 151644, 151645)
    assert qwen.bos_token_id is None and qwen.chat_template is None
    assert qwen.token_to_id("Hello") == 9707 and qwen.token_to_id("\n") == 198
    assert qwen.id_to_token_bytes(151645) == b"<|im_end|>" and qwen.id_to_token_bytes(198) == b"\n"
    with pytest.raises(TokenizerError, match="not a single token"):
        qwen.token_to_id("Hello world")


@pytest.mark.parametrize("text", CORPUS)
def test_same_ids_as_dashscope(qwen: QwenTokenizer, reference, text: str) -> None:
    for allowed in ("all", set()):
        ids = qwen.encode(text, allowed_special=allowed)
        assert ids == reference.encode(text, allowed_special=allowed)
        for skip in (False, True):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert qwen.decode(ids, skip_special_tokens=skip) == expected


def test_skip_special_tokens_keeps_only_plain_ids(qwen: QwenTokenizer) -> None:
    ids = qwen.encode("<|im_start|>user\n你好<|im_end|><|extra_7|>!<|endoftext|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "user\n你好!"
    assert qwen.decode(ids) == "<|im_start|>user\n你好<|im_end|><|extra_7|>!<|endoftext|>"


def test_errors(qwen: QwenTokenizer, qwen_dir: Path, tmp_path: Path) -> None:
    for bad in (151851, -1, 10**9):
        with pytest.raises(TokenizerError, match=f"token id {bad} "):
            qwen.decode([9707, bad])
    with pytest.raises(TokenizerError, match=str(tmp_path / "qwen.tiktoken")):
        QwenTokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="not Qwen special"):
        qwen.encode("x", allowed_special={"<s>"})
    changed = tmp_path / "changed.tiktoken"
    changed.write_bytes((qwen_dir / "qwen.tiktoken").read_bytes() + b"\n")  # still valid, different hash
    with pytest.warns(UserWarning, match="sha256"):
        assert QwenTokenizer(changed).encode("Hello world") == [9707, 1879]
    truncated = tmp_path / "truncated.tiktoken"
    truncated.write_bytes(b"\n".join((qwen_dir / "qwen.tiktoken").read_bytes().splitlines()[:1000]))
    with pytest.warns(UserWarning), pytest.raises(TokenizerError, match="151643 distinct ranks"):
        QwenTokenizer(truncated)


def test_load_tokenizer_dispatch(qwen_dir: Path, tmp_path: Path) -> None:
    assert load_tokenizer(qwen_dir).encode("你好") == [108386]
    hf_dir = write_tiny_chatml_tokenizer(tmp_path / "hf")
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty.*qwen\.tiktoken.*tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")


_pieces = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(QWEN_SPECIALS)), max_size=6).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_random_unicode(qwen: QwenTokenizer, text: str) -> None:
    nfc = unicodedata.normalize("NFC", text)
    assert qwen.decode(qwen.encode(nfc, allowed_special=set())) == nfc
    assert qwen.decode(qwen.encode(text)) == nfc


@settings(max_examples=150, deadline=None)
@given(text=_pieces)
def test_random_text_matches_dashscope(qwen: QwenTokenizer, reference, text: str) -> None:
    for allowed in ("all", set()):
        assert qwen.encode(text, allowed_special=allowed) == reference.encode(text, allowed_special=allowed)


# ---- HFTokenizer vs transformers on a tokenizer.json trained here ----


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chatml_tokenizer(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_refs(hf_dir: Path):
    from transformers import PreTrainedTokenizerFast

    parse = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    plain = PreTrainedTokenizerFast.from_pretrained(str(hf_dir), split_special_tokens=True)
    return parse, plain


@pytest.mark.parametrize("text", CORPUS + [INJECTION])
def test_hf_matches_transformers(hf_dir: Path, hf_refs, text: str) -> None:
    ours, (parse, plain) = HFTokenizer.from_folder(hf_dir), hf_refs
    ids = ours.encode(text)
    assert ids == parse.encode(text, add_special_tokens=False)
    assert ours.encode(text, allowed_special=set()) == plain.encode(text, add_special_tokens=False)
    for skip in (False, True):
        expected = parse.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert ours.decode(ids, skip_special_tokens=skip) == expected


def test_hf_specials_and_config(hf_dir: Path, hf_refs) -> None:
    ours, (parse, plain) = HFTokenizer.from_folder(hf_dir), hf_refs
    start, end, eot = (parse.convert_tokens_to_ids(t) for t in ROLES)
    assert (ours.eos_token_id, ours.bos_token_id) == (parse.eos_token_id, None) == (end, None)
    assert (ours.im_start_id, ours.im_end_id) == (start, end)
    assert ours.stop_token_ids == {start, end, eot}
    assert ours.special_ids == {start, end, eot}
    assert ours.vocab_size == len(parse)
    assert ours.chat_template == TINY_CHAT_TEMPLATE
    assert [ours.token_to_id(t) for t in CHATML_SPECIALS] == [eot, start, end]
    text = "<|im_start|>a<|im_end|>b<|endoftext|>"
    expected = [start] + plain.encode("a<|im_end|>b<|endoftext|>", add_special_tokens=False)
    assert ours.encode(text, allowed_special={"<|im_start|>"}) == expected
    with pytest.raises(TokenizerError, match="im_end"):
        ours.encode(text, allowed_special={"<|im_start|>"}, disallowed_special="all")
    with pytest.raises(TokenizerError, match=f"token id {ours.vocab_size} "):
        ours.decode([1, ours.vocab_size])
    with pytest.raises(TokenizerError, match="not a token"):
        ours.token_to_id("<|nope|>")


def test_hf_bos_only_when_configured(tmp_path: Path, hf_refs) -> None:
    parse = hf_refs[0]
    folder = write_tiny_chatml_tokenizer(tmp_path, bos_token="<|endoftext|>", add_bos_token=True)
    ours = HFTokenizer.from_folder(folder)
    bos = parse.convert_tokens_to_ids("<|endoftext|>")
    assert ours.bos_token_id == bos
    assert ours.encode("hello 你好") == [bos] + parse.encode("hello 你好", add_special_tokens=False)
    # Text already starting with BOS (a rendered template) must not get a second one.
    assert ours.encode("<|endoftext|>hi") == parse.encode("<|endoftext|>hi", add_special_tokens=False)
    no_bos = HFTokenizer.from_folder(write_tiny_chatml_tokenizer(tmp_path / "b", bos_token="<|endoftext|>"))
    assert no_bos.encode("hello") == parse.encode("hello", add_special_tokens=False)
