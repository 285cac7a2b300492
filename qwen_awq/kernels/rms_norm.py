"""Fused residual add + RMSNorm (one read of x and residual, one write of each result) with Qwen's semantics.

new_residual = x + residual, rounded to x's dtype; normed = rms_norm(new_residual in fp32) rounded to x's dtype,
times weight (reference.fused_add_rms_norm_reference). One program per row; CPU tensors take the reference.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from qwen_awq.kernels.reference import fused_add_rms_norm_reference
from qwen_awq.kernels.w4a16_common import jit, tl, triton

_MAX_BLOCK = 16384  # one row per program in registers; wider rows take the reference


@jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, H, stride_x, stride_r, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # one rounding, as x + residual in x's dtype
    tl.store(new_res_ptr + row * H + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * rstd).to(x.dtype).to(tl.float32)  # rounds to x's dtype before the weight, as RMSNorm does
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _triton_ok(x: Tensor, residual: Tensor, weight: Tensor) -> bool:
    on_device = all(t.is_cuda for t in (x, residual, weight)) or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        triton is not None
        and on_device
        and x.dtype in (torch.float16, torch.bfloat16)
        and residual.dtype == x.dtype
        and weight.dtype == x.dtype
        and x.shape == residual.shape
        and x.shape[-1] <= _MAX_BLOCK
        and not (torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad))
    )


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(normed, new_residual) for x, residual (..., H) and weight (H,): one kernel on CUDA, else the reference."""
    if not _triton_ok(x, residual, weight):
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    h = x.shape[-1]
    x2d, r2d = x.reshape(-1, h), residual.reshape(-1, h)  # (rows, H)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    r2d = r2d if r2d.stride(-1) == 1 else r2d.contiguous()
    normed = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)  # (rows, H)
    new_res = torch.empty_like(normed)
    if x2d.shape[0]:
        block = triton.next_power_of_2(h)
        _add_rms_norm_kernel[(x2d.shape[0],)](
            x2d, r2d, weight, normed, new_res, h, x2d.stride(0), r2d.stride(0), eps, BLOCK=block,
            num_warps=min(16, max(1, block // 512)))
    return normed.view(x.shape), new_res.view(x.shape)
