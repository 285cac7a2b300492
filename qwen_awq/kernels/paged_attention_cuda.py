"""Paged decode attention over an int8 KV pool (Qwen's codes + per-token (scale, zero)), MHA, as CUDA C++ compiled at
run time by NVRTC: the engine's int8 decode path on CUDA where it compiles, the Triton kernel elsewhere.

Why beside the Triton kernel (paged_attention.py): with int8 codes Triton's CUDA-core kernel is bound by the
instructions around each code (reductions over the head dimension, layout shuffles) and streams the K/V bytes at
~62% of copy bandwidth on the H200, 1.2x its fp16 kernel (bench/results/paged_attention_H200.md); its tensor-core
form was slower. Here a token's 128-byte row is HEAD_DIM / 16 lanes' 16-byte loads, so one warp reads 32 / LPT
rows per load instruction, and the work per code is one PRMT (the fp32 2^23 + c), one FADD and one FFMA, the rest
per token: LPT-lane shuffles for the score, one exp2, the (scale, zero) factors (scale * (c - zero) folded into the
score and the weight as in paged_attention.py). Each lane group (LPT lanes) keeps its own online softmax over its
tokens; warps run independently over interleaved token tiles and merge once at the end (shuffles, then shared
memory). Every load of an iteration (U tokens per lane group, K and V) is issued before any arithmetic; with
`prefetch`, the next iteration's go out before this one's arithmetic (two tiles in flight per warp). A group's
lanes load its tokens' (scale, zero) pairs between them and shuffle them at use (fewer registers per tile).

Context splits (flash-decoding) write the Triton kernels' partial layout and reuse their merge kernel. The grid
depends on shapes alone (heads, batch, splits), lengths are read on the device: CUDA graphs replay it for any
lengths up to the table width. Reference and CPU path: paged_reference.paged_attention_reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.paged_common import (
    LOG2E,
    MAX_SPLITS,
    choose_splits,
    kv_strides,
    merge_splits,
    num_sms,
    split_outputs,
)
from qwen_awq.kernels.paged_reference import PagedKV
from qwen_awq.kernels.w4a16_cuda import CONVERSIONS, check_small_pow2, compile_variant, nvrtc_device_capable

_INDEX = (torch.int32, torch.int64)  # block-table and length dtypes the kernel reads

INT8_DECODE = r"""
#define LPT (HEAD_DIM / 16)       // lanes per token row: 16 codes (one 16-byte load) each
#define GROUPS (32 / LPT)         // token rows one warp load instruction covers
#define WARP_TOKENS (GROUPS * U)  // tokens a warp takes per iteration
#define TILE (WARPS * WARP_TOKENS)
#if TABLE64  // block tables and lengths: int64 (the engine) or int32
typedef long long table_t;
#else
typedef int table_t;
#endif
#if LENS64
typedef long long lens_t;
#else
typedef int lens_t;
#endif

__device__ __forceinline__ float ex2(float x) {  // 2^x; -inf -> +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The 16 codes of one 16-byte chunk as fp32: the float with bits 0x4B0000cc is 2^23 + c (one PRMT), minus 2^23.
__device__ __forceinline__ void codes16(uint4 w, float* c) {
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
    const float base = 8388608.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned int a, b, d, e;
        asm("prmt.b32 %0, %1, 0x4B000000, 0x7440;" : "=r"(a) : "r"(words[j]));
        asm("prmt.b32 %0, %1, 0x4B000000, 0x7441;" : "=r"(b) : "r"(words[j]));
        asm("prmt.b32 %0, %1, 0x4B000000, 0x7442;" : "=r"(d) : "r"(words[j]));
        asm("prmt.b32 %0, %1, 0x4B000000, 0x7443;" : "=r"(e) : "r"(words[j]));
        c[4 * j] = __uint_as_float(a) - base;
        c[4 * j + 1] = __uint_as_float(b) - base;
        c[4 * j + 2] = __uint_as_float(d) - base;
        c[4 * j + 3] = __uint_as_float(e) - base;
    }
}

#define ZPL ((U + LPT - 1) / LPT)  // (scale, zero) pairs per lane per tile: a group's lanes share its U tokens'

struct Tile {  // one iteration's loads for a lane: U tokens' 16-byte code chunks, ZPL tokens' (scale, zero) pairs
    uint4 kw[U], vw[U];
    float2 ks[ZPL], vs[ZPL];  // lane sub holds token u = (sub + j LPT) % U's at j; consume() shuffles them
};

