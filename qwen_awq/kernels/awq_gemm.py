"""W4A16 Triton kernels for AWQ GEMM-layout weights and `awq_matmul`, which picks a kernel by M.

Small M streams the packed weights once with a split-K kernel; large M dequantizes to x's dtype for cuBLAS.
CPU tensors (and anything these kernels do not cover) take the plain-PyTorch reference in reference.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.reference import awq_matmul_reference
from qwen_awq.quant.packing import PACK_FACTOR, validate_packed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: awq_matmul always takes the reference path
    triton = None
    tl = None

# Tuning defaults (tile shapes: default_config, tuned on an H200 by bench/awq_kernel_bench.py --sweep):
GEMV_MAX_M = 1  # M at or below this uses the CUDA-core GEMV (tl.dot needs 16-row tiles)
DEQUANT_MIN_M = 256  # from here on, dequantize + cuBLAS beats the fused tensor-core kernel (spec: awq.md)
GEMV_WAVES = 4  # split-K aims at this many programs per SM: enough bytes in flight to saturate HBM
GEMM_WAVES = 2
MIN_BLOCK_K = 16  # tl.dot's smallest K tile; the group size must be a multiple of it
_REDUCE_BLOCK = 1024
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
_INTERPRETER_SMS = 4  # stands in for the SM count when the Triton interpreter runs on CPU tensors


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one kernel; block_k is capped to divide the group size so a K tile has one group."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ConfigError(f"TileConfig.{name} must be a positive power of two, found {value}")
        if self.block_n < 16 or self.num_stages < 1:  # 16: tl.dot's smallest N tile
            raise ConfigError(f"TileConfig needs block_n >= 16 and num_stages >= 1, found {self}")


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _nibble_offsets(BLOCK_N: tl.constexpr):
    """Per tile column: the bit offset of its nibble in the word, and e = offset % 16 (see _unpack_magic)."""
    j = tl.arange(0, BLOCK_N) % 8
    # Packing order (0, 2, 4, 6, 1, 3, 5, 7): even j sits in slot j/2, odd j in slot 4 + j//2.
    shift = ((j // 2) + (j % 2) * 4) * 4
    return shift, shift % 16


@_jit
def _inv_pow2(e):
    """Exactly 2**-e as fp32, built from the exponent bits (127 is the fp32 exponent bias)."""
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@_jit
def _unpack_magic(words, BLOCK_N: tl.constexpr):
    """int32 words (R, BLOCK_N/8) -> fp32 (R, BLOCK_N) holding exactly 2**23 + q * 2**e for each 4-bit code q.

    OR-ing the nibble, left at bit e <= 12, into the mantissa of 2**23 (bits 0x4B000000) makes a float with
    no int-to-float conversion (a slow instruction) and, for half the columns, no shift either.
    """
    words = words.to(tl.uint32, bitcast=True)  # logical shifts: no sign extension to undo
    w = tl.interleave(words, words)
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)  # (R, BLOCK_N): each word repeated for its 8 columns
    shift, e = _nibble_offsets(BLOCK_N)
    bits = ((w >> (shift - e)[None, :]) & (0xF << e)[None, :]) | 0x4B000000
    return bits.to(tl.float32, bitcast=True)


@_jit
def _load_tile(qw_ptr, qz_ptr, s_ptr, k0, pid_n, N, n_words,
               G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed words (BLOCK_K, BLOCK_N/8), zero words (BLOCK_N/8,) and fp32 scales (BLOCK_N,) of one K tile,
    which the caller keeps inside one group. n_words = N / 8 comes in as an argument so Triton sees its
    divisibility by 16 and vectorizes the loads.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_mask = offs_w < n_words
    words = tl.load(qw_ptr + offs_k[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
    g = k0 // G
    zwords = tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0)
    s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    return words, zwords, s


@_jit
def _dequant(words, zwords, s, BLOCK_N: tl.constexpr, EXACT: tl.constexpr):
    """Float32 Wt tile (BLOCK_K, BLOCK_N), times 2**e per column unless EXACT (the caller then multiplies
    its result by _inv_pow2(e) once)."""
    if EXACT:
        s = s * _inv_pow2(_nibble_offsets(BLOCK_N)[1])  # a power of two: exact
    # (2**23 + q 2**e) - (2**23 + z 2**e) = (q - z) 2**e exactly; times an fp16 scale it stays exact in
    # fp32, like the reference's dequantize.
    d = _unpack_magic(words, BLOCK_N) - _unpack_magic(zwords[None, :], BLOCK_N)  # (BLOCK_K, BLOCK_N)
    return d * s[None, :]


@_jit
def _store_tile(acc, out_ptr, bias_ptr, offs_m, M, N,
                BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write a (rows, BLOCK_N) fp32 tile: final (bias, x's dtype) without split-K, else this split's partial.

    Grid axis 1 is the N tile and axis 2 the K split in every kernel that calls this.
    """
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if not IS_SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part_ptr = out_ptr + tl.program_id(2) * M * N  # partials: (split_k, M, N) fp32
        tl.store(part_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@_jit
def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, NW, K, stride_xm, iters_per_split,
                 G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One x row per program on CUDA cores: accumulate x[k] * Wt[k, n] in a (BLOCK_K, BLOCK_N) fp32 tile."""
    row, pid_n = tl.program_id(0), tl.program_id(1)
    start = tl.program_id(2) * iters_per_split
    end = tl.minimum(start + iters_per_split, K // BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + row * stride_xm + tl.arange(0, BLOCK_K)
    # Prefetch one K tile ahead by hand: Triton pipelines only loads that feed tl.dot, and a decode GEMV
    # needs many bytes in flight per SM to reach HBM bandwidth.
    tile = _load_tile(qw_ptr, qz_ptr, s_ptr, start * BLOCK_K, pid_n, N, NW, G, BLOCK_N, BLOCK_K)
    xk = tl.load(x_row + start * BLOCK_K)  # (BLOCK_K,)
    for it in range(start, end):
        k_next = tl.minimum(it + 1, end - 1) * BLOCK_K  # the last tile reloads itself: in bounds, unused
        tile_next = _load_tile(qw_ptr, qz_ptr, s_ptr, k_next, pid_n, N, NW, G, BLOCK_N, BLOCK_K)
        x_next = tl.load(x_row + k_next)
        w = _dequant(tile[0], tile[1], tile[2], BLOCK_N, False)  # (BLOCK_K, BLOCK_N), times 2**e
        acc += xk.to(tl.float32)[:, None] * w
        tile, xk = tile_next, x_next
    # One cross-thread reduction at the end instead of one per K tile.
    y = (tl.sum(acc, axis=0) * _inv_pow2(_nibble_offsets(BLOCK_N)[1]))[None, :]  # (1, BLOCK_N)
    _store_tile(y, out_ptr, bias_ptr, tl.full((1,), 0, tl.int32) + row, M, N, BLOCK_N, IS_SPLIT, HAS_BIAS)


@_jit
def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, NW, K, stride_xm, iters_per_split,
                 G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Tensor-core tile: dequantize a (BLOCK_K, BLOCK_N) weight tile in-loop and tl.dot it with x."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.program_id(2) * iters_per_split
    end = tl.minimum(start + iters_per_split, K // BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(start, end):
        k0 = it * BLOCK_K
        tile = _load_tile(qw_ptr, qz_ptr, s_ptr, k0, tl.program_id(1), N, NW, G, BLOCK_N, BLOCK_K)
        w = _dequant(tile[0], tile[1], tile[2], BLOCK_N, True)  # (BLOCK_K, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        xt = tl.load(x_ptrs, mask=offs_m[:, None] < M, other=0.0)  # (BLOCK_M, BLOCK_K)
        # Rounding w to x's dtype once matches the reference, which dequantizes in x's dtype.
        acc = tl.dot(xt, w.to(xt.dtype), acc)
    _store_tile(acc, out_ptr, bias_ptr, offs_m, M, N, BLOCK_N, IS_SPLIT, HAS_BIAS)


@_jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, split_k,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out (M, N) = sum of the split_k fp32 partials (+ bias), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, out_ptr, N, NW, G: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out (K, N) in out's dtype = dequantized Wt; grid (K / BLOCK_K, N tiles)."""
    k0 = tl.program_id(0) * BLOCK_K
    tile = _load_tile(qw_ptr, qz_ptr, s_ptr, k0, tl.program_id(1), N, NW, G, BLOCK_N, BLOCK_K)
    w = _dequant(tile[0], tile[1], tile[2], BLOCK_N, True)  # (BLOCK_K, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n[None, :] < N
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache  # called per Linear per forward; the answer depends on m alone
def default_config(m: int) -> TileConfig:
    """Tile shape by M, from the tile sweep over Qwen-7B's four shapes (bench/results/awq_kernel_H200_sweep.md):
    the GEMV's 128 x 64 tiles were already the best; for the tensor-core kernel at M = 16 and 64, 64-wide N
    tiles with 128-deep K tiles take 1.6x and 1.3x less time than the earlier 128 x 64 guess."""
    if m <= GEMV_MAX_M:
        return TileConfig(1, 128, 64, num_warps=4, num_stages=3)
    block_m = min(max(16, 1 << (m - 1).bit_length()), 128)  # next power of two in 16..128
    return TileConfig(block_m, 64, 128, num_warps=8 if block_m >= 128 else 4, num_stages=4)


DEQUANT_CONFIG = TileConfig(1, 128, 64)


def triton_supports(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None
) -> bool:
    """Whether awq_matmul can run these tensors on the Triton kernels (else it takes the reference)."""
    wants_grad = torch.is_grad_enabled() and x.requires_grad  # the kernels have no backward
    tensors = (x, qweight, qzeros, scales) if bias is None else (x, qweight, qzeros, scales, bias)
    return (
        triton is not None
        and all(t.is_cuda for t in tensors)
        and all(t.is_contiguous() for t in (qweight, qzeros, scales))
        and x.dtype in _TRITON_DTYPES
        and group_size % MIN_BLOCK_K == 0
        and not wants_grad
    )


def _prepare(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None
) -> tuple[Tensor, int, int]:
    """Validate shapes; return x as (M, K) with unit stride along K, and (K, N)."""
    if triton is None:
        raise ConfigError("the AWQ Triton kernels need Triton: pip install triton (awq_matmul falls back)")
    k, n = validate_packed(qweight, qzeros, scales, group_size, bias)
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the AWQ weight expects {k}")
    if group_size % MIN_BLOCK_K != 0:
        raise ConfigError(f"the AWQ Triton kernels need a group size divisible by 16, found {group_size}")
    if not all(t.is_contiguous() for t in (qweight, qzeros, scales)):
        raise ConfigError("the AWQ Triton kernels need contiguous qweight, qzeros and scales")
    x2d = x.reshape(-1, k)  # (M, K)
    return (x2d if x2d.stride(-1) == 1 else x2d.contiguous()), k, n


def _block_k(group_size: int, want: int) -> int:
    """Largest power of two <= want dividing the group size: each K tile then reads one group's zeros."""
    return min(want, group_size & -group_size)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _split_k(tiles: int, n_iters: int, waves: int, num_sms: int) -> int:
    """Split K so that tiles * split ~ waves * SMs (decode has too few output tiles to fill the GPU)."""
    return max(1, min(n_iters, waves * num_sms // tiles))


def _splitk_matmul(
    x2d: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None,
    config: TileConfig, split_k: int | None, gemv: bool,
) -> Tensor:
    """Launch the GEMV (one program per x row) or tensor-core kernel, then reduce split-K partials."""
    (m, k), n = x2d.shape, qweight.shape[1] * PACK_FACTOR
    if m == 0:  # a zero-size grid is not a launch
        return x2d.new_empty(0, n)
    block_k = _block_k(group_size, config.block_k)
    n_iters, n_tiles = k // block_k, triton.cdiv(n, config.block_n)
    grid_m = m if gemv else triton.cdiv(m, config.block_m)
    if split_k is None:
        waves = GEMV_WAVES if gemv else GEMM_WAVES
        split_k = _split_k(grid_m * n_tiles, n_iters, waves, _num_sms(x2d.device))
    per_split = triton.cdiv(n_iters, split_k)
    split_k = triton.cdiv(n_iters, per_split)  # drop splits that would get no K tile
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)  # (M, N)
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x2d.device)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else out  # never read when HAS_BIAS is False
    nw, stride = n // PACK_FACTOR, x2d.stride(0)
    args = (x2d, qweight, qzeros, scales, bias_arg, target, m, n, nw, k, stride, per_split, group_size)
    meta = dict(BLOCK_N=config.block_n, BLOCK_K=block_k, IS_SPLIT=split_k > 1, HAS_BIAS=has_bias,
                num_warps=config.num_warps, num_stages=config.num_stages)
    if gemv:
        _gemv_kernel[(m, n_tiles, split_k)](*args, **meta)
    else:
        _gemm_kernel[(grid_m, n_tiles, split_k)](*args, BLOCK_M=config.block_m, **meta)
    if split_k > 1:
        grid = (triton.cdiv(m * n, _REDUCE_BLOCK),)
        _splitk_reduce_kernel[grid](
            target, bias_arg, out, m, n, split_k, HAS_BIAS=has_bias, BLOCK=_REDUCE_BLOCK
        )
    return out


def awq_gemv_triton(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None,
    config: TileConfig | None = None, split_k: int | None = None,
) -> Tensor:
    """y (..., N) via the CUDA-core split-K GEMV: one program per x row, the weights streamed once per row."""
    x2d, _, n = _prepare(x, qweight, qzeros, scales, group_size, bias)
    cfg = config or default_config(1)
    y = _splitk_matmul(x2d, qweight, qzeros, scales, group_size, bias, cfg, split_k, gemv=True)
    return y.view(*x.shape[:-1], n)


def awq_gemm_triton(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None,
    config: TileConfig | None = None, split_k: int | None = None,
) -> Tensor:
    """y (..., N) via the tensor-core kernel that dequantizes weight tiles in-loop (split-K for small M)."""
    x2d, _, n = _prepare(x, qweight, qzeros, scales, group_size, bias)
    cfg = config or default_config(max(x2d.shape[0], GEMV_MAX_M + 1))
    y = _splitk_matmul(x2d, qweight, qzeros, scales, group_size, bias, cfg, split_k, gemv=False)
    return y.view(*x.shape[:-1], n)


def dequantize_triton(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype
) -> Tensor:
    """Wt (K, N) in dtype, the same values as packing.dequantize(..., dtype=dtype)."""
    if triton is None:
        raise ConfigError("the AWQ Triton kernels need Triton: pip install triton (awq_matmul falls back)")
    k, n = validate_packed(qweight, qzeros, scales, group_size)
    if not all(t.is_contiguous() for t in (qweight, qzeros, scales)):
        raise ConfigError("the AWQ Triton kernels need contiguous qweight, qzeros and scales")
    cfg = DEQUANT_CONFIG
    block_k = _block_k(group_size, cfg.block_k)
    wt = torch.empty(k, n, dtype=dtype, device=qweight.device)  # (K, N)
    grid = (k // block_k, triton.cdiv(n, cfg.block_n))
    _dequant_kernel[grid](qweight, qzeros, scales, wt, n, n // PACK_FACTOR, group_size,
                          BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps)
    return wt


def awq_dequant_matmul(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """y (..., N): dequantize to x's dtype with Triton, then the vendor GEMM (cuBLAS on CUDA)."""
    x2d, _, n = _prepare(x, qweight, qzeros, scales, group_size, bias)
    wt = dequantize_triton(qweight, qzeros, scales, group_size, x.dtype)  # (K, N)
    y = x2d @ wt if bias is None else torch.addmm(bias.to(x.dtype), x2d, wt)  # (M, N)
    return y.view(*x.shape[:-1], n)


def awq_matmul_triton(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """y (..., N) on the Triton path, kernel chosen by M = number of x rows."""
    m = x.numel() // max(x.shape[-1], 1)
    if m <= GEMV_MAX_M:
        return awq_gemv_triton(x, qweight, qzeros, scales, group_size, bias)
    if m < DEQUANT_MIN_M:
        return awq_gemm_triton(x, qweight, qzeros, scales, group_size, bias)
    return awq_dequant_matmul(x, qweight, qzeros, scales, group_size, bias)


def awq_matmul(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """y [..., N] = x [..., K] @ dequant(W) [K, N] + bias in x's dtype: Triton on CUDA, else the reference."""
    if triton_supports(x, qweight, qzeros, scales, group_size, bias):
        return awq_matmul_triton(x, qweight, qzeros, scales, group_size, bias)
    return awq_matmul_reference(x, qweight, qzeros, scales, group_size, bias)
