"""The residual add + RMSNorm in the prologue of the CUDA tensor-core W4A16 kernel (w4a16_cuda_mma.py), for one
token: every block adds the residual and normalises the row into shared memory, rounding where kernels/rms_norm.py
rounds, while its first weight loads are prefetched to L2; block 0 writes the new residual. The kernel then reads
its B operand (x) from shared memory. Used by kernels/w4a16.w4a16_norm_matmul (off unless QWEN_AWQ_NORM_PROLOGUE=1);
tested on the GPU against a float64 oracle (tests/test_w4a16_kernels.py, cudanorm cases).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qwen_awq.kernels.w4a16_cuda_mma import SHARED_BYTES, CudaMmaConfig, compile_mma, scale_after

NORM_PROLOGUE = r"""
static_assert(NT == 1 && !XPERM, "the RMSNorm prologue takes one x row, unpermuted");
#define NORM_THREADS (WN * WK * 32)
#define NORM_V ((NORM_K / 8 + NORM_THREADS - 1) / NORM_THREADS)  // 16-byte vectors of x per thread

// The block's copy of one x row normalised as kernels/rms_norm.py does (h = x + resid rounded to x's dtype; rstd =
// 1 / sqrt(mean(h^2) + eps) in fp32; round(round(h * rstd) * nw)), into shared memory; block 0 also writes h to
// new_res. The first weight loads go to L2 first (prefetch), so that the DRAM round trip overlaps this one.
__device__ __forceinline__ void rms_norm_prologue(
    const unsigned short* __restrict__ x, const unsigned short* __restrict__ resid,
    const unsigned short* __restrict__ nw, unsigned short* __restrict__ new_res, float eps, unsigned short* xn,
    const uint4* const (&wrow)[RB][2], int wk, int steps, int kchunks, int t) {
    __shared__ float ssq[WN * WK];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = min(min(wk + WK * u, steps - 1) * 4 + t, kchunks - 1);
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) asm volatile("prefetch.global.L2 [%0];" :: "l"(wrow[r][h] + c));
    }
    uint4 hv[NORM_V], wv[NORM_V];
#if HAS_RES
    uint4 rv[NORM_V];
#endif
#pragma unroll
    for (int i = 0; i < NORM_V; ++i) {  // every load before any arithmetic
        const int v = min((int)threadIdx.x + i * NORM_THREADS, NORM_K / 8 - 1);
        hv[i] = __ldg(reinterpret_cast<const uint4*>(x) + v);
        wv[i] = __ldg(reinterpret_cast<const uint4*>(nw) + v);
#if HAS_RES
        rv[i] = __ldg(reinterpret_cast<const uint4*>(resid) + v);
#endif
    }
    float local = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_V; ++i) {
        const int v = threadIdx.x + i * NORM_THREADS;
        unsigned int* hw = &hv[i].x;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#if HAS_RES
            const unsigned int rw = (&rv[i].x)[j];
            const float lo = half_bits_to_float(hw[j] & 0xFFFFu) + half_bits_to_float(rw & 0xFFFFu);
            const float hi = half_bits_to_float(hw[j] >> 16) + half_bits_to_float(rw >> 16);
            hw[j] = float_to_out_bits(lo) | ((unsigned int)float_to_out_bits(hi) << 16);
#endif
            const float a = half_bits_to_float(hw[j] & 0xFFFFu), b = half_bits_to_float(hw[j] >> 16);
            if (v < NORM_K / 8) local = fmaf(b, b, fmaf(a, a, local));
        }
#if HAS_RES
        if (blockIdx.x == 0 && v < NORM_K / 8) reinterpret_cast<uint4*>(new_res)[v] = hv[i];
#endif
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(0xFFFFFFFFu, local, o);
    if ((threadIdx.x & 31) == 0) ssq[threadIdx.x >> 5] = local;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < WN * WK; ++i) total += ssq[i];
    const float rstd = 1.f / sqrtf(total / (float)NORM_K + eps);
#pragma unroll
    for (int i = 0; i < NORM_V; ++i) {
        const int v = threadIdx.x + i * NORM_THREADS;
        if (v >= NORM_K / 8) break;
        uint4 o;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned int hw = (&hv[i].x)[j], ww = (&wv[i].x)[j];
            const float lo = half_bits_to_float(float_to_out_bits(half_bits_to_float(hw & 0xFFFFu) * rstd));
            const float hi = half_bits_to_float(float_to_out_bits(half_bits_to_float(hw >> 16) * rstd));
            (&o.x)[j] = float_to_out_bits(lo * half_bits_to_float(ww & 0xFFFFu))
                        | ((unsigned int)float_to_out_bits(hi * half_bits_to_float(ww >> 16)) << 16);
        }
        reinterpret_cast<uint4*>(xn)[v] = o;
    }
    __syncthreads();
}
"""


def norm_prologue_fits(k: int, config: CudaMmaConfig) -> bool:
    """Whether one normalised x row of k (shared memory, 2 bytes a feature) fits beside the config's reduction."""
    return k % 8 == 0 and 2 * k + config.reduce_bytes(1) <= SHARED_BYTES


def w4a16_norm_mma_cuda(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, qweight_t: Tensor,
                        scale_zero: Tensor, group_size: int, s_bf16: bool, bias: Tensor | None,
                        config: CudaMmaConfig) -> tuple[Tensor, Tensor] | None:
    """(y (1, N), h (1, K)) for one x row (1, K): h = x + residual (x itself without one), y = (rms_norm(h) *
    weight) @ W^T + bias, the norm in the kernel's prologue (kernels/rms_norm.py's rounding); None where the
    kernel could not compile. The caller checks norm_prologue_fits."""
    k, n = x.shape[-1], qweight_t.shape[0]
    config = dataclasses.replace(config, xperm=False)  # the prologue writes x in the kernel's own order
    kernel = compile_mma(config, 1, x.dtype == torch.bfloat16, s_bf16, bias is not None,
                         scale_after(config, group_size), NORM_PROLOGUE,
                         (("NORM", 1), ("NORM_K", k), ("HAS_RES", int(residual is not None))))
    if kernel is None:
        return None
    x, weight = x.reshape(1, k).contiguous(), weight.contiguous()
    res = None if residual is None else residual.reshape(1, k).contiguous()
    if any(t.data_ptr() % 16 for t in (x, weight) + (() if res is None else (res,))):
        x, weight, res = x.clone(), weight.clone(), None if res is None else res.clone()  # 16-byte vectors
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    h = x if res is None else torch.empty_like(x)
    b = out if bias is None else bias.to(x.dtype)
    kernel(-(-n // config.rows), 32 * config.wn * config.wk,
           [x, qweight_t, scale_zero, b, out, 1, n, k, group_size, k, x if res is None else res, weight, h,
            float(eps)])
    return out, h
