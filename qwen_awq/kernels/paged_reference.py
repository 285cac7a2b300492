"""Plain-PyTorch paged attention and rotary + KV write: the CPU path and the oracle of the paged Triton kernels.

`PagedKV` is one layer's view of the engine's pool (engine/kv_cache.py `KVPool`): keys and values per slot, where
slot = block * block_size + offset, in the model dtype or as Qwen's int8 codes with a per-slot (scale, zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.models.attention import rotate_qkv, sdpa

INT8_LEVELS = 255  # uint8 codes 0..255 (Qwen's quantize_cache_v: qmin 0, qmax 255)
MIN_SCALE = 1e-8  # a constant head slice would get scale 0


@dataclass(frozen=True)
class PagedKV:
    """k/v (slots, kv_heads, head_dim) as KVPool stores one layer, or block-major (blocks, kv_heads, block_size,
    head_dim); model dtype or uint8 codes. k_sz/v_sz: (scale, zero) fp32 per slot and head in the same order
    ((slots, kv_heads, 2) or (blocks, kv_heads, block_size, 2)), present exactly when the codes are uint8."""

    k: Tensor
    v: Tensor
    block_size: int
    k_sz: Tensor | None = None
    v_sz: Tensor | None = None

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.dtype != self.v.dtype or self.k.dim() not in (3, 4):
            raise ValueError(f"k and v must share a 3-D or 4-D shape and dtype, got {self.k.shape}, {self.v.shape}")
        if self.block_major and self.k.shape[2] != self.block_size:
            raise ValueError(f"block-major k has {self.k.shape[2]} slots per block, not {self.block_size}")
        if (self.k_sz is not None) != self.int8 or (self.v_sz is not None) != self.int8:
            raise ValueError("k_sz and v_sz are required with uint8 codes and only then")
        if self.int8 and (self.k_sz.shape != (*self.k.shape[:-1], 2) or self.k_sz.shape != self.v_sz.shape):
            raise ValueError(f"k_sz/v_sz must be {(*self.k.shape[:-1], 2)}, got {self.k_sz.shape}")

    @classmethod
    def from_pool(cls, pool, layer: int) -> PagedKV:
        """One layer of an engine KVPool (views, no copies)."""
        if pool.int8:
            return cls(pool.k[layer], pool.v[layer], pool.block_size, pool.k_sz[layer], pool.v_sz[layer])
        return cls(pool.k[layer], pool.v[layer], pool.block_size)

    @property
    def int8(self) -> bool:
        return self.k.dtype == torch.uint8

    @property
    def block_major(self) -> bool:
        return self.k.dim() == 4

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1] if self.block_major else self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]


def dequantize(codes: Tensor, sz: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 codes (..., D) and (scale, zero) (..., 2) -> scale * (code - zero) in dtype (Qwen's dequantization)."""
    return (sz[..., :1] * (codes.float() - sz[..., 1:])).to(dtype)


