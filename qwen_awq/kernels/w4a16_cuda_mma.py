"""CUDA C++ tensor-core W4A16 matmul for small batches (M = 1..64) on the repacked layout, compiled by NVRTC.

Why beside Triton's (w4a16_mma.py): Triton moves each dequantized weight tile through shared memory to reach the
MMA's operand layout, which bounds it at 1.1-1.5x cuBLAS fp16 for M = 16..32 on the H200 where the weight bytes
allow ~3.5x. Here the weights are the MMA's A operand (16 output rows x 16 k per mma.sync.m16n8k16) and go from a
16-byte global load straight into its registers: the MMA sums over k in any order as long as A and B agree, so lane
(g, t) of a warp (g = lane / 4, t = lane % 4) takes for rows g and g + 8 the 16-byte chunk t of a 128-k step (k =
32t .. 32t + 31, one uint4 of the repacked row), and mma j of the step's eight takes that chunk's word j / 2, nibble
pairs 2 (j % 2) and 2 (j % 2) + 1 in A's slots (2t, 2t + 1) and (2t + 8, 2t + 9); B (x, 8 tokens per mma) takes the
same k from x, one 16-byte load per token per word. A nibble pair (bits 4p and 4p + 16 of a word: k = 8w + 2p, 8w +
2p + 1) becomes two 16-bit floats C + q by one lop3 (C = 1024 in fp16, 128 in bf16); one packed subtract of C + z
leaves q - z exactly and one packed multiply by the scale rounds (q - z) * s once, the reference's dequantized
weight. fp32 accumulation. With scale_after (group sizes that are multiples of 128, so that a 128-k step lies in one
group) the MMAs take q - z itself and the scale multiplies each step's fp32 sums instead: in fp16 the pairs 1 and 3
of a word are read in place as C + 16q (mask 0x00F000F0) and one packed FMA by 1/16 leaves q - z, so a word costs
one shift, four lop3 and four packed subtracts or FMAs rather than four shifts, four lop3, four subtracts and four
multiplies; a step's sums wait until the next step's loads are out before they are scaled (the fold needs the MMAs'
results). Per shape and config it is faster or slower (H200: bench/results/w4a16_scale_after_H200_2026-12-04.md), so
the tuned table says which. A block's WK warps split K and add through shared memory; its WN warps take different
rows over the same K (they may share x in L1). No split-K across blocks, no partials, no locks: one launch,
capturable. With `xperm`, x_fragments first writes x in the order the lanes load it, so a warp's x load is 512
contiguous bytes rather than 8 tokens x 4 strided chunks (it wins from M = 16 on). What bounds it from M = 32 on:
every 16 weight rows read the whole of x (bench/results/gpu_final_H200_2026-12-03b.md; a shared-x split-K variant
measured slower there). Reference and CPU path: reference.w4a16_matmul_reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.w4a16_cuda import CONVERSIONS, NvrtcKernel, check_small_pow2, compile_variant, nvrtc_enabled

MAX_M = 64  # 8 tokens per n-tile, up to 8 n-tiles (each adds 16 accumulator registers per row block)
STEP_K = 128  # k per warp step: 16 bytes of each row per lane
SHARED_BYTES = 48 * 1024  # a kernel's static shared memory

MMA_HELPERS = r"""
#if XBF16
#define MAGIC 0x43004300u  // two bf16 128.0
#define BIAS_C 128.f
#else
#define MAGIC 0x64006400u  // two fp16 1024.0
#define BIAS_C 1024.f
#endif

__device__ __forceinline__ unsigned int pack2(float f) {  // f in x's dtype, in both halves
    const unsigned int h = float_to_out_bits(f);
    return h | (h << 16);
}

