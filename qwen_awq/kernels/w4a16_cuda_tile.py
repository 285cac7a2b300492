"""CUDA C++ tensor-core W4A16 matmul for batches of 16..256 rows on the repacked layout, x shared through shared memory.

Why beside w4a16_cuda_mma.py: that kernel's warps each read the whole of x from L1/L2 for their 16 rows, so its
x traffic and registers grow with M (MAX_M 64, 1.1-1.35x cuBLAS at M = 32; Triton's 0.62-0.70x at M = 128 on the
H200). Here a block's warps (WN over rows, WK over K) share one x tile of 8 NT tokens x 128 k per step, staged by
cp.async into shared memory STAGES steps ahead (a 16-byte chunk XOR-swizzled by its row so the lanes' 16-byte reads
are conflict-free); each thread also stages its own weight words and scales the same way, so the weights need no
barrier and are in flight STAGES - 1 steps ahead. The MMA mapping and the dequantization are w4a16_cuda_mma's:
lane (g, t) takes chunk t (k = 32t .. 32t + 31) of rows g and g + 8 of each 16-row block, mma.sync.m16n8k16's k
slots follow the nibble pairs, and x follows the same k. Grid (M tiles, N blocks): the M tiles of one N block run
side by side, so its weights come from L2 after the first. K % 128 == 0 (Qwen-7B's 4096 and 11008); others take
the kernels beside it. Reference and CPU path: reference.w4a16_matmul_reference.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.w4a16_cuda import CONVERSIONS, NvrtcKernel, check_small_pow2, compile_variant, nvrtc_enabled
from qwen_awq.kernels.w4a16_cuda_mma import MMA_HELPERS

MAX_M = 512  # beyond, dequantize + cuBLAS (w4a16.DENSE_MIN_M decides first)
STEP_K = 128  # k per step: one 16-byte chunk of each row per lane t
SMEM_OPTIN = 227 * 1024  # sm_90's shared memory per block with the opt-in (sm_80: 163 KB; checked at launch)

TILE_KERNEL = r"""
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2)); }
__device__ __forceinline__ void group_sync(int wk) {  // the WN warps sharing one x tile
#if WK == 1
    __syncthreads();
#else
    asm volatile("bar.sync %0, %1;" :: "r"(wk + 1), "r"(WN * 32));
#endif
}

// x tile: 8 NT token rows x 16 chunks of 16 bytes; chunk c of row r sits at c ^ (bit 3 of c -> bit 1, r -> bit 0),
// so the 8 lanes of each quarter-warp (rows g, g + 1 of a pair; t = 0..3) hit 8 different bank groups.
__device__ __forceinline__ int swz(int r, int c) { return r * 16 + (c ^ (((c >> 3) & 1) << 1) ^ (r & 1)); }

#define XT (8 * NT * 16)              // uint4 per x tile
#define WT (WN * WK * RB * 2 * 32)    // uint4 (and scale words) per weight stage

#define XC ((XT + WN * 32 - 1) / (WN * 32))  // x chunks each thread of a group copies per step

// Stage step `st` of this thread: its weight chunks and scales, and its share of the group's x tile (xo: the
// chunks' offsets in x at step 0, -1 past the tile).
__device__ __forceinline__ void stage_in(uint4* xs, uint4* ws, unsigned int* ss, const unsigned short* __restrict__ x,
                                         const uint4* const (&wrow)[RB][2], const unsigned int* const (&srow)[RB][2],
                                         const int (&xo)[XC], int st, int gt, int lane, int warp, int G) {
    const int c = st * 4 + (lane & 3);
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int slot = ((warp * RB + r) * 2 + h) * 32 + lane;
            cp16(ws + slot, wrow[r][h] + c);
            cp4(ss + slot, srow[r][h] + (32 * c) / G);
        }
#pragma unroll
    for (int q = 0; q < XC; ++q) {
        const int idx = gt + q * WN * 32;
        if (XT % (WN * 32) == 0 || idx < XT) cp16(xs + swz(idx >> 4, idx & 15), x + xo[q] + st * STEP);
    }
}

