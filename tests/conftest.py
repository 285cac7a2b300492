"""Shared fixtures: the real Qwen vocabulary (from the dashscope wheel) and tiny random checkpoints."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from assets import qwen_vocab_path  # noqa: E402
from checkpoints import write_llama_checkpoint, write_qwen_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def qwen_vocab() -> Path:
    return qwen_vocab_path()


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory, qwen_vocab) -> Path:
    """A tiny Qwen v1 checkpoint (bf16 weights, seq_length 64, the real qwen.tiktoken)."""
    return write_qwen_checkpoint(tmp_path_factory.mktemp("qwen-tiny"), qwen_vocab)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny GQA Llama checkpoint written by transformers (fp32)."""
    folder = tmp_path_factory.mktemp("llama-tiny")
    write_llama_checkpoint(folder)
    return folder


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled 4-bit default model: quantized at most once per test run (about a minute on two cores), in
    this fixture's setup rather than inside whichever test first needs it, and cached under XDG_CACHE_HOME for
    later runs. Tests that load the default model (in process or through the CLI) ask for it."""
    from qwen_awq.default_model import default_model_dir

    return default_model_dir(progress=False)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser), for the web-page tests."""
    from playwright import sync_api
    from web_utils import CHROMIUM, CHROMIUM_ARGS

    with sync_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()
