"""Megatron-style sharding of the one decoder: which slice of every weight a rank holds, and the layers that
put the slices back together (one all-reduce after attention and after the MLP, vocab-parallel embedding/head).

Each family's record (models/family.py) maps canonical modules to a `Shard`: column-parallel Linears split their
outputs (each fused section, q|k|v or gate|up, on its own), row-parallel Linears split their inputs, vocab-parallel
tables split their rows. A rank's model is the plain Decoder built from `shard_config`, so the per-rank sizes
(heads, KV heads, MLP width) flow through the unchanged layer code, and each rank's KV pool holds its own KV heads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from qwen_awq.errors import ParallelError
from qwen_awq.models.config import ModelConfig
from qwen_awq.parallel.state import ParallelState, all_gather_last, all_reduce

PACK_FACTOR = 8  # int4 values per int32 word in AWQ's qweight/qzeros (AutoAWQ GEMM layout)


@dataclass(frozen=True)
class Shard:
    """How one canonical module is split. kind: column | row | vocab. sections: the fused output parts of a
    column-parallel Linear, in order (q, kv, mlp: see `section_range`)."""

    kind: str
    sections: tuple[str, ...] = ()


COLUMN_QKV = Shard("column", ("q", "kv", "kv"))
COLUMN_GATE_UP = Shard("column", ("mlp", "mlp"))
ROW = Shard("row")
VOCAB = Shard("vocab")

# Along which dim each checkpoint tensor of a row-parallel Linear holds its inputs (plain [out, in]; AWQ
# qweight [in, out/8], qzeros and scales [in/G, out]); column-parallel Linears use the format's fuse_dims.
ROW_DIMS = {"weight": 1, "qweight": 0, "qzeros": 0, "scales": 0}
PACKED_OUTPUTS = frozenset({"qweight", "qzeros"})  # outputs counted in int32 words of 8
GROUPED_INPUTS = frozenset({"qzeros", "scales"})  # inputs counted in quantization groups


def _need(ok: bool, what: str, world: int) -> None:
    if not ok:
        raise ParallelError(f"cannot split this model over {world} ranks: {what}; pick a tensor-parallel size "
                            "that divides it")


def kv_replicated(cfg: ModelConfig, world: int) -> bool:
    """Fewer KV heads than ranks (grouped-query attention): each rank keeps the one KV head its queries use."""
    return cfg.num_kv_heads < world


def shard_config(cfg: ModelConfig, state: ParallelState) -> ModelConfig:
    """The config of one rank's slice: heads, KV heads and MLP width divided by the world size."""
    w = state.world
    if w == 1:
        return cfg
    _need(cfg.num_heads % w == 0, f"{cfg.num_heads} attention heads", w)
    if kv_replicated(cfg, w):
        _need(w % cfg.num_kv_heads == 0, f"{cfg.num_kv_heads} KV heads (replicated, so world % kv_heads)", w)
    else:
        _need(cfg.num_kv_heads % w == 0, f"{cfg.num_kv_heads} KV heads", w)
    _need(cfg.intermediate_size % w == 0, f"MLP width {cfg.intermediate_size}", w)
    _need(cfg.vocab_size % w == 0, f"vocabulary of {cfg.vocab_size}", w)
    local = replace(cfg, num_heads=cfg.num_heads // w, num_kv_heads=max(cfg.num_kv_heads // w, 1),
                    intermediate_size=cfg.intermediate_size // w)
    _check_quant_split(local, w)
    return local


def _check_quant_split(local: ModelConfig, w: int) -> None:
    """AWQ shards must hold whole groups along K (row-parallel) and whole int32 words along N (column)."""
    if local.quant is None:
        return
    g = local.quant.group_size
    for name, k in (("o_proj", local.q_size), ("down_proj", local.intermediate_size)):
        _need(k % g == 0, f"{name}'s {k * w} inputs do not split into whole AWQ groups of {g} "
                          f"({k} per rank)", w)
    for name, n in (("q", local.q_size), ("k/v", local.kv_size), ("gate/up", local.intermediate_size)):
        _need(n % PACK_FACTOR == 0, f"{name} outputs per rank ({n}) are not a multiple of {PACK_FACTOR} "
                                    "(AWQ packs 8 outputs per int32)", w)


def section_range(cfg: ModelConfig, section: str, state: ParallelState) -> tuple[int, int, int]:
    """(full size, start, stop) of this rank's outputs within one fused section of the full model."""
    r, w, d = state.rank, state.world, cfg.head_dim
    if section == "q":
        size, per = cfg.q_size, cfg.q_size // w
        return size, r * per, (r + 1) * per
    if section == "kv":
        if kv_replicated(cfg, w):
            head = r // (w // cfg.num_kv_heads)  # the KV head of this rank's query heads
            return cfg.kv_size, head * d, (head + 1) * d
        per = cfg.kv_size // w
        return cfg.kv_size, r * per, (r + 1) * per
    per = cfg.intermediate_size // w
    return cfg.intermediate_size, r * per, (r + 1) * per


def column_ranges(cfg: ModelConfig, shard: Shard, state: ParallelState) -> list[tuple[int, int]]:
    """This rank's output ranges in the fused (full) output dim, concatenated in order."""
    out, offset = [], 0
    for section in shard.sections:
        size, start, stop = section_range(cfg, section, state)
        out.append((offset + start, offset + stop))
        offset += size
    return out


def input_range(cfg: ModelConfig, module: str, state: ParallelState) -> tuple[int, int]:
    """This rank's inputs of a row-parallel Linear: its heads' outputs (o_proj) or its MLP slice (down_proj)."""
    full = cfg.q_size if module.endswith("o_proj") else cfg.intermediate_size
    per = full // state.world
    return state.rank * per, (state.rank + 1) * per


class VocabParallelEmbedding(nn.Embedding):
    """Rows [r*V/w, (r+1)*V/w) of the table: ids outside them look up zeros, an all-reduce sums the ranks."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, state: ParallelState) -> None:
        super().__init__(vocab // state.world, hidden, dtype=dtype)
        self.state, self.start = state, state.rank * (vocab // state.world)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)  # (T,)
        x = F.embedding(torch.where(inside, local, 0), self.weight)  # (T, hidden)
        return all_reduce(x * inside[:, None].to(x.dtype), self.state)


class VocabParallelHead(nn.Linear):
    """lm_head rows of this rank's vocabulary slice; logits of all ranks are gathered into the full width."""

    def __init__(self, hidden: int, vocab: int, dtype: torch.dtype, state: ParallelState) -> None:
        super().__init__(hidden, vocab // state.world, bias=False, dtype=dtype)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(super().forward(x), self.state)  # (..., V)


def _reduce_output(state: ParallelState):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if isinstance(output, tuple):  # (output, residual) from a block's attn / mlp: the residual is whole
            return (all_reduce(output[0], state), *output[1:])
        return all_reduce(output, state)
    return hook


def parallelize(model: nn.Module, full: ModelConfig, state: ParallelState) -> None:
    """Turn a Decoder built from shard_config(full) into one rank's shard (before its weights are allocated):
    vocab-parallel embedding and head, and the all-reduce that completes each row-parallel sum. The sums are
    forward hooks on each block's attention and MLP, so their forward code stays the single-GPU code."""
    if not state.parallel:
        return
    model.embed_tokens = VocabParallelEmbedding(full.vocab_size, full.hidden_size, model.dtype, state)
    model.lm_head = VocabParallelHead(full.hidden_size, full.vocab_size, model.dtype, state)
    if full.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for block in model.layers:
        block.attn.register_forward_hook(_reduce_output(state))
        block.mlp.register_forward_hook(_reduce_output(state))
