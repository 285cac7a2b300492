"""Which kernels a decoder block's elementwise work takes: the one place that decides, so Block and MLP hold no
device or layer-type ifs and the kernel-count tool (eval/profile_step.py) can compare both paths in one process.

Fused (the default): residual add + RMSNorm in one kernel (kernels/rms_norm.py), or, after an output projection
(o_proj, down_proj) that runs one token on the NVRTC W4A16 GEMV, in that GEMV's epilogue (AWQLinear.add_norm_forward,
kernels/w4a16_cuda_norm.py; QWEN_AWQ_NORM_FOLD=0 keeps it separate); SiLU(gate) * up either in the W4A16 down
projection's prologue (AWQLinear.silu_mul_forward, at the M where that measured faster:
kernels/w4a16.silu_in_prologue) or in one pass over [gate | up] (kernels/silu_mul.py). Unfused (QWEN_AWQ_FUSED=0,
or `with fusion(False)`): the separate torch ops the decoder used before. Both round to the model's dtype at the
same points, so their outputs agree (exactly on the CPU references).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qwen_awq.kernels.reference import silu_mul_reference

FUSED_ENV = "QWEN_AWQ_FUSED"  # "0" turns the fusions off
NORM_FOLD_ENV = "QWEN_AWQ_NORM_FOLD"  # "0" keeps the add + RMSNorm out of the GEMV's epilogue (the A/B of the fold)
_override: bool | None = None  # set by fusion(); wins over the environment


def fused() -> bool:
    """Whether the fused kernels run; read at every call (cheap), so a benchmark can flip it between runs.
    CUDA graphs capture whichever path was on at capture time."""
    if _override is not None:
        return _override
    return os.environ.get(FUSED_ENV, "1") != "0"


@contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Run the block with the fusions on or off, whatever the environment says (tests, profile_step)."""
    global _override
    saved, _override = _override, enabled
    try:
        yield
    finally:
        _override = saved


def norm_folded() -> bool:
    """Whether an output projection may take the residual add + RMSNorm after it into its epilogue: with the fusions,
    unless QWEN_AWQ_NORM_FOLD=0 (read at every call, like fused())."""
    return fused() and os.environ.get(NORM_FOLD_ENV, "1") != "0"


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); with no residual yet (the first block), (norm(x), x)."""
    if residual is None:
        return norm(x), x
    if fused():
        from qwen_awq.kernels.rms_norm import fused_add_rms_norm

        return fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    h = x + residual
    return norm(h), h


def silu_mul_down(gate_up: torch.Tensor, down: nn.Module) -> torch.Tensor:
    """down(silu(gate) * up) for gate_up = [gate | up] (..., 2I)."""
    if not fused():
        return down(silu_mul_reference(gate_up))
    if hasattr(down, "silu_mul_forward"):  # AWQ: the W4A16 prologue where it measured faster
        return down.silu_mul_forward(gate_up)
    from qwen_awq.kernels.silu_mul import silu_mul

    return down(silu_mul(gate_up))


def linear_add_norm(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                    silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h), h) for h = y + residual, y = linear(x), or with silu y = silu_mul_down(x, linear) (x = [gate | up]):
    the add and the norm in the linear's epilogue where it has one (AWQLinear.add_norm_forward, which decides per
    call), else add_rms_norm after it."""
    if norm_folded() and hasattr(linear, "add_norm_forward"):
        return linear.add_norm_forward(x, residual, norm, silu)
    return add_rms_norm(silu_mul_down(x, linear) if silu else linear(x), residual, norm)
