"""Locate the real test assets that come from pip packages (never committed): Qwen's qwen.tiktoken from
`dashscope`, found without importing it (the SmolLM2 GGUF comes through qwen_awq.assets).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

# Run the model/engine tests on a GPU with QWEN_AWQ_TEST_DEVICE=cuda (CI has none: it uses the CPU).
DEVICE = os.environ.get("QWEN_AWQ_TEST_DEVICE", "cpu")

def _package_dir(name: str, pip_command: str) -> Path:
    # find_spec on a top-level package does not run its __init__ (dashscope's fails without its deps).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {name!r} is not installed: run `{pip_command}`")
    return Path(next(iter(spec.submodule_search_locations)))


def qwen_vocab_path() -> Path:
    """dashscope ships a byte-identical copy of Qwen v1's qwen.tiktoken (spec/qwen.md)."""
    pip_command = "pip install --no-deps dashscope==2.0.2"
    path = _package_dir("dashscope", pip_command) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `{pip_command}`")
    return path


CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TRAINING_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def main():\n    print('hello')\n    return 0\n",
    "你好，世界。今天天气很好。",
    "Numbers 12345 and 67890, emoji 😀 and more text here.",
]


def write_tiny_chatml_tokenizer(folder: Path, **config: object) -> Path:
    """Train a small byte-level BPE (so multi-byte characters span tokens) with the ChatML specials and write
    tokenizer.json + tokenizer_config.json; `config` overrides tokenizer_config.json keys."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes, so any text encodes
    specials = list(CHATML_SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(_TRAINING_TEXT * 5, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    settings.update(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder
