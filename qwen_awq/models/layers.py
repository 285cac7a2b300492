"""Building blocks of the decoder: RMSNorm, rotary embedding with Qwen's dynamic NTK and LogN, linear factory."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen_awq.models.config import QuantConfig


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back to the input dtype, then scaled (Qwen and HF Llama)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused kernel where torch has one
        return normed.to(x.dtype) * self.weight


def make_linear(
    in_features: int, out_features: int, bias: bool, quant: QuantConfig | None, dtype: torch.dtype
) -> nn.Module:
    """The layer of the checkpoint's weight format: a plain Linear, or a W4A16 AWQ Linear holding packed tensors."""
    from qwen_awq.quant.formats import quant_format  # imports the Triton kernels: only when a model is built

    return quant_format(quant).make_linear(in_features, out_features, bias, quant, dtype)


def ntk_alpha(prefill_len: int, seq_length: int) -> float:
    """Qwen's dynamic-NTK alpha for a sequence whose prefill has prefill_len tokens (spec: qwen.md)."""
    context_value = math.log(prefill_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_cos_sin(
    positions: torch.Tensor, alpha: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (tokens, head_dim/2) in fp32; each token's base is theta * alpha^(d/(d-2)) (dynamic NTK)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim  # (D/2,)
    base = theta * alpha.float().pow(head_dim / (head_dim - 2))  # (T,)
    inv_freq = 1.0 / base[:, None].pow(exponent[None, :])  # (T, D/2)
    freqs = positions.float()[:, None] * inv_freq  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-rotation (NeoX-style) RoPE over the whole head, computed in fp32. x: (T, heads, head_dim)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)  # (T, heads, D/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen's LogN query scale per token: max(1, ln(p+1)/ln(seq_length)) for 0-based position p. (T,) fp32."""
    p1 = positions.float() + 1
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