extern "C" __global__ void __launch_bounds__(WN * WK * 32) KERNEL_NAME(
    const unsigned short* __restrict__ x, const uint4* __restrict__ qw, const unsigned int* __restrict__ sz,
    const unsigned short* __restrict__ bias, unsigned short* __restrict__ out, int M, int N, int K, int G,
    int stride_x) {
    extern __shared__ uint4 smem[];  // [STAGES][WK x tiles | weights WT | scales WT words]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wn = warp % WN, wk = warp / WN, gt = wn * 32 + lane;
    const int tok0 = blockIdx.x * 8 * NT;
    const int row_base = (blockIdx.y * WN + wn) * RB * 16;
    const int steps = K / STEP, kchunks = K >> 5, groups = K / G;
    const int mine = (steps - wk + WK - 1) / WK;  // this warp's steps: wk, wk + WK, ...
    const int stage_u4 = WK * XT + WT + WT / 4;
    const uint4* wrow[RB][2];
    const unsigned int* srow[RB][2];
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = min(row_base + 16 * r + 8 * h + g, N - 1);
            wrow[r][h] = qw + (size_t)row * kchunks;
            srow[r][h] = sz + (size_t)row * groups;
        }
    int xo[XC];
#pragma unroll
    for (int q = 0; q < XC; ++q) {
        const int idx = gt + q * WN * 32, r = idx >> 4;
        xo[q] = min(tok0 + r, M - 1) * stride_x + 8 * (idx & 15);  // past M: re-read the last row, never stored
    }
    float acc[RB][NT][4];
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][n][i] = 0.f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        uint4* base = smem + s * stage_u4;
        if (s < mine)
            stage_in(base + wk * XT, base + WK * XT, reinterpret_cast<unsigned int*>(base + WK * XT + WT), x, wrow,
                     srow, xo, wk + s * WK, gt, lane, warp, G);
        cp_commit();
    }
    for (int j = 0; j < mine; ++j) {
        cp_wait();  // this thread's copies of step j landed
        group_sync(wk);  // and the group's; every warp of the group is done with step j - 1's buffer
        {
            const int jn = j + STAGES - 1;
            uint4* base = smem + (jn % STAGES) * stage_u4;
            if (jn < mine)
                stage_in(base + wk * XT, base + WK * XT, reinterpret_cast<unsigned int*>(base + WK * XT + WT), x,
                         wrow, srow, xo, wk + jn * WK, gt, lane, warp, G);
            cp_commit();
        }
        const uint4* base = smem + (j % STAGES) * stage_u4;
        const uint4* xs = base + wk * XT;
        const uint4* ws = base + WK * XT;
        const unsigned int* ss = reinterpret_cast<const unsigned int*>(base + WK * XT + WT);
        uint4 w[RB][2];
        unsigned int cz[RB][2], s2[RB][2];
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int slot = ((warp * RB + r) * 2 + h) * 32 + lane;
                w[r][h] = ws[slot];
                const unsigned int sc = ss[slot];
                cz[r][h] = pack2(scale_bits_to_float(sc >> 16) + BIAS_C);
                s2[r][h] = pack2(scale_bits_to_float(sc & 0xFFFFu));
            }
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // word i of the lane's chunk: k = 32t + 8i .. + 7
            unsigned int a[RB][2][4];
#pragma unroll
            for (int r = 0; r < RB; ++r)
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    a[r][0][p] = dq((&w[r][0].x)[i], p, cz[r][0], s2[r][0]);
                    a[r][1][p] = dq((&w[r][1].x)[i], p, cz[r][1], s2[r][1]);
                }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 xv = xs[swz(8 * n + g, 4 * t + i)];
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    mma(acc[r][n], a[r][0][0], a[r][1][0], a[r][0][1], a[r][1][1], xv.x, xv.y);
                    mma(acc[r][n], a[r][0][2], a[r][1][2], a[r][0][3], a[r][1][3], xv.z, xv.w);
                }
            }
        }
    }
#if WK > 1
    asm volatile("cp.async.wait_all;");
    __syncthreads();  // every warp is past its last step: the pipeline's buffers take the K warps' sums
    float* red = reinterpret_cast<float*>(smem);
    if (wk > 0) {
        float* theirs = red + (size_t)((wk - 1) * WN + wn) * RB * NT * 4 * 32;
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) theirs[((r * NT + n) * 4 + i) * 32 + lane] = acc[r][n][i];
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int j = 1; j < WK; ++j) {
        const float* theirs = red + (size_t)((j - 1) * WN + wn) * RB * NT * 4 * 32;
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[r][n][i] += theirs[((r * NT + n) * 4 + i) * 32 + lane];
    }
#endif
    // c0, c1: row g, tokens 2t, 2t + 1 of the n-tile; c2, c3: row g + 8
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row_base + 16 * r + 8 * h + g;
            if (row >= N) continue;
#if HAS_BIAS
            const float b = half_bits_to_float(bias[row]);
#else
            const float b = 0.f;
