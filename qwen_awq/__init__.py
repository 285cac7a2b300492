"""qwen-awq: run, quantize (AWQ) and serve Qwen-7B-Chat and Llama-family chat models."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from qwen_awq.chat import ChatModel
    from qwen_awq.tokenizer import Tokenizer


def __getattr__(name: str):
    """Lazy exports, so `import qwen_awq` stays light: LLM, SamplingParams, GuidedSpec."""
    if name == "LLM":
        from qwen_awq.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from qwen_awq.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "GuidedSpec":
        from qwen_awq.engine.guided import GuidedSpec

        return GuidedSpec
    raise AttributeError(f"module 'qwen_awq' has no attribute {name!r}")


def resolve_model_path(path: str | Path | None) -> Path:
    """A model folder, a .gguf file (imported once into the cache) or None for the bundled default model."""
    from qwen_awq.loading import resolve_model_path

    return resolve_model_path(path)


def load(path: str | Path | None, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
         threads: int | None = None) -> tuple[ChatModel, Tokenizer]:
    """Load a model folder (Qwen v1, Llama, Qwen2; bf16/fp16/fp32 or AWQ) and its tokenizer.

    On the CPU, torch's thread count follows qwen_awq.threads (free cores; `threads` or OMP_NUM_THREADS override).
    """
    from qwen_awq.loading import load

    return load(path, dtype, device, threads)
