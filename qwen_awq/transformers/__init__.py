"""`import qwen_awq.transformers` registers qwen-awq with transformers' Auto classes, so the model card's
Transformers code (AutoTokenizer, AutoModelForCausalLM, TextStreamer, generate, pipeline, Qwen's model.chat) runs
on our decoder and kernels, without trust_remote_code and without executing any file shipped in the folder:

- model_type "qwen" (Qwen v1, bf16 or AutoAWQ): QWenConfig, QwenAwqForCausalLM, QWenTokenizer (qwen.tiktoken);
- Llama / Qwen2 / Mistral folders with an AWQ quantization_config (ours, AutoAWQ's, the bundled SmolLM2): our
  model; their tokenizer.json stays transformers' own tokenizer. The same folders without AWQ keep transformers'
  own model classes.
"""
from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qwen_awq.transformers.configuration import QWenConfig
from qwen_awq.transformers.modeling import QwenAwqForCausalLM, llama_family_class
from qwen_awq.transformers.tokenization import QWenTokenizer

__all__ = ["QWenConfig", "QWenTokenizer", "QwenAwqForCausalLM", "ROUTED_CLASSES"]


class _TokenizerNameOnly(PreTrainedConfig):
    """Registers QWenTokenizer by name only. With QWenConfig itself in AutoTokenizer's mapping, transformers would
    treat our class as a mere fallback and run the folder's tokenization_qwen.py under trust_remote_code=True; found
    by the name in tokenizer_config.json (or QWenConfig.tokenizer_class) it is explicit local code, always used."""

    model_type = "qwen-awq-tokenizer-name"


AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QwenAwqForCausalLM, exist_ok=True)
AutoTokenizer.register(_TokenizerNameOnly, tokenizer_class=QWenTokenizer, exist_ok=True)

ROUTED_CLASSES = {config: llama_family_class(config, native) for config, native in (
    (LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM), (MistralConfig, MistralForCausalLM))}
for _config, _model in ROUTED_CLASSES.items():
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
    if AutoModelForCausalLM._model_mapping[_config] is not _model:
        # transformers 5.17 (the GPU machine's) silently ignores registrations for its own config classes; 5.24
        # honours exist_ok=True by writing the same private table.
        AutoModelForCausalLM._model_mapping._extra_content[_config] = _model