#endif
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = tok0 + 8 * n + 2 * t + e;
                    if (m < M) out[(size_t)m * N + row] = float_to_out_bits(acc[r][n][2 * h + e] + b);
                }
        }
}
"""

_SOURCE = CONVERSIONS + f"#define STEP {STEP_K}\n" + MMA_HELPERS + TILE_KERNEL


@dataclass(frozen=True)
class CudaTileConfig:
    """Row blocks of 16 per warp, warps over rows (sharing x) and over K per block, 8-token MMA tiles per block
    (at most: fewer where M is smaller), and the steps in flight (cp.async stages)."""

    rb: int = 2
    wn: int = 4
    wk: int = 1
    nt: int = 8
    stages: int = 4

    def __post_init__(self) -> None:
        check_small_pow2(self, ("rb", "wn", "wk", "nt"))
        if self.wn * self.wk > 16 or not 2 <= self.stages <= 8:
            raise ConfigError(f"CudaTileConfig: at most 16 warps and 2..8 stages, found {self}")

    @property
    def rows(self) -> int:
        return 16 * self.rb * self.wn

    def shared_bytes(self, nt: int) -> int:
        """The pipeline's buffers (x tiles, weight words, scales per stage), or the K warps' sums if larger."""
        weights = self.wn * self.wk * self.rb * 2 * 32
        stage = (self.wk * 8 * nt * 16 + weights) * 16 + weights * 4
        reduce = (self.wk - 1) * self.wn * self.rb * nt * 4 * 32 * 4
        return max(self.stages * stage, reduce)


def tile_n_tiles(m: int, cfg: CudaTileConfig) -> int:
    """8-token MMA tiles per block for M rows: the config's, or the next power of two that covers M."""
    return min(cfg.nt, 1 << ((max(m, 1) - 1) // 8).bit_length())


@functools.cache
def _compiled(cfg: CudaTileConfig, nt: int, x_bf16: bool, s_bf16: bool, has_bias: bool) -> NvrtcKernel | None:
    defines = {"RB": cfg.rb, "WN": cfg.wn, "WK": cfg.wk, "NT": nt, "STAGES": cfg.stages, "XBF16": int(x_bf16),
               "SBF16": int(s_bf16), "HAS_BIAS": int(has_bias)}
    kernel = compile_variant(_SOURCE, "w4a16_tile", defines, "the kernels beside it")
    if kernel is not None:
        try:
            kernel.allow_shared(cfg.shared_bytes(nt))
        except (RuntimeError, AttributeError) as err:  # a smaller card, or a torch without the setter
            warnings.warn(f"qwen-awq: {cfg} cannot have its shared memory here ({str(err)[:200]}); using the "
                          "kernels beside it", stacklevel=3)
            return None
    return kernel


def cuda_tile_supported(x: Tensor, k: int, group_size: int) -> bool:
    """Whether the NVRTC tiled kernel can take x (1..MAX_M rows, K a multiple of 128, CUDA sm_80+, fp16/bf16);
    QWEN_AWQ_CUDA_TILE=0 turns it alone off (QWEN_AWQ_CUDA_KERNELS=0 every NVRTC kernel)."""
    m = x.numel() // max(x.shape[-1], 1)
    return (group_size % 32 == 0 and k % STEP_K == 0 and 1 <= m <= MAX_M
            and os.environ.get("QWEN_AWQ_CUDA_TILE", "1") != "0" and nvrtc_enabled(x.reshape(m, -1)[:1]))


def w4a16_tile_cuda(x2d: Tensor, qweight_t: Tensor, scale_zero: Tensor, group_size: int, s_bf16: bool,
                    bias: Tensor | None, config: CudaTileConfig) -> Tensor | None:
    """y (M, N) for x2d (M, K) with unit stride along K, or None where the kernel could not compile;
    ConfigError where the config's shared memory exceeds what a block may have."""
    (m, k), n = x2d.shape, qweight_t.shape[0]
    nt = tile_n_tiles(m, config)
    if (smem := config.shared_bytes(nt)) > SMEM_OPTIN:
        raise ConfigError(f"{config} needs {smem} bytes of shared memory at M = {m}, more than {SMEM_OPTIN}: "
                          "fewer stages, tokens or warps")
    kernel = _compiled(config, nt, x2d.dtype == torch.bfloat16, s_bf16, bias is not None)
    if kernel is None:
        return None
    if x2d.stride(0) % 8 or x2d.data_ptr() % 16:  # rows must start on 16 bytes for cp.async
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    b = out if bias is None else bias.to(x2d.dtype)
    kernel((-(-m // (8 * nt)), -(-n // config.rows)), 32 * config.wn * config.wk,
           [x2d, qweight_t, scale_zero, b, out, m, n, k, group_size, x2d.stride(0)], shared=smem)
    return out