def quantize(x: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """x (T, Hkv, D) -> uint8 codes (T, Hkv, D), (scale, zero) (T, Hkv, 2); each (group, head) shares one range.

    group (T,) names each token's group: the token itself (per-token scales) or its sequence's chunk (Qwen's
    per-written-chunk scheme, which the engine writes through rotary_kv_write).
    """
    xf = x.float()
    idx = group[:, None].expand(-1, x.shape[1])  # (T, Hkv)
    init = xf.new_full((num_groups, x.shape[1]), float("inf"))
    lo = init.scatter_reduce(0, idx, xf.amin(-1), "amin")  # (groups, Hkv)
    hi = (-init).scatter_reduce(0, idx, xf.amax(-1), "amax")
    scale = ((hi - lo) * (1.0 / INT8_LEVELS)).clamp_min(MIN_SCALE)  # what `/ 255` computes on CUDA tensors
    zero = -lo / scale
    sz = torch.stack([scale, zero], dim=-1)[group]  # (T, Hkv, 2)
    codes = torch.round(xf / sz[..., :1] + sz[..., 1:]).clamp(0, INT8_LEVELS).to(torch.uint8)
    return codes, sz


def gather_slots(block_tables: Tensor, block_size: int) -> Tensor:
    """(B, W) block ids -> (B, W * block_size) slots in table order."""
    offsets = torch.arange(block_size, device=block_tables.device)
    return (block_tables.long()[:, :, None] * block_size + offsets).flatten(1)


def _gather(cache: Tensor, sz: Tensor | None, slots: Tensor, dtype: torch.dtype) -> Tensor:
    x = cache[slots]  # (B, L, Hkv, D)
    return dequantize(x, sz[slots], dtype) if sz is not None else x.to(dtype)


def paged_attention_reference(
    q: Tensor, kv: PagedKV, block_tables: Tensor, cu_seqlens: Tensor, context_lens: Tensor, max_query_len: int,
    scale: float,
) -> Tensor:
    """q (T, H, D): sequence b's chunk is rows cu_seqlens[b]:cu_seqlens[b+1]; query j of a chunk of n tokens sits
    at position context_lens[b] - n + j and sees cached keys 0..that position. Returns (T, H, D) in q.dtype."""
    if kv.block_major:
        raise ValueError("the reference reads the slot-major pool layout (slots, kv_heads, head_dim)")
    slots = gather_slots(block_tables, kv.block_size)  # (B, L)
    keys = _gather(kv.k, kv.k_sz, slots, q.dtype)  # (B, L, Hkv, D)
    values = _gather(kv.v, kv.v_sz, slots, q.dtype)
    cu, ctx = cu_seqlens.long(), context_lens.long()
    qlens = cu[1:] - cu[:-1]  # (B,)
    # output_size: no device-to-host sync, so an fp32 model's decode step (this path on CUDA) stays capturable
    token_seq = torch.repeat_interleave(torch.arange(len(qlens), device=q.device), qlens, output_size=q.shape[0])
    token_col = torch.arange(q.shape[0], device=q.device) - cu[token_seq]
    qp = q.new_zeros((len(qlens), max_query_len, *q.shape[1:]))  # (B, max_q, H, D)
    qp[token_seq, token_col] = q
    qpos = (ctx - qlens)[:, None] + torch.arange(max_query_len, device=q.device)  # (B, max_q)
    kpos = torch.arange(slots.shape[1], device=q.device)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])
    out = sdpa(qp, keys, values, scale, mask[:, None], causal=False)  # (B, max_q, H, D)
    return out[token_seq, token_col]


def rotary_kv_write_reference(
    qkv: Tensor, cos: Tensor, sin: Tensor, logn: Tensor | None, slot_mapping: Tensor, kv: PagedKV, num_heads: int,
    chunk_seq: Tensor | None = None, num_seqs: int = 0,
) -> Tensor:
    """qkv (T, (H + 2 Hkv) D) -> rotated, LogN-scaled q (T, H, D); rotated k and v go to the pool at slot_mapping.

    cos/sin (T, D/2) fp32 from models.layers.rotary_cos_sin; logn (T,) fp32 or None. int8: per-token scales, or,
    with chunk_seq (T,) naming each token's sequence (num_seqs of them), one range per (sequence, head).
    """
    t, hkv, d = qkv.shape[0], kv.num_kv_heads, kv.head_dim
    q, k, v = rotate_qkv(qkv.view(t, num_heads + 2 * hkv, d), num_heads, cos, sin, logn)
    slots = slot_mapping.long()
    if kv.int8:
        group = torch.arange(t, device=qkv.device) if chunk_seq is None else chunk_seq.long()
        for cache, sz_cache, x in ((kv.k, kv.k_sz, k), (kv.v, kv.v_sz, v)):
            codes, sz = quantize(x, group, t if chunk_seq is None else num_seqs)
            cache.index_copy_(0, slots, codes)
            sz_cache.index_copy_(0, slots, sz)
    else:
        kv.k.index_copy_(0, slots, k.to(kv.k.dtype))
        kv.v.index_copy_(0, slots, v.to(kv.v.dtype))
    return q.contiguous()