// (C + q) pairs of word w at pair p, minus (C + z), times s: the dequantized weights of k = 8w + 2p, 2p + 1.
__device__ __forceinline__ unsigned int dq(unsigned int w, int p, unsigned int cz, unsigned int s) {
    unsigned int v = ((w >> (4 * p)) & 0x000F000Fu) | MAGIC, d, r;
#if XBF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(v), "r"(0x3F803F80u), "r"(cz ^ 0x80008000u));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(d), "r"(s), "r"(0x80008000u));
#else
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(v), "r"(cz));
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(d), "r"(s));
#endif
    return r;
}

#if SCALE_AFTER
// The group's scale applies to the fp32 sums after the MMAs (a 128-k step lies in one group): each pair of word
// w's nibbles becomes q - z exactly, in fp16 by one lop3 and one packed subtract or FMA per two weights (pairs 0, 2
// as C + q, pairs 1, 3 as C + 16q, read in place by the mask 0x00F000F0; one shift for pairs 2, 3), in bf16 (whose
// mantissa has no room for 16q) by a shift, a lop3 and an FMA; cz = C + z, chi = -(C / 16 + z) in both halves.
__device__ __forceinline__ void dq4(unsigned int w, unsigned int cz, unsigned int chi, unsigned int (&a)[4]) {
#if XBF16
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const unsigned int v = ((w >> (4 * p)) & 0x000F000Fu) | MAGIC;
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(a[p]) : "r"(v), "r"(0x3F803F80u), "r"(cz ^ 0x80008000u));
    }
#else
    const unsigned int w2 = w >> 8;
    const unsigned int v0 = (w & 0x000F000Fu) | MAGIC, v1 = (w & 0x00F000F0u) | MAGIC;
    const unsigned int v2 = (w2 & 0x000F000Fu) | MAGIC, v3 = (w2 & 0x00F000F0u) | MAGIC;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(a[0]) : "r"(v0), "r"(cz));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(a[1]) : "r"(v1), "r"(0x2C002C00u), "r"(chi));  // x 1/16
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(a[2]) : "r"(v2), "r"(cz));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(a[3]) : "r"(v3), "r"(0x2C002C00u), "r"(chi));
#endif
}
#endif

