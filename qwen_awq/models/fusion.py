"""Which kernels a decoder block's elementwise work takes: the one place that decides, so Block and MLP hold no
device or layer-type ifs and the kernel-count tool (eval/profile_step.py) can compare both paths in one process.

Fused (the default): residual add + RMSNorm in one kernel (kernels/rms_norm.py), or, for one token on the GPU, in
the prologue of the W4A16 projection that reads its output (norm_linear: AWQLinear.norm_forward, where
QWEN_AWQ_NORM_PROLOGUE=1 turns it on), and SiLU(gate) * up either in the W4A16 down projection's prologue
(AWQLinear.silu_mul_forward, at the M where that measured faster: kernels/w4a16.silu_in_prologue) or in one pass
over [gate | up] (kernels/silu_mul.py). Unfused (QWEN_AWQ_FUSED=0, or `with fusion(False)`): the separate torch ops
the decoder used before. Both round to the model's dtype at the same points, so their outputs agree (exactly on the
CPU references).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qwen_awq.kernels.reference import silu_mul_reference

FUSED_ENV = "QWEN_AWQ_FUSED"  # "0" turns the fusions off
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


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module, linear: nn.Module
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual): in one kernel where the Linear can take the norm in its
    prologue (AWQLinear.norm_forward: one token on the GPU), else add_rms_norm, then the Linear."""
    if fused() and hasattr(linear, "norm_forward"):
        got = linear.norm_forward(x, residual, norm.weight, norm.eps)
        if got is not None:
            return got
    normed, residual = add_rms_norm(x, residual, norm)
    return linear(normed), residual


def silu_mul_down(gate_up: torch.Tensor, down: nn.Module) -> torch.Tensor:
    """down(silu(gate) * up) for gate_up = [gate | up] (..., 2I)."""
    if not fused():
        return down(silu_mul_reference(gate_up))
    if hasattr(down, "silu_mul_forward"):  # AWQ: the W4A16 prologue where it measured faster
        return down.silu_mul_forward(gate_up)
    from qwen_awq.kernels.silu_mul import silu_mul

    return down(silu_mul(gate_up))
