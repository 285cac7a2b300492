"""CUDA C++ W4A16 GEMV for decode (M = 1..4) on the repacked layout, compiled at run time by NVRTC.

Why beside the Triton GEMV: that one holds a K range of x in registers and streams rows past it, which Triton 3.6
compiles to ~168 registers (17% occupancy, latency-bound at ~41% of copy bandwidth on the H200). Here a warp owns
ROWS whole output rows: lane l reads 16-byte chunks (32 k) l, l + 32, ... of each row, U chunks per row issued
before any arithmetic, so the loads of every resident warp are in flight at once; x comes from L1 and is
converted once for the warp's rows; one shuffle tree per row at the end, no split-K, no partials. The arithmetic
is the Triton GEMV's (w4a16_gemv.py): a nibble pair per shift, one lop3 per nibble into fp32 256 + q or 16 + q,
one FFMA, and per 32-k chunk s * (dot - sum C_k x_k - z * sum x_k). No headers: 16-bit floats move as bits.
On the H200 the two designs end close (64.7 vs 60.1 us over Qwen-7B's four shapes; this one wins or ties the two
with 4096 rows), both near what one kernel per matrix allows (bench/results/gemv_cuda_H200_2026-12-03.md), so the
per-card table picks per shape. The compiled kernels run where torch.cuda._compile_kernel exists (PyTorch >= 2.8
with NVRTC); elsewhere, and when compiling fails, w4a16.py keeps the Triton GEMV. Reference and CPU path:
reference.w4a16_matmul_reference.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError

MAX_M = 4  # x rows per launch: each adds 32 fp32 registers per lane (its converted chunk)

CONVERSIONS = r"""
#define LOP(v, mask, magic) __uint_as_float(((v) & (mask)) | (magic))

__device__ __forceinline__ float fp16_bits_to_float(unsigned int h) {  // the low 16 bits of h
    float f;
    unsigned short s = (unsigned short)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
    return f;
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned int h) { return __uint_as_float(h << 16); }

// x, bias and out in XBF16's dtype; scales and zeros in SBF16's
#if XBF16
#define half_bits_to_float bf16_bits_to_float
#else
#define half_bits_to_float fp16_bits_to_float
#endif
#if SBF16
#define scale_bits_to_float bf16_bits_to_float
#else
#define scale_bits_to_float fp16_bits_to_float
#endif

__device__ __forceinline__ unsigned short float_to_out_bits(float f) {
    unsigned short h;
#if XBF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // weights: read once, keep L1 for x
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
"""

WRITE_ROWS = r"""
// Each x row's ROWS sums: one shuffle tree per value, lane 0 adds the bias and stores out's dtype.
__device__ __forceinline__ void write_rows(float (&acc)[BM][ROWS], const unsigned short* __restrict__ bias,
                                           unsigned short* __restrict__ out, int M, int N, int row0, int lane) {
#pragma unroll
    for (int m = 0; m < BM; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[m][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
            const int row = row0 + r;
            if (lane == 0 && row < N && m < M) {
#if HAS_BIAS
                v += half_bits_to_float(bias[row]);
#endif
                out[(size_t)m * N + row] = float_to_out_bits(v);
            }
        }
}
"""
HELPERS = CONVERSIONS + WRITE_ROWS  # what the GEMVs share: 16-bit conversions, streaming loads, the row sums

W4_KERNEL = r"""
#ifndef PROBE
#define PROBE 0  // bench/gemv_probe.py: 1 replaces the arithmetic by an xor of the words, 2 by fp16x2 math
#endif

// x at k = 32c .. 32c + 31 as fp32, and the chunk's sums: sum_k C_k x_k (C = 256 for k % 8 in {0, 1, 4, 5}, the
// slots read as 256 + q; 16 for {2, 3, 6, 7}) and sum_k x_k.
__device__ __forceinline__ void x_chunk(const unsigned short* __restrict__ xrow, int c, float* xf, float& csum,
                                        float& xsum) {
    const uint4* p = reinterpret_cast<const uint4*>(xrow + 32 * c);
    float c256 = 0.f, c16 = 0.f;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        uint4 u = __ldg(p + v);
        unsigned int words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {  // word t of vector v holds k = 8v + 2t, 8v + 2t + 1
            float lo = half_bits_to_float(words[t] & 0xFFFFu), hi = half_bits_to_float(words[t] >> 16);
            xf[8 * v + 2 * t] = lo;
            xf[8 * v + 2 * t + 1] = hi;
            if (t % 2 == 0) c256 += lo + hi; else c16 += lo + hi;
        }
    }
    csum = 256.f * c256 + 16.f * c16;
    xsum = c256 + c16;
}

// sum_k x_k (C_k + q_k) over one 16-byte chunk: word j's bits 8p..8p+7 hold slots 2p, 2p + 1 (k offsets
// (0, 2), (4, 6), (1, 3), (5, 7) for p = 0..3, the AWQ order), moved to bits 15..22 by one shift.
__device__ __forceinline__ float chunk_dot(uint4 w, const float* xf, float acc) {
    const unsigned int m_even = 0x78000u, m_odd = 0x780000u, f256 = 0x43800000u, f16 = 0x41800000u;
    unsigned int words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned int q = words[j];
        const float* xj = xf + 8 * j;
        unsigned int v = q << 15;
        acc = fmaf(LOP(v, m_even, f256), xj[0], acc);
        acc = fmaf(LOP(v, m_odd, f16), xj[2], acc);
        v = q << 7;
        acc = fmaf(LOP(v, m_even, f256), xj[4], acc);
        acc = fmaf(LOP(v, m_odd, f16), xj[6], acc);
        v = q >> 1;
        acc = fmaf(LOP(v, m_even, f256), xj[1], acc);
        acc = fmaf(LOP(v, m_odd, f16), xj[3], acc);
        v = q >> 9;
        acc = fmaf(LOP(v, m_even, f256), xj[5], acc);
        acc = fmaf(LOP(v, m_odd, f16), xj[7], acc);
    }
    return acc;
}


