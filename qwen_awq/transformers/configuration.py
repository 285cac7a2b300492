"""`QWenConfig`: Qwen v1's config.json (model_type "qwen") as a transformers PreTrainedConfig, so AutoConfig reads
a Qwen folder without its configuration_qwen.py. qwen_awq.models.config stays the reader our decoder uses."""
from __future__ import annotations

from transformers import PreTrainedConfig


class QWenConfig(PreTrainedConfig):
    """Defaults are Qwen-7B's (spec/qwen.md); unknown keys of a folder's config.json are kept as attributes."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    seq_length: int = 8192
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    tokenizer_class: str | None = "QWenTokenizer"  # AutoTokenizer's pick for folders without tokenizer_config.json