__device__ __forceinline__ void load_tile(Tile& t, int t0, int hi, int grp, int sub,
                                          const table_t* __restrict__ table, const unsigned char* __restrict__ kc,
                                          const unsigned char* __restrict__ vc, const float* __restrict__ ksz,
                                          const float* __restrict__ vsz, int s_blk, int s_tok, size_t head_off,
                                          int z_blk, int z_tok, size_t head_z) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int tok = min(t0 + u * GROUPS + grp, hi - 1);  // past the end: re-read the last, weighted 0
        const long long blk = __ldg(table + tok / BS);  // int32 or int64 entries
        const int off = tok % BS;
        const size_t row = (size_t)blk * s_blk + (size_t)off * s_tok + head_off;
        t.kw[u] = load_stream(reinterpret_cast<const uint4*>(kc + row));
        t.vw[u] = load_stream(reinterpret_cast<const uint4*>(vc + row));
    }
#pragma unroll
    for (int j = 0; j < ZPL; ++j) {
        const int tok = min(t0 + ((sub + j * LPT) % U) * GROUPS + grp, hi - 1);
        const long long blk = __ldg(table + tok / BS);
        const size_t zr = (size_t)blk * z_blk + (size_t)(tok % BS) * z_tok + head_z;
        t.ks[j] = __ldg(reinterpret_cast<const float2*>(ksz + zr));
        t.vs[j] = __ldg(reinterpret_cast<const float2*>(vsz + zr));
    }
}

// Token u's (scale, zero) from the lane of this group that loaded it
__device__ __forceinline__ float2 pair_of(const float2* held, int u, int grp) {
    const int src = grp * LPT + u % LPT;
    float2 pair;
    pair.x = __shfl_sync(0xFFFFFFFFu, held[u / LPT].x, src);
    pair.y = __shfl_sync(0xFFFFFFFFu, held[u / LPT].y, src);
    return pair;
}

// One tile into a lane group's online softmax: scores q . scale (c - zero), their running max m and sum l, the
// weighted codes acc and the weighted zero points corr (acc - corr is the unnormalised output).
__device__ __forceinline__ void consume(const Tile& t, int t0, int hi, int grp, const float* qf, float qsum, float& m,
                                        float& l, float& corr, float* acc) {
    float s[U], top = m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        float c[16], dot = 0.f;
        codes16(t.kw[u], c);
#pragma unroll
        for (int i = 0; i < 16; ++i) dot = fmaf(qf[i], c[i], dot);
#pragma unroll
        for (int o = 1; o < LPT; o <<= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
        const bool valid = t0 + u * GROUPS + grp < hi;
        const float2 ks = pair_of(t.ks, u, grp);
        s[u] = valid ? ks.x * (dot - ks.y * qsum) : __int_as_float(0xFF800000);  // -inf past the end
        top = fmaxf(top, s[u]);
    }
    const float alpha = ex2(m - top);
    l *= alpha;
    corr *= alpha;
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const float p = ex2(s[u] - top);
        l += p;
        const float2 vs = pair_of(t.vs, u, grp);
        const float pw = p * vs.x;  // weight the codes; the zero points come off once at the end
        corr = fmaf(pw, vs.y, corr);
        float c[16];
        codes16(t.vw[u], c);
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = fmaf(pw, c[i], acc[i]);
    }
    m = top;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) KERNEL_NAME(
    const unsigned short* __restrict__ q, const unsigned char* __restrict__ kc, const unsigned char* __restrict__ vc,
    const float* __restrict__ ksz, const float* __restrict__ vsz, const table_t* __restrict__ tables,
    const lens_t* __restrict__ lens, void* __restrict__ out_ptr, float* __restrict__ part_m,
    float* __restrict__ part_l, float scale_log2, int num_heads, int num_splits, int stride_qb, int stride_qh,
    int stride_tb, int s_blk, int s_tok, int s_head, int z_blk, int z_tok, int z_head, int stride_ob,
    int stride_oh) {
    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int grp = lane / LPT, sub = lane % LPT;  // the token row of a load, the 16-byte chunk of that row
    const int ctx = (int)lens[b];
    const int chunk = ((ctx + num_splits - 1) / num_splits + 15) & ~15;  // this split's tokens, whole 16s
    const int lo = split * chunk, hi = min(lo + chunk, ctx);

    // q's 16 dims of this lane in log2 units, and sum_d q_d (the zero-point term) over the whole head
    float qf[16];
    {
        const uint4* qp = reinterpret_cast<const uint4*>(q + (size_t)b * stride_qb + (size_t)h * stride_qh + 16 * sub);
        const uint4 q0 = qp[0], q1 = qp[1];
        const unsigned int words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            qf[2 * j] = half_bits_to_float(words[j] & 0xFFFFu) * scale_log2;
            qf[2 * j + 1] = half_bits_to_float(words[j] >> 16) * scale_log2;
        }
    }
    float qsum = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) qsum += qf[i];
