"""AWQ scaling-group tables per model family, as data over the decoder's canonical module names.

A group names the op whose output feeds one Linear (optionally a named row range of a fused Linear), that
Linear, and the module whose output the scale search measures (spec: shared/spec/awq.md, "The search", 2).
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen_awq.models.config import ModelConfig

# Every Linear inside a decoder block; all of them are quantized (embeddings, lm_head and norms stay fp16).
QUANT_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

# Row ranges of the fused Linears that must not be clipped: errors in q and k are multiplied together by the
# q.k product, so AutoAWQ leaves them unclipped (awq/quantize/quantizer.py `avoid_clipping`).
CLIP_SKIP = {"attn.qkv_proj": ("q", "k")}


@dataclass(frozen=True)
class ScaleGroup:
    """Input channels of `linear` are multiplied by s; `prev` (or its `prev_part` rows) is divided by s."""

    prev: str  # RMSNorm or Linear whose output is the Linear's input
    prev_part: str | None  # named output-row range of a fused `prev` (see fused_rows); None: all of its rows
    linear: str
    inspect: str | None = None  # module whose output change is the loss ("attn", "mlp"); None: the Linear
    inspect_output: str | None = None  # the inspected module's output projection, whose input we compare
    mha_only: bool = False  # needs num_kv_heads == num_heads: shared GQA value heads can't take one s/head

    def __post_init__(self) -> None:
        if self.linear not in QUANT_LINEARS:
            raise ValueError(f"scale group Linear {self.linear!r} is not one of {QUANT_LINEARS}")
        if (self.inspect is None) != (self.inspect_output is None):
            raise ValueError("a scale group names an inspected module and its output projection, or neither")


# Qwen v1, corrected grouping: ln_1 -> c_attn; ln_2 -> [w2, w1]; w1 (up) -> mlp.c_proj; attn.c_proj: none.
ATTN_GROUP = ScaleGroup("input_layernorm", None, "attn.qkv_proj", inspect="attn",
                        inspect_output="attn.o_proj")
MLP_GROUP = ScaleGroup("post_attention_layernorm", None, "mlp.gate_up_proj", inspect="mlp",
                       inspect_output="mlp.down_proj")
DOWN_GROUP = ScaleGroup("mlp.gate_up_proj", "up", "mlp.down_proj")
QWEN_GROUPS = (ATTN_GROUP, MLP_GROUP, DOWN_GROUP)
# Llama family (Llama, Qwen2, Mistral): as AutoAWQ's llama.py, v -> o only without grouped-query attention.
V_O_GROUP = ScaleGroup("attn.qkv_proj", "v", "attn.o_proj", mha_only=True)
LLAMA_GROUPS = (ATTN_GROUP, V_O_GROUP, MLP_GROUP, DOWN_GROUP)  # models/family.py: each family's groups


FusedRows = dict[str, dict[str, tuple[int, int]]]  # fused Linear -> part name -> output rows [start, end)


def fused_rows(cfg: ModelConfig) -> FusedRows:
    """Output-row ranges [start, end) of the parts of each fused Linear, in fusion order."""
    q, kv, width = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "attn.qkv_proj": {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)},
        "mlp.gate_up_proj": {"gate": (0, width), "up": (width, 2 * width)},
    }


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each quantized Linear of a block."""
    return {
        "attn.qkv_proj": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size),
        "attn.o_proj": (cfg.hidden_size, cfg.q_size),
        "mlp.gate_up_proj": (2 * cfg.intermediate_size, cfg.hidden_size),
        "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size),
    }


def clipped_rows(rows: FusedRows, name: str, n_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of a Linear that the clip search may clamp: all but its CLIP_SKIP parts."""
    kept, start = [], 0
    for lo, hi in sorted(rows[name][part] for part in CLIP_SKIP.get(name, ())) + [(n_rows, n_rows)]:
        if lo > start:
            kept.append((start, lo))
        start = max(start, hi)
    return kept
