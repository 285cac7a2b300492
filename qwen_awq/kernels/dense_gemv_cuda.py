"""CUDA C++ GEMV for fp16/bf16 weights at M = 1..4 (the unquantized model's decode), compiled at run time by NVRTC.

cuBLAS reaches ~88% of copy bandwidth at M = 1 on (4096, 22016) but 56-72% on Qwen-7B's narrower shapes (H200,
bench/results/gemv_cuda_H200_2026-12-03.md); this kernel streams a warp's ROWS rows (lane l reads 16-byte chunks
l, l + 32, ... of each, U per row before any arithmetic), converts x once for those rows and accumulates in fp32.
Used only where a card's measured table says it wins (w4a16_tuned.DENSE_GEMV); everywhere else F.linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from qwen_awq.kernels.w4a16_cuda import HELPERS, CudaGemvConfig, NvrtcKernel, compile_variant, nvrtc_enabled
from qwen_awq.kernels.w4a16_tuned import DENSE_GEMV

_SOURCE = HELPERS + r"""
extern "C" __global__ void __launch_bounds__(WARPS * 32) KERNEL_NAME(
    const unsigned short* __restrict__ x, const uint4* __restrict__ w, const unsigned short* __restrict__ bias,
    unsigned short* __restrict__ out, int M, int N, int K, int stride_x) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
    if (row0 >= N) return;
    const int chunks = K >> 3;  // 8 weights per 16-byte chunk
    float acc[BM][ROWS];
#pragma unroll
    for (int m = 0; m < BM; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint4 wv[U][ROWS];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = min(c0 + 32 * u, chunks - 1);  // past K: re-read the last chunk, skipped below
#pragma unroll
            for (int r = 0; r < ROWS; ++r) wv[u][r] = load_stream(w + (size_t)min(row0 + r, N - 1) * chunks + c);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
#pragma unroll
                for (int m = 0; m < BM; ++m) {
                    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)min(m, M - 1) * stride_x) + c);
                    const unsigned int xw[4] = {xv.x, xv.y, xv.z, xv.w};
                    float xf[8];
#pragma unroll
                    for (int t = 0; t < 4; ++t) {
                        xf[2 * t] = half_bits_to_float(xw[t] & 0xFFFFu);
                        xf[2 * t + 1] = half_bits_to_float(xw[t] >> 16);
                    }
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const unsigned int ww[4] = {wv[u][r].x, wv[u][r].y, wv[u][r].z, wv[u][r].w};
                        float a = acc[m][r];
#pragma unroll
                        for (int t = 0; t < 4; ++t) {
                            a = fmaf(half_bits_to_float(ww[t] & 0xFFFFu), xf[2 * t], a);
                            a = fmaf(half_bits_to_float(ww[t] >> 16), xf[2 * t + 1], a);
                        }
                        acc[m][r] = a;
                    }
                }
            }
        }
    }
    write_rows(acc, bias, out, M, N, row0, lane);
}
"""


@functools.cache
def _compiled(cfg: CudaGemvConfig, bm: int, bf16: bool, has_bias: bool) -> NvrtcKernel | None:
    """The kernel for one configuration, compiled once for the current device; None where NVRTC fails."""
    defines = {"ROWS": cfg.rows, "U": cfg.unroll, "WARPS": cfg.warps, "BM": bm, "XBF16": int(bf16),
               "SBF16": int(bf16), "HAS_BIAS": int(has_bias)}
    return compile_variant(_SOURCE, "dense_gemv", defines, "cuBLAS")


def dense_gemv(x2d: Tensor, weight: Tensor, bias: Tensor | None, config: CudaGemvConfig) -> Tensor | None:
    """y (M, N) = x2d (M, K) @ weight (N, K)^T + bias on the NVRTC kernel, or None where it cannot run."""
    m, k = x2d.shape
    n = weight.shape[0]
    if (k % 8 or x2d.stride(-1) != 1 or x2d.stride(0) % 8 or x2d.data_ptr() % 16 or not weight.is_contiguous()
            or weight.data_ptr() % 16 or weight.dtype != x2d.dtype):
        return None
    kernel = _compiled(config, m, x2d.dtype == torch.bfloat16, bias is not None)
    if kernel is None:
        return None
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    kernel(-(-n // (config.rows * config.warps)), 32 * config.warps,
           [x2d, weight, out if bias is None else bias.to(x2d.dtype), out, m, n, k, x2d.stride(0)])
    return out


@functools.cache
def _choice(k: int, n: int, device_index: int) -> CudaGemvConfig | None:
    entry = DENSE_GEMV.get(torch.cuda.get_device_name(device_index), {}).get((k, n))
    return None if entry is None else CudaGemvConfig(**entry)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, except at M <= 4 on a card and shape where the NVRTC GEMV measured faster (DENSE_GEMV)."""
    m = x.numel() // max(x.shape[-1], 1)
    if nvrtc_enabled(x) and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        cfg = _choice(weight.shape[1], weight.shape[0], x.device.index or 0)
        y = None if cfg is None else dense_gemv(x.reshape(m, x.shape[-1]), weight, bias, cfg)
        if y is not None:
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
