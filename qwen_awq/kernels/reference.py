"""Plain-PyTorch W4A16 matmul: the CPU path and the test oracle for the GPU kernels."""

from __future__ import annotations

import torch

from qwen_awq.quant.packing import dequantize


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
