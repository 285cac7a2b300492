"""Read one rank's slice of every checkpoint tensor straight from safetensors (safe_open's get_slice), so no
rank ever holds a whole weight it does not keep: column-parallel outputs, row-parallel inputs, vocabulary rows.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from qwen_awq.models.config import ModelConfig
from qwen_awq.parallel.sharding import (
    GROUPED_INPUTS,
    PACK_FACTOR,
    PACKED_OUTPUTS,
    ROW_DIMS,
    Shard,
    column_ranges,
    input_range,
)
from qwen_awq.parallel.state import ParallelState


def read_ranges(reader, names: tuple[str, ...], dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The given [start, stop) ranges along `dim` of the concatenation of tensors `names`, concatenated.

    A range may fall inside one part (Qwen's fused c_attn, Llama's q/k/v) or span several; each piece is read
    with a slice, never the whole part."""
    slices = [reader.slice(n) for n in names]
    sizes = [s.get_shape()[dim] for s in slices]
    pieces, lead = [], (slice(None),) * dim
    for start, stop in ranges:
        offset = 0
        for sl, size in zip(slices, sizes, strict=True):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                pieces.append(sl[(*lead, slice(lo - offset, hi - offset))])
            offset += size
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _units(ranges: list[tuple[int, int]], unit: int) -> list[tuple[int, int]]:
    return [(a // unit, b // unit) for a, b in ranges]  # shard_config checked that every bound divides


def read_shard(reader, module: str, parts: tuple[str, ...], suffix: str, shard: Shard, full: ModelConfig,
               state: ParallelState, fuse_dims: Mapping[str, int]) -> torch.Tensor:
    """This rank's slice of `module.suffix` (parts fused along the output dim) under the split `shard`."""
    names = tuple(f"{p}.{suffix}" for p in parts)
    if shard.kind == "vocab":
        per = full.vocab_size // state.world
        return read_ranges(reader, names, 0, [(state.rank * per, (state.rank + 1) * per)])
    if shard.kind == "column":
        unit = PACK_FACTOR if suffix in PACKED_OUTPUTS else 1
        return read_ranges(reader, names, fuse_dims[suffix], _units(column_ranges(full, shard, state), unit))
    if suffix == "bias":  # a row-parallel bias is added once, after the sum: rank 0 keeps it
        whole = reader.get(names[0])
        return whole if state.rank == 0 else torch.zeros_like(whole)
    unit = full.quant.group_size if suffix in GROUPED_INPUTS and full.quant else 1
    return read_ranges(reader, names, ROW_DIMS[suffix], _units([input_range(full, module, state)], unit))
