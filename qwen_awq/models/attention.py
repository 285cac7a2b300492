"""The attention seam: the decoder hands each layer's rotated q/k/v to a backend that owns the KV storage.

The backend here is DenseAttention (no cache, a full causal forward); the engine's paged cache
(engine/kv_cache.py) implements the same `attend` method, and the tests hold a contiguous-cache oracle.
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