__device__ __forceinline__ void mma(float (&c)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                    unsigned int a3, unsigned int b0, unsigned int b1) {
#if XBF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

"""

# After the helpers: kernels that extend this one (w4a16_cuda_norm.py) put their device functions here.
MMA_MAIN = r"""
// Block: WN x WK warps; warp (wn, wk) owns rows [16 RB (WN blockIdx + wn), + 16 RB) and the 128-k steps
// wk, wk + WK, ...; U steps' loads issue before their arithmetic.
extern "C" __global__ void __launch_bounds__(WN * WK * 32) KERNEL_NAME(
    const unsigned short* __restrict__ x, const uint4* __restrict__ qw, const unsigned int* __restrict__ sz,
    const unsigned short* __restrict__ bias, unsigned short* __restrict__ out, int M, int N, int K, int G,
    int stride_x, const unsigned short* __restrict__ resid, const unsigned short* __restrict__ nw,
    unsigned short* __restrict__ new_res, float eps) {
    __shared__ float red[WK > 1 ? (WK - 1) * WN * RB * NT * 4 * 32 : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wn = warp % WN, wk = warp / WN;
    const int row_base = (blockIdx.x * WN + wn) * RB * 16;
    const int steps = (K + STEP - 1) / STEP, kchunks = K >> 5, groups = K / G;
    float acc[RB][NT][4];
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][n][i] = 0.f;
#if XPERM  // x as x_fragments wrote it: each warp load is 512 contiguous bytes
    const uint4* xp = reinterpret_cast<const uint4*>(x) + lane;
#elif !NORM
    const uint4* xrow[NT];  // this lane's token of each n-tile (past M: re-read row M - 1, never stored)
#pragma unroll
    for (int n = 0; n < NT; ++n) xrow[n] = reinterpret_cast<const uint4*>(x + (size_t)min(8 * n + g, M - 1) * stride_x);
#endif
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
#if NORM
    __shared__ __align__(16) unsigned short xn[NORM_K];  // x = rms_norm(x + resid) * nw, the MMAs' B operand
    rms_norm_prologue(x, resid, nw, new_res, eps, xn, wrow, wk, steps, kchunks, t);
#endif
#if SCALE_AFTER
    // A step's MMA sums wait in part (scales in ps) until the next step's loads have gone out, so that the fold
    // (which needs the MMAs' results) never holds back a load.
    float part[RB][NT][4], ps[RB][2];
#pragma unroll
    for (int r = 0; r < RB; ++r) {
        ps[r][0] = ps[r][1] = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[r][n][e] = 0.f;
    }
#endif
    for (int s0 = wk; s0 < steps; s0 += WK * U) {
        uint4 w[U][RB][2];
        unsigned int sc[U][RB][2];
        uint4 xv[U][NT][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int st = min(s0 + WK * u, steps - 1);
            const int c = min(st * 4 + t, kchunks - 1);  // this lane's 32-k chunk (clamped past K)
#pragma unroll
            for (int r = 0; r < RB; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    w[u][r][h] = load_stream(wrow[r][h] + c);
                    sc[u][r][h] = __ldg(srow[r][h] + (32 * c) / G);
                }
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#if NORM
                    xv[u][n][i] = reinterpret_cast<const uint4*>(xn)[4 * c + i];
#elif XPERM
                    xv[u][n][i] = __ldg(xp + (size_t)((st * NT + n) * 4 + i) * 32);
#else
                    xv[u][n][i] = __ldg(xrow[n] + 4 * c + i);
#endif
                }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (s0 + WK * u) * 4 + t;
            if ((s0 + WK * u) * 4 >= kchunks) break;  // the whole warp: past the last step
            if (c >= kchunks) {  // this lane's chunk is past K: its x weighs nothing
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) xv[u][n][i] = make_uint4(0u, 0u, 0u, 0u);
            }
#if SCALE_AFTER
            unsigned int cz[RB][2], chi[RB][2];
#pragma unroll
            for (int r = 0; r < RB; ++r) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float z = scale_bits_to_float(sc[u][r][h] >> 16);
                    cz[r][h] = pack2(z + BIAS_C);
                    chi[r][h] = pack2(-(z + BIAS_C / 16.f));
                }
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {  // the last step's sums, folded here: its MMAs are done by now
                        acc[r][n][e] = fmaf(ps[r][e >> 1], part[r][n][e], acc[r][n][e]);
                        part[r][n][e] = 0.f;
                    }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // word i of the lane's chunk: k = 32t + 8i .. + 7
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    unsigned int a[2][4];
                    dq4((&w[u][r][0].x)[i], cz[r][0], chi[r][0], a[0]);
                    dq4((&w[u][r][1].x)[i], cz[r][1], chi[r][1], a[1]);
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        const unsigned int* xw = &xv[u][n][i].x;
                        mma(part[r][n], a[0][0], a[1][0], a[0][1], a[1][1], xw[0], xw[1]);
                        mma(part[r][n], a[0][2], a[1][2], a[0][3], a[1][3], xw[2], xw[3]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < RB; ++r)  // c0, c1: row g; c2, c3: row g + 8
#pragma unroll
                for (int h = 0; h < 2; ++h) ps[r][h] = scale_bits_to_float(sc[u][r][h] & 0xFFFFu);
#else
            unsigned int cz[RB][2], s2[RB][2];
#pragma unroll
            for (int r = 0; r < RB; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    cz[r][h] = pack2(scale_bits_to_float(sc[u][r][h] >> 16) + BIAS_C);
                    s2[r][h] = pack2(scale_bits_to_float(sc[u][r][h] & 0xFFFFu));
                }
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // word i of the lane's chunk: k = 32t + 8i .. + 7
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    const unsigned int wa = (&w[u][r][0].x)[i], wb = (&w[u][r][1].x)[i];
                    unsigned int a[2][4];
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        a[0][p] = dq(wa, p, cz[r][0], s2[r][0]);
                        a[1][p] = dq(wb, p, cz[r][1], s2[r][1]);
                    }
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        const unsigned int* xw = &xv[u][n][i].x;
                        mma(acc[r][n], a[0][0], a[1][0], a[0][1], a[1][1], xw[0], xw[1]);
                        mma(acc[r][n], a[0][2], a[1][2], a[0][3], a[1][3], xw[2], xw[3]);
                    }
                }
            }
