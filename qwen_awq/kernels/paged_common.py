"""Pieces shared by the paged kernels: the int8 code conversion, split bounds, outputs and their merge, pool strides,
and the test of whether tensors can take the kernels at all."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from qwen_awq.kernels.paged_reference import PagedKV

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dispatchers take the references
    triton = None
    tl = None

MAX_SPLITS = 64  # the merge kernel holds every split of a head in one tile
LOG2E = 1.4426950408889634  # the kernels use exp2: softmax(s) = 2^(s log2 e - max)
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_INTERPRETER_SMS = 4  # stands in for the SM count when the Triton interpreter runs on CPU tensors


def jit(fn):
    return fn if triton is None else triton.jit(fn)


@jit
def codes_f32(x, ASM: tl.constexpr):
    """uint8 codes -> fp32 without the int-to-float instruction (a quarter-rate unit): the fp32 with bits
    0x4B000000 | c is exactly 2^23 + c. ASM builds four of them with one PRMT each (the compiler spends two or
    three shifts/masks per code); the CPU interpreter runs no PTX, so it takes the plain form."""
    if ASM:
        magic = tl.inline_asm_elementwise(
            "{ .reg .b32 t; mov.b32 t, 0x4B000000; prmt.b32 $0, $4, t, 0x7440; prmt.b32 $1, $4, t, 0x7441; "
            "prmt.b32 $2, $4, t, 0x7442; prmt.b32 $3, $4, t, 0x7443; }",
            "=r,=r,=r,=r,r", [x], dtype=tl.int32, is_pure=True, pack=4)
    else:
        magic = x.to(tl.int32) | 0x4B000000
    return magic.to(tl.float32, bitcast=True) - 8388608.0


@jit
def codes_f16_offset(x, ASM: tl.constexpr):
    """uint8 codes -> fp16 1024 + c, exact: the fp16 with bits 0x6400 | c is 2^10 + c for c in 0..255 (bf16 has
    too few mantissa bits for this, so these dots run in fp16 whatever the activations). ASM builds two of them
    with one PRMT (four codes, two PRMTs); the CPU interpreter runs no PTX, so it takes the plain form."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; mov.b32 t, 0x64646464; prmt.b32 $0, $2, t, 0x4140; prmt.b32 $1, $2, t, 0x4342; }",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    return (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)


@jit
def split_range(LENS, b, split, num_splits, BLOCK_N: tl.constexpr):
    """Tokens [lo, hi) of sequence b that this split reads: its share of the real length, in whole tiles."""
    ctx = tl.load(LENS + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(lo + chunk, ctx)


@jit
def finish(OUT, PART_M, PART_L, acc, m, l_sum, b, heads, live, split, num_splits, num_heads, stride_ob,
            stride_oh, HEAD_DIM: tl.constexpr, IS_SPLIT: tl.constexpr):
    """acc (GP, D), m/l_sum (GP,) of heads (GP,) -> the output rows, or this split's partial softmax."""
    d = tl.arange(0, HEAD_DIM)
    if IS_SPLIT:
        part = (b * num_heads + heads) * num_splits + split  # (GP,) rows of the (B, H, splits) partials
        tl.store(OUT + part[:, None] * HEAD_DIM + d[None, :], acc, mask=live[:, None])
        tl.store(PART_M + part, m, mask=live)
        tl.store(PART_L + part, l_sum, mask=live)
    else:
        out = acc / tl.where(l_sum == 0, 1.0, l_sum)[:, None]
        ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=live[:, None])


def kv_strides(x: Tensor, block_size: int, block_major: bool) -> tuple[int, int, int]:
    """(block, token-in-block, head) element strides of a pool tensor; the last dim must be contiguous."""
    if x.stride(-1) != 1:
        raise ValueError("the paged kernels need the pool's last dimension contiguous")
    if block_major:  # (blocks, Hkv, block_size, .)
        return x.stride(0), x.stride(2), x.stride(1)
    return block_size * x.stride(0), x.stride(0), x.stride(1)  # (slots, Hkv, .)


