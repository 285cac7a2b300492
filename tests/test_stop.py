"""StopChecker tests: split stop strings, streamed text vs a brute-force reference, CJK and emoji."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.engine.stop import StopChecker


def reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Scan end positions one character at a time; first stop string to complete wins (longest on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def stream(pieces: list[str], stops: list[str], include: bool = False) -> tuple[list[str], StopChecker]:
    checker = StopChecker(stops, include)
    emitted = []
    for piece in pieces:
        emitted.append(checker.feed(piece))
        if checker.stopped:
            break
    emitted.append(checker.flush())
    return emitted, checker


def test_stop_split_across_pieces_is_trimmed():
    emitted, checker = stream(["Thought: search\nAct", "ion: x\nObser", "vation: 42", " tail"],
                              ["Observation:"])
    assert emitted == ["Thought: search\nAct", "ion: x\n", "", ""]  # "Obser" was held, never shown
    assert checker.stopped and checker.matched == "Observation:"


def test_include_stop_str_in_output():
    emitted, checker = stream(["a<|im", "_end|>b"], ["<|im_end|>"], include=True)
    assert "".join(emitted) == "a<|im_end|>" and checker.matched == "<|im_end|>"


def test_held_prefix_released_when_it_does_not_match():
    checker = StopChecker(["STOP"])
    assert checker.feed("go ST") == "go "
    assert checker.feed("AY") == "STAY"
    assert checker.feed(" S") == " "
    assert checker.flush() == "S" and not checker.stopped and checker.matched is None


def test_no_stop_strings_pass_through():
    checker = StopChecker([])
    assert [checker.feed(p) for p in ["x", "yz"]] == ["x", "yz"] and checker.flush() == ""


def test_first_completed_stop_wins():
    emitted, checker = stream(["xab", "cd"], ["abcd", "bc"])
    assert "".join(emitted) == "xa" and checker.matched == "bc"
    emitted, checker = stream(["xabc"], ["bc", "abc"])  # both end at "c": the longer one
    assert "".join(emitted) == "x" and checker.matched == "abc"


def test_chinese_and_emoji_stop_strings():
    text = "你好，世界😀！今天天气很好。结束了吗👋🙂后面的不要"
    pieces = [text[i:i + 2] for i in range(0, len(text), 2)]
    emitted, checker = stream(pieces, ["👋🙂", "结束了"])
    assert "".join(emitted) == "你好，世界😀！今天天气很好。" and checker.matched == "结束了"
    emitted, checker = stream(list(text), ["👋🙂"], include=True)
    assert "".join(emitted) == "你好，世界😀！今天天气很好。结束了吗👋🙂"


def test_feed_after_stop_raises():
    checker = StopChecker(["x"])
    checker.feed("ax")
    with pytest.raises(RuntimeError):
        checker.feed("more")


ALPHABET = "ab\n你😀"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
       include=st.booleans())
def test_stream_matches_reference_for_any_split(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    emitted, checker = stream(pieces, stops, include)
    expected, matched = reference_cut(text, stops)
    if include and matched is not None:
        expected += matched
    assert "".join(emitted) == expected
    assert checker.matched == matched and checker.stopped == (matched is not None)
    shown = ""
    for part in emitted[:-1]:  # nothing shown mid-stream is ever retracted or contains a stop string
        shown += part
        assert expected.startswith(shown)
        assert include or not any(s in shown for s in stops)
