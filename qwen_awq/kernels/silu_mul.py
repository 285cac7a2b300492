"""SiLU(gate) * up over a gate_up row [gate | up] in one pass (before the down projection, plain or W4A16, unless
kernels/w4a16.silu_in_prologue says the W4A16 prologue is faster). Rounds where the torch ops do: silu to the input
dtype, then the product, so the result equals reference.silu_mul_reference up to the exp's last fp32 bit. CPU
tensors take the reference."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from qwen_awq.kernels.reference import silu_mul_reference
from qwen_awq.kernels.w4a16_common import jit, tl, triton

_BLOCK = 1024  # columns per program: a few 16-byte loads per thread at 4 warps


@jit
def _silu_mul_kernel(x_ptr, out_ptr, width, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # F.silu rounds to the dtype first
    tl.store(out_ptr + row * width + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def _triton_ok(gate_up: Tensor) -> bool:
    on_device = gate_up.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        triton is not None
        and on_device
        and gate_up.dtype in (torch.float16, torch.bfloat16)
        and gate_up.shape[-1] % 2 == 0
        and not (torch.is_grad_enabled() and gate_up.requires_grad)  # no backward
    )


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up (..., 2I) -> (..., I): one kernel on CUDA, else the reference."""
    if not _triton_ok(gate_up):
        return silu_mul_reference(gate_up)
    width = gate_up.shape[-1] // 2
    x2d = gate_up.reshape(-1, 2 * width)  # (rows, 2I)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    out = torch.empty((x2d.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)  # (rows, I)
    if x2d.shape[0] and width:
        grid = (x2d.shape[0], triton.cdiv(width, _BLOCK))
        _silu_mul_kernel[grid](x2d, out, width, x2d.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out.view(*gate_up.shape[:-1], width)