#pragma unroll
    for (int o = 1; o < LPT; o <<= 1) qsum += __shfl_xor_sync(0xFFFFFFFFu, qsum, o);

    const table_t* table = tables + (size_t)b * stride_tb;
    const size_t head_off = (size_t)h * s_head + 16 * sub, head_z = (size_t)h * z_head;
    float m = -1.0e30f, l = 0.f, corr = 0.f, acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;

    const int first = lo + warp * WARP_TOKENS;
#define LOAD(t, at) \
    load_tile(t, at, hi, grp, sub, table, kc, vc, ksz, vsz, s_blk, s_tok, head_off, z_blk, z_tok, head_z)
#if PREFETCH  // registers: tile i + 1's loads go out before tile i's arithmetic
    Tile cur, nxt;
    if (first < hi) LOAD(cur, first);
    for (int t0 = first; t0 < hi; t0 += TILE) {
        if (t0 + TILE < hi) LOAD(nxt, t0 + TILE);
        consume(cur, t0, hi, grp, qf, qsum, m, l, corr, acc);
        cur = nxt;
    }
#else  // registers: one tile in flight per warp
    Tile cur;
    for (int t0 = first; t0 < hi; t0 += TILE) {
        LOAD(cur, t0);
        consume(cur, t0, hi, grp, qf, qsum, m, l, corr, acc);
    }
#endif

    // merge the warp's lane groups (lanes with the same sub hold the same dims), then the warps
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
        const float m_o = __shfl_xor_sync(0xFFFFFFFFu, m, o), top = fmaxf(m, m_o);
        const float wa = ex2(m - top), wb = ex2(m_o - top);
        l = l * wa + __shfl_xor_sync(0xFFFFFFFFu, l, o) * wb;
        corr = corr * wa + __shfl_xor_sync(0xFFFFFFFFu, corr, o) * wb;
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] = acc[i] * wa + __shfl_xor_sync(0xFFFFFFFFu, acc[i], o) * wb;
        m = top;
    }
    __shared__ float sm_m[WARPS], sm_l[WARPS], sm_acc[WARPS][HEAD_DIM];
    if (grp == 0) {
#pragma unroll
        for (int i = 0; i < 16; ++i) sm_acc[warp][16 * sub + i] = acc[i] - corr;
        if (sub == 0) {
            sm_m[warp] = m;
            sm_l[warp] = l;
        }
    }
    __syncthreads();
    float top = sm_m[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) top = fmaxf(top, sm_m[w]);
    float den = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) den += ex2(sm_m[w] - top) * sm_l[w];
    for (int d = threadIdx.x; d < HEAD_DIM; d += WARPS * 32) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) v += ex2(sm_m[w] - top) * sm_acc[w][d];
#if IS_SPLIT
        const size_t part = ((size_t)b * num_heads + h) * num_splits + split;
        reinterpret_cast<float*>(out_ptr)[part * HEAD_DIM + d] = v;
        if (d == 0) {
            part_m[part] = top;
            part_l[part] = den;
        }
#else
        reinterpret_cast<unsigned short*>(out_ptr)[(size_t)b * stride_ob + (size_t)h * stride_oh + d] =
            float_to_out_bits(v / (den == 0.f ? 1.f : den));
