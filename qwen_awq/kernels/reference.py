"""Plain-PyTorch references for the GPU kernels: the CPU path and the test oracle.

W4A16 matmul on the AutoAWQ layout and on the repacked kernel layout, SiLU(gate) * up, and the fused
residual-add + RMSNorm with Qwen's semantics (models/layers.py RMSNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_awq.quant.packing import dequantize, dequantize_repacked


def awq_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(W) [K, N] + bias, dequantizing in x's dtype."""
    wt = dequantize(qweight, qzeros, scales, group_size, dtype=x.dtype)  # (K, N)
    if x.shape[-1] != wt.shape[0]:
        raise ValueError(f"input has {x.shape[-1]} features but the AWQ weight expects {wt.shape[0]}")
    y = x @ wt  # (..., N)
    return y if bias is None else y + bias.to(x.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] = [gate | up], in its dtype (models/decoder.py MLP)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def w4a16_matmul_reference(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scale_zero: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """y [..., N] = x' @ W^T + bias on the repacked layout, x' = x or silu_mul_reference(x)."""
    if silu:
        x = silu_mul_reference(x)
    w = dequantize_repacked(qweight_t, scale_zero, group_size, scale_dtype, dtype=x.dtype)  # (N, K)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features but the W4A16 weight expects {w.shape[1]}")
    y = x @ w.t()  # (..., N)
    return y if bias is None else y + bias.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual): the sum rounds to x's dtype first, the norm runs in fp32
    and rounds to x's dtype before the weight multiplies, as RMSNorm after a residual add does."""
    h = x + residual  # (..., H) in x's dtype
    normed = F.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(h.dtype) * weight
    return normed, h