#endif
        }
    }
#if SCALE_AFTER
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][n][e] = fmaf(ps[r][e >> 1], part[r][n][e], acc[r][n][e]);
#endif
#if WK > 1
    if (wk > 0) {
        float* mine = red + (size_t)((wk - 1) * WN + wn) * RB * NT * 4 * 32;
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) mine[((r * NT + n) * 4 + i) * 32 + lane] = acc[r][n][i];
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
                    const int m = 8 * n + 2 * t + e;
                    if (m < M) out[(size_t)m * N + row] = float_to_out_bits(acc[r][n][2 * h + e] + b);
                }
        }
}
"""

# x (M, K) -> the fragments the MMA kernel's lanes load, in load order: uint4 ((step * NT + n) * 4 + i) * 32 + lane
# holds x[token 8n + g][k = 128 step + 32t + 8i .. + 7] (token clamped to M - 1, k to K - 8: never used there).
PERMUTE_KERNEL = r"""
extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const uint4* __restrict__ x, uint4* __restrict__ out,
                                                              int M, int K, int stride_x, int total) {
    const int idx = blockIdx.x * 256 + threadIdx.x;
    if (idx >= total) return;
    const int lane = idx & 31, i = (idx >> 5) & 3, n = (idx >> 7) % NT, step = (idx >> 7) / NT;
    const int token = min(8 * n + (lane >> 2), M - 1);
    const int chunk = min(16 * step + 4 * (lane & 3) + i, K / 8 - 1);
    out[idx] = x[(size_t)token * (stride_x / 8) + chunk];
}
"""

_HEAD = CONVERSIONS + f"#define STEP {STEP_K}\n" + MMA_HELPERS


@dataclass(frozen=True)
class CudaMmaConfig:
    """Row blocks of 16 per warp, warps over rows and over K per block, 128-k steps loaded before computing, where
    the scales apply."""

    rb: int = 2  # the defaults: the best total over Qwen-7B's shapes at M = 8 and 16 without xperm (H200)
    wn: int = 1
    wk: int = 8
    unroll: int = 1
    xperm: bool = False  # x rearranged first (x_fragments, one more launch) so that its loads coalesce
    # scale each 128-k step's fp32 sums rather than each dequantized weight (SCALE_AFTER; where the group size is
    # a multiple of 128, else ignored): fewer instructions per weight, faster or slower by shape and config
    scale_after: bool = False

    def __post_init__(self) -> None:
        check_small_pow2(self, ("rb", "wn", "wk", "unroll"))
        if self.wn * self.wk > 32:
            raise ConfigError(f"CudaMmaConfig: wn x wk warps must be at most 32, found {self.wn * self.wk}")

    @property
    def rows(self) -> int:
        return 16 * self.rb * self.wn

    def reduce_bytes(self, nt: int) -> int:
        """Shared memory for the K warps' sums: (WK - 1) x WN warps' accumulators."""
        return (self.wk - 1) * self.wn * self.rb * nt * 4 * 32 * 4


def n_tiles(m: int) -> int:
    """8-token MMA tiles for M rows: 1, 2, 4 or 8 (the kernel is specialised on it)."""
    return 1 << ((max(m, 1) - 1) // 8).bit_length()


def scale_after(config: CudaMmaConfig, group_size: int) -> bool:
    """Whether the kernel scales per 128-k step: the config asks and every step lies inside one group."""
    return config.scale_after and group_size % STEP_K == 0


@functools.cache
def compile_mma(cfg: CudaMmaConfig, nt: int, x_bf16: bool, s_bf16: bool, has_bias: bool, after: bool,
                prologue: str = "", prologue_defines: tuple[tuple[str, int], ...] = ()) -> NvrtcKernel | None:
    """The kernel for one configuration, compiled once; `prologue` is device code placed before the kernel and
    enabled by `prologue_defines` (w4a16_cuda_norm.py's RMSNorm, NORM = 1)."""
    defines = {"RB": cfg.rb, "WN": cfg.wn, "WK": cfg.wk, "U": cfg.unroll, "NT": nt, "XPERM": int(cfg.xperm),
               "XBF16": int(x_bf16), "SBF16": int(s_bf16), "HAS_BIAS": int(has_bias), "SCALE_AFTER": int(after),
               "NORM": 0, **dict(prologue_defines)}
    return compile_variant(_HEAD + prologue + MMA_MAIN, "w4a16_mma", defines, "Triton's tensor-core kernel")


@functools.cache
def _permute_compiled(nt: int) -> NvrtcKernel | None:
    return compile_variant(PERMUTE_KERNEL, "w4a16_x_fragments", {"NT": nt}, "Triton's tensor-core kernel")


def x_fragments(x2d: Tensor, nt: int) -> Tensor | None:
    """x (M, K) rearranged in the MMA kernel's load order (PERMUTE_KERNEL), or None where it did not compile."""
    m, k = x2d.shape
    kernel = _permute_compiled(nt)
    if kernel is None:
        return None
    total = -(-k // STEP_K) * nt * 4 * 32  # uint4 units
    out = torch.empty(total * 8, dtype=x2d.dtype, device=x2d.device)
    kernel(-(-total // 256), 256, [x2d, out, m, k, x2d.stride(0), total])
    return out


def cuda_mma_supported(x: Tensor, group_size: int) -> bool:
    """Whether the NVRTC tensor-core kernel can take x (1..MAX_M rows, CUDA sm_80+, fp16/bf16); QWEN_AWQ_CUDA_MMA=0
    turns it alone off (QWEN_AWQ_CUDA_KERNELS=0 every NVRTC kernel)."""
    m = x.numel() // max(x.shape[-1], 1)
    return (group_size % 32 == 0 and 1 <= m <= MAX_M and os.environ.get("QWEN_AWQ_CUDA_MMA", "1") != "0"
            and nvrtc_enabled(x.reshape(m, -1)[:1]))


def w4a16_mma_cuda(x2d: Tensor, qweight_t: Tensor, scale_zero: Tensor, group_size: int, s_bf16: bool,
                   bias: Tensor | None, config: CudaMmaConfig) -> Tensor | None:
    """y (M, N) for x2d (M, K) with unit stride along K, or None where the kernel could not compile;
    ConfigError where the config's reduction does not fit in shared memory at this M."""
    (m, k), n = x2d.shape, qweight_t.shape[0]
    nt = n_tiles(m)
    if (smem := config.reduce_bytes(nt)) > SHARED_BYTES:
        raise ConfigError(f"{config} needs {smem} bytes of shared memory at M = {m}, more than {SHARED_BYTES}: "
                          "fewer K warps, row blocks or rows warps")
    kernel = compile_mma(config, nt, x2d.dtype == torch.bfloat16, s_bf16, bias is not None,
                         scale_after(config, group_size))
    if kernel is None:
        return None
    if x2d.stride(0) % 8 or x2d.data_ptr() % 16:  # rows must start on 16 bytes (K % 32 == 0 holds by the groups)
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    xin = x_fragments(x2d, nt) if config.xperm else x2d
    if xin is None:
        return None
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    b = out if bias is None else bias.to(x2d.dtype)
    kernel(-(-n // config.rows), 32 * config.wn * config.wk,
           [xin, qweight_t, scale_zero, b, out, m, n, k, group_size, x2d.stride(0), out, out, out, 0.0])
    return out
