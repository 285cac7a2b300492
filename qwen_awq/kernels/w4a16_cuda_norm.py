"""The NVRTC W4A16 GEMV (w4a16_cuda.py) at one token with the next residual add + RMSNorm in its epilogue.

At M = 1 the separate add + RMSNorm (kernels/rms_norm.py) is one tiny program, all latency (2.1 us a call on the
H200, 64 calls a Qwen-7B step), after o_proj and down_proj. Here the GEMV's ADD_NORM variant writes
h = round(round(y) + residual) for its rows instead of y; then each block draws a ticket from one counter
(threadFenceReduction's "last block" pattern), and the block that draws the last reads the whole h row from L2,
computes rstd in fp32 and writes round(round(h * rstd) * weight), RMSNorm's roundings, and resets the counter for
the next launch (and CUDA graph replay). Reference: reference.w4a16_matmul_reference, then
reference.fused_add_rms_norm_reference.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qwen_awq.kernels.w4a16 import W4Weight, choose, triton_supports
from qwen_awq.kernels.w4a16_cuda import (
    HELPERS,
    W4_KERNEL,
    CudaGemvConfig,
    NvrtcKernel,
    compile_variant,
    cuda_gemv_supported,
    gemv_defines,
)

NORM_EPILOGUE = r"""
#ifndef NORM_VECS
#define NORM_VECS 4  // 8-value vectors of h each thread of the last block keeps in registers (N <= 8192 at 8 warps)
#endif

__device__ __forceinline__ uint4 load_l2(const uint4* p) {  // past L1, which is not coherent across SMs
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ float round_to_dtype(float f) { return half_bits_to_float(float_to_out_bits(f)); }

// Each row's sum as write_rows makes it (same shuffle tree, bias in fp32), rounded to the dtype (the GEMV's output),
// plus the residual in fp32, rounded again (the separate add): h[row], the new residual.
__device__ __forceinline__ void add_rows(float (&acc)[BM][ROWS], const unsigned short* __restrict__ bias,
                                         const unsigned short* __restrict__ residual, unsigned short* __restrict__ h,
                                         int N, int row0, int lane) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float v = acc[0][r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        const int row = row0 + r;
        if (lane == 0 && row < N) {
#if HAS_BIAS
            v += half_bits_to_float(bias[row]);
#endif
            h[row] = float_to_out_bits(round_to_dtype(v) + half_bits_to_float(residual[row]));
        }
    }
}

__device__ __forceinline__ float sum_squares(uint4 v, float s) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const float lo = half_bits_to_float(w[t] & 0xFFFFu), hi = half_bits_to_float(w[t] >> 16);
        s = fmaf(lo, lo, s);
        s = fmaf(hi, hi, s);
    }
    return s;
}

// round(round(h * rstd) * weight) for 8 values: the norm rounds to the dtype before the weight, as RMSNorm does
__device__ __forceinline__ uint4 scale_vec(uint4 hv, uint4 wv, float rstd) {
    const unsigned int h[4] = {hv.x, hv.y, hv.z, hv.w}, g[4] = {wv.x, wv.y, wv.z, wv.w};
    unsigned int o[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const float lo = round_to_dtype(half_bits_to_float(h[t] & 0xFFFFu) * rstd) * half_bits_to_float(g[t] & 0xFFFFu);
        const float hi = round_to_dtype(half_bits_to_float(h[t] >> 16) * rstd) * half_bits_to_float(g[t] >> 16);
        o[t] = (unsigned int)float_to_out_bits(lo) | ((unsigned int)float_to_out_bits(hi) << 16);
    }
    uint4 out;
    out.x = o[0];
    out.y = o[1];
    out.z = o[2];
    out.w = o[3];
    return out;
}

