"""Per-family weight-name tables: canonical module name -> checkpoint module names fused along the output dim.

Checkpoint names (c_attn, w1, w2, ln_1, q_proj ...) appear only here; models/family.py gives each family its table.
A canonical Linear made of several checkpoint Linears (Llama q/k/v -> qkv_proj, gate/up -> gate_up_proj) is their
concatenation along the output dimension, which holds for plain weights ([out, in], dim 0) and for AWQ tensors
([in, out/8] and [in/G, out], dim 1) alike: each quant format's record says which dim.
"""
from __future__ import annotations

from dataclasses import dataclass

# Qwen v1: SiLU applies to w2, so in Llama terms gate = w2, up = w1, down = c_proj (spec: qwen.md "Forward pass").
QWEN_LAYER = {
    "input_layernorm": ("ln_1",),
    "attn.qkv_proj": ("attn.c_attn",),
    "attn.o_proj": ("attn.c_proj",),
    "post_attention_layernorm": ("ln_2",),
    "mlp.gate_up_proj": ("mlp.w2", "mlp.w1"),
    "mlp.down_proj": ("mlp.c_proj",),
}
LLAMA_LAYER = {
    "input_layernorm": ("input_layernorm",),
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.o_proj": ("self_attn.o_proj",),
    "post_attention_layernorm": ("post_attention_layernorm",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class WeightMap:
    """Where each canonical module of the decoder lives in a family's checkpoints."""

    top: dict[str, tuple[str, ...]]  # embed_tokens / norm / lm_head
    layer_prefix: str  # format string with {i}
    layer: dict[str, tuple[str, ...]]

    def modules(self, num_layers: int) -> dict[str, tuple[str, ...]]:
        """Canonical module name -> checkpoint module names, for every module of a model with num_layers blocks."""
        out = dict(self.top)
        for i in range(num_layers):
            prefix = self.layer_prefix.format(i=i)
            for canon, parts in self.layer.items():
                out[f"layers.{i}.{canon}"] = tuple(prefix + p for p in parts)
        return out


QWEN_WEIGHTS = WeightMap(
    top={"embed_tokens": ("transformer.wte",), "norm": ("transformer.ln_f",), "lm_head": ("lm_head",)},
    layer_prefix="transformer.h.{i}.",
    layer=QWEN_LAYER,
)
LLAMA_WEIGHTS = WeightMap(
    top={"embed_tokens": ("model.embed_tokens",), "norm": ("model.norm",), "lm_head": ("lm_head",)},
    layer_prefix="model.layers.{i}.",
    layer=LLAMA_LAYER,
)