def dot_dtype(dtype: torch.dtype):
    """Operand type of tl.dot: the model dtype, except bf16 under the CPU interpreter, whose bf16 dot reads the
    raw storage as integers (fp32 is exact there); the GPU bench checks bf16 on tensor cores."""
    if dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _kernel_device(x: Tensor, kv: PagedKV) -> bool:
    if triton.knobs.runtime.interpret:
        return not x.is_cuda and not kv.k.is_cuda
    return x.is_cuda and kv.k.is_cuda


def triton_supports(x: Tensor, num_heads: int, kv: PagedKV) -> bool:
    """Whether the paged kernels take activations x (q or qkv) and this pool (else the dispatchers run the
    reference): CUDA (or CPU tensors under TRITON_INTERPRET=1, so that CPU tests run the kernels end to end),
    fp16/bf16 in the pool's dtype or int8 codes, a power-of-two head_dim, whole GQA groups."""
    d = kv.head_dim
    return (triton is not None and _kernel_device(x, kv) and x.dtype in _TRITON_DTYPES
            and (kv.int8 or kv.k.dtype == x.dtype) and d >= 16 and d & (d - 1) == 0
            and num_heads % kv.num_kv_heads == 0)


def use_asm() -> bool:
    """Inline PTX is for the GPU; the CPU interpreter runs the plain-Triton form of the same conversion."""
    return not triton.knobs.runtime.interpret


@jit
def _merge_kernel(PART, PART_M, PART_L, OUT, num_heads, num_splits, stride_ob, stride_oh,
                  SP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (sequence, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the context splits."""
    row = tl.program_id(0)  # b * num_heads + h
    s = tl.arange(0, SP)
    d = tl.arange(0, HEAD_DIM)
    live = s < num_splits
    m = tl.load(PART_M + row * num_splits + s, mask=live, other=float("-inf"))
    l_sum = tl.load(PART_L + row * num_splits + s, mask=live, other=0.0)
    top = tl.max(m, 0)
    w = tl.exp2(m - top)  # empty splits (m = -1e30, l = 0) weigh nothing
    acc = tl.load(PART + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    den = tl.sum(w * l_sum, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(den == 0, 1.0, den)
    b, h = row // num_heads, row % num_heads
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty))


def merge_splits(part: Tensor, part_m: Tensor, part_l: Tensor, out: Tensor, splits: int) -> None:
    """out (B, H, D) from the context splits' partials: part (B, H, splits, D), part_m / part_l (B, H, splits)."""
    bsz, heads, d = out.shape
    _merge_kernel[(bsz * heads,)](part, part_m, part_l, out, heads, splits, out.stride(0), out.stride(1),
                                  SP=MAX_SPLITS, HEAD_DIM=d, num_warps=4)


def choose_splits(batch: int, kv_heads: int, max_tokens: int, config, sms: int) -> int:
    """Context splits from shapes alone: (batch * kv_heads * splits) ~ waves x SMs programs, each split at least
    config.min_split_tokens long; config.splits when set (the decode kernels' configs, Triton's and CUDA's)."""
    if config.splits is not None:
        return config.splits
    want = -(-config.waves * sms // (batch * kv_heads))
    return max(1, min(want, max_tokens // config.min_split_tokens, MAX_SPLITS))


def split_outputs(q: Tensor, splits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, target, part_m, part_l) for a decode kernel writing q-shaped (B, H, D) out: with one split the
    kernel writes out itself (the partial buffers alias it, never read), else fp32 partials (B, H, splits, D) and
    (B, H, splits) for merge_splits."""
    bsz, heads, d = q.shape
    out = torch.empty_like(q)
    if splits == 1:
        return out, out, out, out
    part_m = q.new_empty((bsz, heads, splits), dtype=torch.float32)
    return out, q.new_empty((bsz, heads, splits, d), dtype=torch.float32), part_m, torch.empty_like(part_m)
