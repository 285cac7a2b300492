"""One record per model family: everything that differs between Qwen v1 and the Llama family, as data.

A family names its config reader, its checkpoint-name table, its AWQ scaling groups, the generation defaults a
folder without them falls back to, the config.json keys an fp16 export writes, and how tensor parallelism shards
each canonical module. `load_config` picks the family by the checkpoint's architecture.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError
from qwen_awq.models.config import GenerationDefaults, ModelConfig, Reader, read_config, read_llama, read_qwen
from qwen_awq.models.names import LLAMA_WEIGHTS, QWEN_WEIGHTS, WeightMap
from qwen_awq.parallel.sharding import COLUMN_GATE_UP, COLUMN_QKV, ROW, VOCAB, Shard
from qwen_awq.quant.groups import LLAMA_GROUPS, QWEN_GROUPS, ScaleGroup


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    read_config: Reader  # config.json -> ModelConfig
    weights: WeightMap  # canonical module -> checkpoint names
    awq_groups: tuple[ScaleGroup, ...]
    chat_fallbacks: GenerationDefaults  # used where a folder's generation_config.json lacks a value
    fp16_config: Mapping[str, Any]  # config.json keys that declare fp16 weights (AWQ exports are fp16)
    tp_layout: Mapping[str, Shard]  # canonical module (per layer: without "layers.{i}.") -> its split; else replicated

    def shard_of(self, module: str) -> Shard | None:
        """How a canonical module (e.g. layers.3.attn.qkv_proj) is split under tensor parallelism; None: replicated."""
        parts = module.split(".")
        key = ".".join(parts[2:]) if parts[0] == "layers" else module
        return self.tp_layout.get(key)

    def scale_groups(self, cfg: ModelConfig) -> tuple[ScaleGroup, ...]:
        """The AWQ groups that apply to this model (drops v -> o under grouped-query attention)."""
        mha = cfg.num_kv_heads == cfg.num_heads
        return tuple(g for g in self.awq_groups if mha or not g.mha_only)


# Megatron's split, the same for both families since canonical names are shared: q|k|v and gate|up split their
# outputs section by section (Qwen's fused c_attn and [w2|w1] too), o and down their inputs, tables their rows.
TP_LAYOUT = {"embed_tokens": VOCAB, "lm_head": VOCAB, "attn.qkv_proj": COLUMN_QKV, "attn.o_proj": ROW,
             "mlp.gate_up_proj": COLUMN_GATE_UP, "mlp.down_proj": ROW}
QWEN = Family(
    name="qwen", read_config=read_qwen, weights=QWEN_WEIGHTS, awq_groups=QWEN_GROUPS,
    # Qwen-7B-Chat's generation_config.json values (spec: qwen.md)
    chat_fallbacks=GenerationDefaults(do_sample=True, top_p=0.8, top_k=0, repetition_penalty=1.1, max_new_tokens=512),
    fp16_config={"torch_dtype": "float16", "bf16": False, "fp16": True, "fp32": False},  # Qwen v1's dtype flags
    tp_layout=TP_LAYOUT,
)
LLAMA = Family(
    name="llama", read_config=read_llama, weights=LLAMA_WEIGHTS, awq_groups=LLAMA_GROUPS,
    chat_fallbacks=GenerationDefaults(), fp16_config={"torch_dtype": "float16"}, tp_layout=TP_LAYOUT,
)
FAMILIES = {f.name: f for f in (QWEN, LLAMA)}
# Architectures we implement, mapped to the family whose reader, weight names and AWQ groups apply.
ARCHITECTURES = {
    "QWenLMHeadModel": QWEN,
    "LlamaForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
}


def family_of(cfg: ModelConfig) -> Family:
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown model family {cfg.family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[cfg.family]


def load_config(folder: str | Path) -> ModelConfig:
    """Build a ModelConfig from `folder/config.json` (and quant_config.json when present)."""
    return read_config(folder, {arch: family.read_config for arch, family in ARCHITECTURES.items()})


def scale_groups(cfg: ModelConfig) -> tuple[ScaleGroup, ...]:
    """The AWQ scaling groups of this model's family that apply to it."""
    return family_of(cfg).scale_groups(cfg)
