"""Where models come from: a folder, a .gguf file (imported once into the cache) or the bundled default model,
loaded as a `ChatModel` with its tokenizer. `qwen_awq.load` is this module's `load`."""
from __future__ import annotations

from pathlib import Path

import torch

from qwen_awq.chat import ChatModel
from qwen_awq.errors import ConfigError
from qwen_awq.models.loader import load_model, resolve_device
from qwen_awq.threads import apply_thread_policy
from qwen_awq.tokenizer import Tokenizer, load_tokenizer


def resolve_model_path(path: str | Path | None) -> Path:
    """A model folder, a .gguf file (imported once into the cache) or None for the bundled default model."""
    if path is None:
        from qwen_awq.default_model import default_model_dir  # builds the default on first use

        return default_model_dir()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from qwen_awq.models.gguf_import import import_gguf  # needs the gguf package

        return import_gguf(path)
    if path.is_file():
        raise ConfigError(f"{path} is a file, not a model: pass a model folder (config.json and *.safetensors "
                          "weights) or a .gguf file")
    return path


def load(path: str | Path | None, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
         threads: int | None = None) -> tuple[ChatModel, Tokenizer]:
    """Load a model folder (Qwen v1, Llama, Qwen2; bf16/fp16/fp32 or AWQ) and its tokenizer; on the CPU, torch's
    threads follow qwen_awq.threads first (a first-run quantization is CPU work too)."""
    if resolve_device(device).type == "cpu":
        apply_thread_policy(threads)
    folder = resolve_model_path(path)
    model = load_model(folder, dtype=dtype, device=device, model_class=ChatModel)
    return model, load_tokenizer(folder)
