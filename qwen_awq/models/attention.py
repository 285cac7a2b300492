"""The attention seam: the decoder hands each layer's rotated q/k/v to a backend that owns the KV storage.

Backends here: DenseAttention (no cache, a full causal forward) and ContiguousKVCache (a simple per-batch cache for
incremental decoding). The engine's paged cache implements the same `attend` method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q (T, H, D), k/v (T, Hkv, D) for the new tokens -> attention output (T, H, D)."""
        ...


@dataclass
class ForwardBatch:
    """Per-token metadata of one forward over T flattened tokens."""

    positions: torch.Tensor  # (T,) int64 absolute positions
    ntk_alpha: torch.Tensor  # (T,) fp32, the NTK alpha of each token's sequence (1.0 when NTK is off)
    attn: AttentionBackend


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    """q (B, S, H, D), k/v (B, L, Hkv, D) -> (B, S, H, D); grouped-query heads are expanded by SDPA."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


class DenseAttention:
    """Full causal attention over `batch` sequences of `seqlen` tokens each, without a cache."""

    def __init__(self, batch: int, seqlen: int) -> None:
        self.batch, self.seqlen = batch, seqlen

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, s = self.batch, self.seqlen
        out = sdpa(q.view(b, s, *q.shape[1:]), k.view(b, s, *k.shape[1:]), v.view(b, s, *v.shape[1:]),
                    scale, None, causal=True)
        return out.reshape(q.shape)


class ContiguousKVCache:
    """K/V for `batch` sequences that advance together: (layers, batch, max_len, Hkv, D) each.

    Call `step(num_new)` before each forward over `batch * num_new` tokens and `advance()` after it.
    Keys are stored after rotation, as in the reference implementation.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # tokens already cached per sequence
        self.num_new = 0
        self.mask: torch.Tensor | None = None  # (S, L), the same for every layer of a step

    def step(self, num_new: int) -> None:
        end = self.length + num_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.num_new = num_new
        # new token i (absolute position length + i) sees keys 0..length + i
        rows = torch.arange(self.length, end, device=self.k.device)[:, None]
        self.mask = torch.arange(end, device=self.k.device)[None, :] <= rows

    def advance(self) -> None:
        self.length += self.num_new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, s, start = self.batch, self.num_new, self.length
        end = start + s
        self.k[layer, :, start:end] = k.view(b, s, *k.shape[1:])
        self.v[layer, :, start:end] = v.view(b, s, *v.shape[1:])
        keys, values = self.k[layer, :, :end], self.v[layer, :, :end]  # (B, L, Hkv, D)
        out = sdpa(q.view(b, s, *q.shape[1:]), keys, values, scale, self.mask, causal=False)
        return out.reshape(q.shape)