extern "C" __global__ void __launch_bounds__(WARPS * 32) KERNEL_NAME(
    const unsigned short* __restrict__ x, const uint4* __restrict__ qw, const unsigned int* __restrict__ sz,
    const unsigned short* __restrict__ bias, unsigned short* __restrict__ out, int M, int N, int K, int G,
    int stride_x) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
    if (row0 >= N) return;
    const int chunks = K >> 5, groups = K / G, chunks_per_group = G >> 5;
    float acc[BM][ROWS];
#pragma unroll
    for (int m = 0; m < BM; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint4 w[U][ROWS];
        unsigned int s[U][ROWS];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // every load of this step before any arithmetic
            const int c = min(c0 + 32 * u, chunks - 1);  // past K: re-read the last chunk, weighted by 0 below
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int row = min(row0 + r, N - 1);
                w[u][r] = load_stream(qw + (size_t)row * chunks + c);
                s[u][r] = __ldg(sz + (size_t)row * groups + c / chunks_per_group);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
#pragma unroll
                for (int m = 0; m < BM; ++m) {
#if PROBE == 1
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
                        acc[m][r] += __uint_as_float((w[u][r].x ^ w[u][r].y ^ w[u][r].z ^ s[u][r]) & 0x3FFFFFFFu);
                    continue;
#elif PROBE == 2
                    half2_rows(x + (size_t)m * stride_x, c, w[u], s[u], acc[m]);
                    continue;
#endif
                    float xf[32], csum, xsum;
                    x_chunk(x + (size_t)min(m, M - 1) * stride_x, c, xf, csum, xsum);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const float sc = scale_bits_to_float(s[u][r] & 0xFFFFu);
                        const float zp = scale_bits_to_float(s[u][r] >> 16);
                        const float dot = chunk_dot(w[u][r], xf, -csum);
                        acc[m][r] = fmaf(sc, dot - zp * xsum, acc[m][r]);
                    }
                }
            }
        }
    }
    write_rows(acc, bias, out, M, N, row0, lane);
}
"""
_SOURCE = HELPERS + W4_KERNEL


@functools.cache
def _cu_launch():
    """The driver's cuLaunchKernel, looked up once (torch's launcher reopens libcuda on every call: ~74 us a
    launch on the H200's host against cuBLAS's 16, bench/results/gemv_cuda_H200_2026-12-03.md)."""
    try:
        return ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    except OSError:  # not Linux, or no driver library by that name: torch's own launcher then
        return None


class NvrtcKernel:
    """One kernel compiled by NVRTC (torch.cuda._compile_kernel) and launched on torch's current stream, so that
    CUDA graphs capture it; args are tensors (their data pointers), Python ints (C ints) and floats (C floats)."""

    def __init__(self, source: str, name: str) -> None:
        self.kernel = torch.cuda._compile_kernel(source, name)
        self.launch = _cu_launch() if hasattr(self.kernel, "func") else None

    def __call__(self, grid: int | tuple[int, int, int], block: int, args: list) -> None:
        grid3 = (grid, 1, 1) if isinstance(grid, int) else grid
        if self.launch is None:
            self.kernel(grid=grid3, block=(block, 1, 1), args=args)
            return
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor)
                  else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a) for a in args]
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        err = self.launch(self.kernel.func, *grid3, block, 1, 1, 0, stream, params, None)
        if err:
            raise RuntimeError(f"cuLaunchKernel failed with CUDA error {err}")


@dataclass(frozen=True)
class CudaGemvConfig:
    """A warp's output rows, the 16-byte chunks per row each lane loads before computing, warps per block."""

    rows: int = 2
    unroll: int = 4
    warps: int = 4

    def __post_init__(self) -> None:
        check_small_pow2(self, ("rows", "unroll", "warps"))