#endif
    }
}
"""
_SOURCE = CONVERSIONS + INT8_DECODE


@dataclass(frozen=True)
class CudaDecodeConfig:
    """Tokens per lane group per iteration (loads in flight), warps per (sequence, head, split) block, and how
    splits are chosen when few sequences run: about `waves` blocks per SM, each split >= min_split_tokens."""

    unroll: int = 4
    warps: int = 4
    prefetch: bool = False  # load tile i + 1 before computing tile i (else after: one tile in flight per warp)
    min_blocks: int = 1  # blocks per SM the compiler must fit (__launch_bounds__): caps the registers per thread
    waves: int = 4
    min_split_tokens: int = 64
    splits: int | None = None

    def __post_init__(self) -> None:
        check_small_pow2(self, ("unroll", "warps"))
        if self.waves < 1 or self.min_split_tokens < 1 or not 1 <= self.min_blocks <= 32:
            raise ConfigError(f"CudaDecodeConfig needs positive waves and min_split_tokens, min_blocks 1..32: {self}")
        if self.splits is not None and not 1 <= self.splits <= MAX_SPLITS:
            raise ConfigError(f"CudaDecodeConfig.splits must be in 1..{MAX_SPLITS}, found {self.splits}")


# H200 (bench/int8_attention_bench.py, bench/results/int8_attention_H200_2026-12-04.md): one warp per (sequence,
# head) block with two 8-token tiles in flight streams 64 x 1024 tokens at 85% of copy bandwidth (1.61x the fp16
# kernel); with context splits (few sequences) two warps per block measured faster.
DEFAULT = CudaDecodeConfig(unroll=8, warps=1, prefetch=True)
SPLIT_DEFAULT = CudaDecodeConfig(unroll=8, warps=2, prefetch=True)


@functools.cache
def _compiled(cfg: CudaDecodeConfig, head_dim: int, block_size: int, q_bf16: bool, is_split: bool, table64: bool,
              lens64: bool):
    defines = {"HEAD_DIM": head_dim, "BS": block_size, "U": cfg.unroll, "WARPS": cfg.warps, "XBF16": int(q_bf16),
               "SBF16": 0, "IS_SPLIT": int(is_split), "PREFETCH": int(cfg.prefetch),
               "MIN_BLOCKS": cfg.min_blocks, "TABLE64": int(table64),
               "LENS64": int(lens64)}
    return compile_variant(_SOURCE, "paged_int8_decode", defines, "the Triton kernel")


def cuda_int8_supported(q: Tensor, kv: PagedKV, block_tables: Tensor, context_lens: Tensor) -> bool:
    """Whether the CUDA kernel takes this call: CUDA, an int8 pool, MHA, head_dim 32..512 (a power of two),
    fp16/bf16 q with unit stride, int32/int64 tables and lengths, NVRTC on sm_80+ (QWEN_AWQ_CUDA_KERNELS=0:
    never)."""
    d = kv.head_dim
    return (
        q.is_cuda and kv.int8 and q.shape[1] == kv.num_kv_heads and 32 <= d <= 512 and d & (d - 1) == 0
        and q.dtype in (torch.float16, torch.bfloat16) and q.stride(-1) == 1
        and block_tables.dtype in _INDEX and context_lens.dtype in _INDEX
        and os.environ.get("QWEN_AWQ_CUDA_KERNELS", "1") != "0" and nvrtc_device_capable(q.device.index or 0)
    )


def paged_decode_int8_cuda(q: Tensor, kv: PagedKV, block_tables: Tensor, context_lens: Tensor, scale: float,
                           config: CudaDecodeConfig | None = None) -> Tensor | None:
    """q (B, H, D) one rotated, LogN-scaled token per sequence -> (B, H, D), as paged_decode_attention_triton;
    None where the kernel did not compile (the caller then takes the Triton kernel)."""
    bsz, heads, d = q.shape
    table_tokens, sms = block_tables.shape[1] * kv.block_size, num_sms(q.device)
    splits = choose_splits(bsz, heads, table_tokens, config or DEFAULT, sms)  # both defaults split alike
    cfg = config or (DEFAULT if splits == 1 else SPLIT_DEFAULT)
    kernel = _compiled(cfg, d, kv.block_size, q.dtype == torch.bfloat16, splits > 1,
                       block_tables.dtype == torch.int64, context_lens.dtype == torch.int64)
    if kernel is None:
        return None
    strides = kv_strides(kv.k, kv.block_size, kv.block_major)
    z_strides = kv_strides(kv.k_sz, kv.block_size, kv.block_major)
    if (kv_strides(kv.v, kv.block_size, kv.block_major) != strides
            or kv_strides(kv.v_sz, kv.block_size, kv.block_major) != z_strides
            or any(s % 16 for s in strides) or any(s % 2 for s in z_strides) or q.stride(1) % 8 or q.stride(0) % 8
            or any(t.data_ptr() % 16 for t in (q, kv.k, kv.v)) or any(t.data_ptr() % 8 for t in (kv.k_sz, kv.v_sz))):
        raise ValueError("the int8 CUDA kernel needs 16-byte aligned code rows, (scale, zero) pairs and q rows")
    out, target, part_m, part_l = split_outputs(q, splits)
    kernel((heads, bsz, splits), 32 * cfg.warps,
           [q, kv.k, kv.v, kv.k_sz, kv.v_sz, block_tables, context_lens, target, part_m, part_l,
            float(scale * LOG2E), heads, splits, q.stride(0), q.stride(1), block_tables.stride(0), *strides,
            *z_strides, out.stride(0), out.stride(1)])
    if splits > 1:
        merge_splits(target, part_m, part_l, out, splits)
    return out