// True in the block that finishes last: threadFenceReduction's test in its sm_70+ form (cooperative groups' grid
// sync does the same: a barrier, then one atomic per block at gpu scope). Thread 0's ticket releases the block's h
// stores and, in the last block, acquires every other block's; that block resets the counter (every block has drawn)
// for the next launch or graph replay.
__device__ __forceinline__ bool last_block(int* counter) {
    __shared__ int last;
    __syncthreads();  // the block's h stores before thread 0's release
    if (threadIdx.x == 0) {
        int ticket;
        asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(ticket) : "l"(counter) : "memory");
        last = ticket == (int)gridDim.x - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

// The last block: rstd = 1 / sqrt(mean(h^2) + eps) over the whole row (N % 8 == 0), then normed. h, weight and normed
// 16-byte aligned.
__device__ __forceinline__ void norm_row(const unsigned short* h, const unsigned short* __restrict__ weight,
                                         unsigned short* __restrict__ normed, int N, float eps) {
    __shared__ float partial[WARPS];
    const int tid = threadIdx.x, nvec = N >> 3, step = WARPS * 32;
    const uint4* h4 = reinterpret_cast<const uint4*>(h);
    const uint4* w4 = reinterpret_cast<const uint4*>(weight);
    uint4* o4 = reinterpret_cast<uint4*>(normed);
    uint4 hv[NORM_VECS], wv[NORM_VECS];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_VECS; ++i)  // all loads in flight before any arithmetic
        if (tid + i * step < nvec) {
            hv[i] = load_l2(h4 + tid + i * step);
            wv[i] = __ldg(w4 + tid + i * step);
        }
    for (int v = tid + NORM_VECS * step; v < nvec; v += step) ss = sum_squares(load_l2(h4 + v), ss);  // wide rows
#pragma unroll
    for (int i = 0; i < NORM_VECS; ++i)
        if (tid + i * step < nvec) ss = sum_squares(hv[i], ss);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    if ((tid & 31) == 0) partial[tid >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += partial[w];
    const float rstd = 1.f / sqrtf(total / (float)N + eps);
#pragma unroll
    for (int i = 0; i < NORM_VECS; ++i)
        if (tid + i * step < nvec) o4[tid + i * step] = scale_vec(hv[i], wv[i], rstd);
    for (int v = tid + NORM_VECS * step; v < nvec; v += step) o4[v] = scale_vec(load_l2(h4 + v), __ldg(w4 + v), rstd);
}

#if BM != 1
#error "the add + RMSNorm epilogue takes one x row"
#endif
__device__ __forceinline__ void add_norm(float (&acc)[BM][ROWS], const unsigned short* __restrict__ bias,
                                         const unsigned short* __restrict__ residual,
                                         const unsigned short* __restrict__ weight, unsigned short* h,
                                         unsigned short* __restrict__ normed, int* counter, int N, int row0, int lane,
                                         float eps) {
    add_rows(acc, bias, residual, h, N, row0, lane);
    if (last_block(counter)) norm_row(h, weight, normed, N, eps);
}
"""
SOURCE = HELPERS + NORM_EPILOGUE + W4_KERNEL  # the GEMV's ADD_NORM = 1 variant (w4a16_cuda._SOURCE is its 0)


@functools.cache
def _compiled(cfg: CudaGemvConfig, x_bf16: bool, s_bf16: bool, has_bias: bool) -> NvrtcKernel | None:
    """The ADD_NORM variant for one configuration (M = 1), compiled once for the current device (None: the
    caller runs the GEMV and the separate add + RMSNorm)."""
    defines = gemv_defines(cfg, 1, x_bf16, s_bf16, has_bias) | {"ADD_NORM": 1}
    return compile_variant(SOURCE, "w4a16_gemv", defines, "the GEMV and a separate add + RMSNorm")


def _aligned(t: Tensor) -> Tensor:
    """t contiguous on a 16-byte boundary (the epilogue moves 8 values per load)."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def w4a16_gemv_cuda_add_norm(x2d: Tensor, qweight_t: Tensor, scale_zero: Tensor, group_size: int, s_bf16: bool,
                             bias: Tensor | None, config: CudaGemvConfig, residual: Tensor, norm_weight: Tensor,
                             eps: float, counter: Tensor) -> tuple[Tensor, Tensor] | None:
    """(normed, h), each (1, N): h = x2d @ W^T + bias + residual (rounded as y then the add round) and normed =
    rms_norm(h) * norm_weight, for x2d (1, K) with unit stride along K, residual (1, N), N % 8 == 0; counter an
    int32 tensor whose first element is 0 (left 0). None where the kernel could not compile."""
    n, k = qweight_t.shape[0], x2d.shape[1]
    kernel = _compiled(config, x2d.dtype == torch.bfloat16, s_bf16, bias is not None)
    if kernel is None:
        return None
    if x2d.stride(0) % 8 or x2d.data_ptr() % 16:  # as w4a16_gemv_cuda: the row starts on 16 bytes
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    h = torch.empty(1, n, dtype=x2d.dtype, device=x2d.device)  # the new residual
    normed = torch.empty_like(h)
    b = h if bias is None else bias.to(x2d.dtype)
    kernel(-(-n // (config.rows * config.warps)), 32 * config.warps,
           [x2d, qweight_t, scale_zero, b, h, 1, n, k, group_size, x2d.stride(0), residual.contiguous(),
            _aligned(norm_weight), normed, counter, float(eps)])
    return normed, h


def fold_config(x: Tensor, w: W4Weight, bias: Tensor | None, residual: Tensor, norm_weight: Tensor,
                silu: bool = False) -> CudaGemvConfig | None:
    """The NVRTC GEMV launch that takes the add + RMSNorm after this layer for x (..., K) (silu: x is [gate | up],
    (..., 2K)), or None where the fold does not run: not one token on a GPU with NVRTC (cuda_gemv_supported), not
    what the card's table takes for this (K, N) at M = 1 (w4a16.choose), or shapes and dtypes the epilogue does not
    take."""
    width = 2 * w.k if silu else w.k
    if x.numel() != width or x.shape[-1] != width or residual.numel() != w.n or w.n % 8:
        return None
    if norm_weight.shape != (w.n,) or residual.dtype != x.dtype or norm_weight.dtype != x.dtype:
        return None
    if not (residual.is_cuda and norm_weight.is_cuda and triton_supports(x, w, bias)
            and cuda_gemv_supported(x, w.group_size)):
        return None
    if torch.is_grad_enabled() and residual.requires_grad:  # the kernel has no backward
        return None
    kind, config = choose(1, w.k, w.n, x.device)
    return config if kind == "cuda" else None


def w4a16_add_norm(x: Tensor, w: W4Weight, bias: Tensor | None, residual: Tensor, norm_weight: Tensor, eps: float,
                   config: CudaGemvConfig) -> tuple[Tensor, Tensor] | None:
    """(rms_norm(h) * norm_weight, h), shaped as residual, for h = x @ W^T + bias + residual, on the launch
    fold_config gave; None where the kernel could not compile here. The blocks' ticket counter is the layer's
    first split-K counter (W4Weight.locks): every kernel that uses them leaves them zero, and one stream runs
    them one after another."""
    x2d = x.reshape(1, w.k)  # (1, K)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    out = w4a16_gemv_cuda_add_norm(x2d, w.qweight_t, w.scale_zero, w.group_size, w.scale_dtype == torch.bfloat16,
                                   bias, config, residual.reshape(1, w.n), norm_weight, eps, w.locks)
    if out is None:
        return None
    normed, h = out
    return normed.view(residual.shape), h.view(residual.shape)
