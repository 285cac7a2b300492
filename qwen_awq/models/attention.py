"""The attention seam: the decoder hands each layer's raw qkv projection (with the step's rotary tables) to a
backend that owns the KV storage and rotates q/k itself, so that the paged engine can fuse rotary, LogN and the
KV write into one kernel (engine/kv_cache.py) while cache-less backends rotate in plain PyTorch (`rotate_qkv`).

Backends here: DenseAttention (no cache, a full causal forward); `RotatingAttention` is the base of every backend
that takes rotated q/k/v (dense, the transformers Cache adapter, the tests' contiguous-cache oracle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from qwen_awq.models.layers import apply_rotary


class AttentionBackend(Protocol):
    def attend_qkv(self, layer: int, qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   logn: torch.Tensor | None, scale: float) -> torch.Tensor:
        """qkv (T, H + 2 Hkv, D) un-rotated q, k, v of the new tokens; cos/sin (T, D/2) fp32; logn (T,) fp32 or
        None -> attention output (T, H, D)."""
        ...


@dataclass
class ForwardBatch:
    """Per-token metadata of one forward over T flattened tokens."""

    positions: torch.Tensor  # (T,) int64 absolute positions
    ntk_alpha: torch.Tensor  # (T,) fp32, the NTK alpha of each token's sequence (1.0 when NTK is off)
    attn: AttentionBackend


def rotate_qkv(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (T, H + 2 Hkv, D) -> rotated, LogN-scaled q (T, H, D), rotated k and v (T, Hkv, D): the one plain-PyTorch
    definition (the paged reference kernels/paged_reference.py and the fused Triton kernel match it bit for bit)."""
    hkv = (qkv.shape[1] - num_heads) // 2
    q, k, v = qkv.split([num_heads, hkv, hkv], dim=1)
    qk = apply_rotary(torch.cat([q, k], dim=1), cos, sin)  # one rotation for both: fewer kernels
    q, k = qk.split([num_heads, hkv], dim=1)
    if logn is not None:  # Qwen's LogN: the rounded rotation scaled, then rounded again
        q = (q.float() * logn[:, None, None]).to(q.dtype)
    return q, k, v


class RotatingAttention:
    """A backend over rotated q/k/v: subclasses implement `attend`; keys are stored after rotation."""

    def attend_qkv(self, layer: int, qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   logn: torch.Tensor | None, scale: float) -> torch.Tensor:
        return self.attend(layer, *rotate_qkv(qkv, num_heads, cos, sin, logn), scale)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (T, H, D), k/v (T, Hkv, D) for the new tokens -> attention output (T, H, D)."""
        raise NotImplementedError


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    """q (B, S, H, D), k/v (B, L, Hkv, D) -> (B, S, H, D); grouped-query heads are expanded by SDPA."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


class DenseAttention(RotatingAttention):
    """Full causal attention over `batch` sequences of `seqlen` tokens each, without a cache."""

    def __init__(self, batch: int, seqlen: int) -> None:
        self.batch, self.seqlen = batch, seqlen

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, s = self.batch, self.seqlen
        out = sdpa(q.view(b, s, *q.shape[1:]), k.view(b, s, *k.shape[1:]), v.view(b, s, *v.shape[1:]),
                    scale, None, causal=True)
        return out.reshape(q.shape)