def check_small_pow2(config: object, names: tuple[str, ...]) -> None:
    """ConfigError unless each named field of a launch config is a power of two in 1..16."""
    for name in names:
        value = getattr(config, name)
        if value <= 0 or value & (value - 1) or value > 16:
            raise ConfigError(f"{type(config).__name__}.{name} must be a power of two in 1..16, found {value}")


def compile_variant(source: str, prefix: str, defines: dict[str, int], fallback: str) -> NvrtcKernel | None:
    """Kernel `source` specialised by `defines` (each a #define; the name spells them), or None where NVRTC
    cannot compile it here (one warning naming the fallback)."""
    name = prefix + "".join(f"_{key.lower()}{value}" for key, value in defines.items())
    header = "".join(f"#define {key} {value}\n" for key, value in {"KERNEL_NAME": name, **defines}.items())
    try:
        return NvrtcKernel(header + source, name)
    except (RuntimeError, OSError, AttributeError) as err:
        warnings.warn(f"qwen-awq: the CUDA kernel {name} did not compile ({str(err)[:300]}); using {fallback}",
                      stacklevel=4)
        return None


@functools.cache
def _compiled(cfg: CudaGemvConfig, bm: int, x_bf16: bool, s_bf16: bool, has_bias: bool) -> NvrtcKernel | None:
    """The W4A16 kernel for one configuration, compiled once for the current device (None: w4a16.py keeps
    Triton's GEMV)."""
    defines = {"ROWS": cfg.rows, "U": cfg.unroll, "WARPS": cfg.warps, "BM": bm, "XBF16": int(x_bf16),
               "SBF16": int(s_bf16), "HAS_BIAS": int(has_bias)}
    return compile_variant(_SOURCE, "w4a16_gemv", defines, "Triton's GEMV")


@functools.cache
def nvrtc_device_capable(index: int) -> bool:
    """Whether CUDA device `index` can run the NVRTC kernels: sm_80+ and torch.cuda._compile_kernel present."""
    return hasattr(torch.cuda, "_compile_kernel") and torch.cuda.get_device_capability(index) >= (8, 0)


def nvrtc_enabled(x: Tensor) -> bool:
    """Whether the NVRTC GEMVs may take x: CUDA, fp16/bf16, 1..MAX_M rows, sm_80+ with NVRTC in torch
    (QWEN_AWQ_CUDA_KERNELS=0 turns them off)."""
    m = x.numel() // max(x.shape[-1], 1)
    return (
        x.is_cuda and 1 <= m <= MAX_M and x.dtype in (torch.float16, torch.bfloat16)
        and os.environ.get("QWEN_AWQ_CUDA_KERNELS", "1") != "0" and nvrtc_device_capable(x.device.index or 0)
    )


def cuda_gemv_supported(x: Tensor, group_size: int) -> bool:
    """Whether the NVRTC W4A16 GEMV can take x (nvrtc_enabled) with this group size."""
    return group_size % 32 == 0 and nvrtc_enabled(x)


def w4a16_gemv_cuda(x2d: Tensor, qweight_t: Tensor, scale_zero: Tensor, group_size: int, s_bf16: bool,
                    bias: Tensor | None, config: CudaGemvConfig) -> Tensor | None:
    """y (M, N) for x2d (M, K) with unit stride along K, or None where the kernel could not compile."""
    m, k = x2d.shape
    n = qweight_t.shape[0]
    kernel = _compiled(config, m, x2d.dtype == torch.bfloat16, s_bf16, bias is not None)
    if kernel is None:
        return None
    if x2d.stride(0) % 8 or x2d.data_ptr() % 16:  # rows must start on 16 bytes (K % 32 == 0 holds by the groups)
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    b = out if bias is None else bias.to(x2d.dtype)
    kernel(-(-n // (config.rows * config.warps)), 32 * config.warps,
           [x2d, qweight_t, scale_zero, b, out, m, n, k, group_size, x2d.stride(0)])
    return out
