"""Paged decode attention over the KV pool (one query token per sequence) as a Triton kernel.

Each program streams one (sequence, kv head, context split)'s keys and values once, straight from the block table,
only up to the sequence's length; all query heads of a GQA group share the loads. int8 codes stay int8 until the
registers: scale * (code - zero) is folded into per-token factors of the scores and the weights. Few sequences split
the context (flash-decoding) and a second kernel merges the partial softmaxes. The grid depends on shapes alone
(batch, heads, table width), so one CUDA graph serves every length up to its table width; no host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.paged_attention_cuda import cuda_int8_supported, paged_decode_int8_cuda
from qwen_awq.kernels.paged_common import (
    LOG2E,
    MAX_SPLITS,
    choose_splits,
    codes_f16_offset,
    codes_f32,
    dot_dtype,
    finish,
    jit,
    kv_strides,
    merge_splits,
    num_sms,
    split_outputs,
    split_range,
    tl,
    triton,
    triton_supports,
    use_asm,
)
from qwen_awq.kernels.paged_reference import PagedKV, paged_attention_reference


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel. splits None: enough (sequence, kv head, split) programs for `waves`
    programs per SM, each split at least min_split_tokens long (tuned on an H200: bench/attention_bench.py)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    splits: int | None = None
    waves: int = 4
    min_split_tokens: int = 64
    use_dot: bool = True  # MHA on tensor cores too (GQA groups always use them): Triton pipelines loads into dots
    prefetch: bool = True  # CUDA-core MHA: load the next tile before computing this one
    two_pass: bool = False  # CUDA-core int8 MHA: scores and their max first, then the values (no rescaling)
    asm: bool = True  # int8: codes to fp32 with one PRMT each (inline PTX; off under the CPU interpreter)
    offset: bool = False  # int8 on tensor cores as fp16 1024 + code (one PRMT per two), scales after the dots

    def __post_init__(self) -> None:
        for name in ("block_n", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ConfigError(f"DecodeConfig.{name} must be a positive power of two, found {value}")
        if self.block_n < 16 or self.num_stages < 1 or self.waves < 1 or self.min_split_tokens < 1:
            raise ConfigError(f"DecodeConfig needs block_n >= 16 and positive stages/waves/split length: {self}")
        if self.splits is not None and not 1 <= self.splits <= MAX_SPLITS:
            raise ConfigError(f"DecodeConfig.splits must be in 1..{MAX_SPLITS}, found {self.splits}")


# Defaults per KV storage from the H200 sweep (bench/results/paged_attention_H200.md): fp16 K/V streams at copy
# bandwidth on tensor cores; int8 is bound by the instructions per code, fewest on CUDA cores.
FP16_DEFAULT = DecodeConfig()
INT8_DEFAULT = DecodeConfig(block_n=32, num_warps=8, num_stages=1, use_dot=False, prefetch=False)


def default_config(int8: bool) -> DecodeConfig:
    return INT8_DEFAULT if int8 else FP16_DEFAULT


# The running max starts at -1e30 (a literal in the kernels: Triton reads no plain globals): finite, so a lane
# or row that saw only masked scores rescales by 2^0 instead of 2^(-inf + inf) = NaN.


@jit
def _mha_tile(k_base, v_base, KSZ, VSZ, table, offs, hi, h, s_blk, s_tok, z_blk, z_tok, z_head,
              HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, INT8: tl.constexpr):
    """Tokens offs (N,) of one head: keys and values (N, D) as stored, int8 (scale, zero) (N,) each (else 0)."""
    valid = offs < hi
    d = tl.arange(0, HEAD_DIM)
    blk = tl.load(table + offs // BS, mask=valid, other=0).to(tl.int64)
    rows = blk * s_blk + (offs % BS) * s_tok  # (N,) element offset of each token's row
    k = tl.load(k_base + rows[:, None] + d[None, :], mask=valid[:, None], other=0)
    v = tl.load(v_base + rows[:, None] + d[None, :], mask=valid[:, None], other=0)
    if INT8:
        zr = blk * z_blk + (offs % BS) * z_tok + h * z_head
        ks, kz = tl.load(KSZ + zr, mask=valid, other=0.0), tl.load(KSZ + zr + 1, mask=valid, other=0.0)
        vs, vz = tl.load(VSZ + zr, mask=valid, other=0.0), tl.load(VSZ + zr + 1, mask=valid, other=0.0)
    else:
        ks = tl.zeros((BLOCK_N,), tl.float32)
        kz, vs, vz = ks, ks, ks
    return k, v, ks, kz, vs, vz


@jit
def _decode_mha_kernel(
    Q, K, V, KSZ, VSZ, TABLES, LENS, OUT, PART_M, PART_L, scale_log2, num_heads, num_splits,
    stride_qb, stride_qh, stride_tb, s_blk, s_tok, s_head, z_blk, z_tok, z_head, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, INT8: tl.constexpr, IS_SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr, ASM: tl.constexpr,
):
    """One query head per kv head, on CUDA cores. Each of the tile's BLOCK_N lanes keeps its own running max,
    sum and (N, D) accumulator, so the loop has no cross-warp reduction; the lanes merge once at the end.
    PREFETCH loads tile i + 1 before computing tile i (the compiler does not pipeline loads that feed no dot)."""
    h, b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = split_range(LENS, b, split, num_splits, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale_log2  # (D,) scores in log2 units
    qsum = tl.sum(q, 0)  # for the int8 zero-point term
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    l_sum = tl.zeros((BLOCK_N,), tl.float32)
    corr = tl.zeros((BLOCK_N,), tl.float32)  # int8: weight * scale * zero per lane, taken off acc at the end
    acc = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    table = TABLES + b.to(tl.int64) * stride_tb
    k_base, v_base = K + h * s_head, V + h * s_head
    lanes = tl.arange(0, BLOCK_N)
    if PREFETCH:
        k, v, ks, kz, vs, vz = _mha_tile(k_base, v_base, KSZ, VSZ, table, lo + lanes, hi, h, s_blk, s_tok, z_blk,
                                         z_tok, z_head, HEAD_DIM, BS, BLOCK_N, INT8)
    for start in range(lo, hi, BLOCK_N):
        valid = start + lanes < hi
        if PREFETCH:  # the next tile (all masked past the end: no traffic)
            nk, nv, nks, nkz, nvs, nvz = _mha_tile(k_base, v_base, KSZ, VSZ, table, start + BLOCK_N + lanes, hi, h,
                                                   s_blk, s_tok, z_blk, z_tok, z_head, HEAD_DIM, BS, BLOCK_N, INT8)
        else:
            k, v, ks, kz, vs, vz = _mha_tile(k_base, v_base, KSZ, VSZ, table, start + lanes, hi, h, s_blk, s_tok,
                                             z_blk, z_tok, z_head, HEAD_DIM, BS, BLOCK_N, INT8)
        if INT8:
            kf, vf = codes_f32(k, ASM), codes_f32(v, ASM)
        else:
            kf, vf = k.to(tl.float32), v.to(tl.float32)
        s = tl.sum(q[None, :] * kf, 1)  # (N,)
        if INT8:
            s = ks * (s - kz * qsum)  # q . scale (c - zero)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, s)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l_sum = l_sum * alpha + p
        if INT8:  # weight the codes; the zero points come off once at the end
            p = p * vs
            corr = corr * alpha + p * vz
        acc = acc * alpha[:, None] + p[:, None] * vf
        m = m_new
        if PREFETCH:
            k, v, ks, kz, vs, vz = nk, nv, nks, nkz, nvs, nvz
    top = tl.max(m[None, :], 1)  # (1,)
    w = tl.exp2(m - top)  # (N,) each lane's rescale to the common max
    out = tl.sum(w[:, None] * acc, 0)[None, :]  # (1, D)
    if INT8:
        out = out - tl.sum((w * corr)[None, :], 1)[:, None]
    heads = h + tl.arange(0, 1)
    finish(OUT, PART_M, PART_L, out, top, tl.sum((w * l_sum)[None, :], 1), b, heads, heads < num_heads, split,
            num_splits, num_heads, stride_ob, stride_oh, HEAD_DIM, IS_SPLIT)


@jit
def _decode_int8_two_pass_kernel(
    Q, K, V, KSZ, VSZ, TABLES, LENS, OUT, PART_M, PART_L, SCORES, scale_log2, num_heads, num_splits,
    stride_qb, stride_qh, stride_tb, s_blk, s_tok, s_head, z_blk, z_tok, z_head, stride_ob, stride_oh, stride_sr,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, ASM: tl.constexpr,
):
    """int8 MHA on CUDA cores in two passes over the split: the scores (kept in SCORES, (B * H, table tokens)
    fp32, about 1.5% of the codes' bytes) and their max, then the values with final softmax weights, so the
    (N, D) accumulator is never rescaled and each token takes one exp2."""
    h, b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = split_range(LENS, b, split, num_splits, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale_log2  # (D,) scores in log2 units
    qsum = tl.sum(q, 0)
    table = TABLES + b.to(tl.int64) * stride_tb
    k_base, v_base = K + h * s_head, V + h * s_head
    srow = SCORES + (b * num_heads + h).to(tl.int64) * stride_sr
    lanes = tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k, _, ks, kz, _, _ = _mha_tile(k_base, k_base, KSZ, KSZ, table, start + lanes, hi, h, s_blk, s_tok, z_blk,
                                       z_tok, z_head, HEAD_DIM, BS, BLOCK_N, True)
        s = ks * (tl.sum(q[None, :] * codes_f32(k, ASM), 1) - kz * qsum)  # q . scale (c - zero)
        s = tl.where(start + lanes < hi, s, float("-inf"))
        tl.store(srow + start + lanes, s, mask=start + lanes < hi)
        m = tl.maximum(m, s)
    top = tl.max(m[None, :], 1)  # (1,)
    tl.debug_barrier()  # the scores other threads of this program stored
    l_sum = tl.zeros((BLOCK_N,), tl.float32)
    corr = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        _, v, _, _, vs, vz = _mha_tile(v_base, v_base, VSZ, VSZ, table, start + lanes, hi, h, s_blk, s_tok, z_blk,
                                       z_tok, z_head, HEAD_DIM, BS, BLOCK_N, True)
        p = tl.exp2(tl.load(srow + start + lanes, mask=start + lanes < hi, other=float("-inf")) - top)
        l_sum += p
        p = p * vs
        acc += p[:, None] * codes_f32(v, ASM)
        corr += p * vz
    out = tl.sum(acc, 0)[None, :] - tl.sum(corr[None, :], 1)[:, None]  # (1, D)
    heads = h + tl.arange(0, 1)
    finish(OUT, PART_M, PART_L, out, top, tl.sum(l_sum[None, :], 1), b, heads, heads < num_heads, split,
           num_splits, num_heads, stride_ob, stride_oh, HEAD_DIM, IS_SPLIT)


@jit
def _offset_values(acc, corr, p, v, VSZ, zr, valid, ASM: tl.constexpr):
    """acc (GP, D) += (p scale) @ (1024 + codes), corr (GP,) += (p scale) . (1024 + zero): acc - corr is
    p @ scale (codes - zero). Both use the same fp16-rounded weights, so the offset cancels exactly and the error
    is the fp16 path's rounding of p; a subnormal p * scale errs by at most 2^-25 absolute."""
    w = (p * tl.load(VSZ + zr, mask=valid, other=0.0)[None, :]).to(tl.float16)  # (GP, N)
    vz = tl.load(VSZ + zr + 1, mask=valid, other=0.0) + 1024.0
    corr += tl.sum(w.to(tl.float32) * vz[None, :], 1)
    return acc + tl.dot(w, codes_f16_offset(v, ASM)), corr


@jit
def _decode_gqa_kernel(
    Q, K, V, KSZ, VSZ, TABLES, LENS, OUT, PART_M, PART_L, scale_log2, num_heads, num_splits,
    stride_qb, stride_qh, stride_tb, s_blk, s_tok, s_head, z_blk, z_tok, z_head, stride_ob, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    INT8: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr, OFFSET: tl.constexpr,
):
    """The G query heads of one kv head (padded to GP >= 16 rows) on tensor cores: each tile is loaded once.
    OFFSET (int8, DOT_DTYPE fp16): the dots take codes as 1024 + c; the offset joins the zero points."""
    kvh, b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = split_range(LENS, b, split, num_splits, BLOCK_N)
    g = tl.arange(0, GP)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * G + g  # (GP,) rows past G are padding
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = q.to(DOT_DTYPE)
    qsum = tl.sum(q.to(tl.float32), 1)  # (GP,) for the int8 zero-point term
    m = tl.full((GP,), -1.0e30, tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, HEAD_DIM), tl.float32)
    corr = tl.zeros((GP,), tl.float32)  # OFFSET: sum of weight * scale * (1024 + zero), taken off acc at the end
    table = TABLES + b.to(tl.int64) * stride_tb
    k_base, v_base = K + kvh * s_head, V + kvh * s_head
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = offs < hi
        blk = tl.load(table + offs // BS, mask=valid, other=0).to(tl.int64)
        rows = blk * s_blk + (offs % BS) * s_tok
        k = tl.load(k_base + rows[:, None] + d[None, :], mask=valid[:, None], other=0)
        v = tl.load(v_base + rows[:, None] + d[None, :], mask=valid[:, None], other=0)
        zr = blk * z_blk + (offs % BS) * z_tok + kvh * z_head
        if OFFSET:  # q . (1024 + c) - (1024 + zero) sum(q) = q . (c - zero)
            s = tl.dot(q, tl.trans(codes_f16_offset(k, ASM)))  # (GP, N)
            kz = tl.load(KSZ + zr + 1, mask=valid, other=0.0) + 1024.0
            s = tl.load(KSZ + zr, mask=valid, other=0.0)[None, :] * (s - kz[None, :] * qsum[:, None])
        elif INT8:
            s = tl.dot(q, tl.trans(codes_f32(k, ASM).to(DOT_DTYPE)))  # int8 codes are exact in fp16/bf16
            ks = tl.load(KSZ + zr, mask=valid, other=0.0)
            s = ks[None, :] * (s - tl.load(KSZ + zr + 1, mask=valid, other=0.0)[None, :] * qsum[:, None])
            # dequantize v: weight * scale would fall into fp16's subnormals as a dot operand
            v = tl.load(VSZ + zr, mask=valid, other=0.0)[:, None] * (
                codes_f32(v, ASM) - tl.load(VSZ + zr + 1, mask=valid, other=0.0)[:, None])
        else:
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))  # (GP, N)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])  # (GP, N)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        if OFFSET:
            acc, corr = _offset_values(acc * alpha[:, None], corr * alpha, p, v, VSZ, zr, valid, ASM)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
        m = m_new
    if OFFSET:
        acc = acc - corr[:, None]
    finish(OUT, PART_M, PART_L, acc, m, l_sum, b, heads, g < G, split, num_splits, num_heads, stride_ob,
            stride_oh, HEAD_DIM, IS_SPLIT)


def paged_decode_attention_triton(
    q: Tensor, kv: PagedKV, block_tables: Tensor, context_lens: Tensor, scale: float,
    config: DecodeConfig | None = None,
) -> Tensor:
    """q (B, H, D), one token per sequence (rotated, LogN-scaled) -> (B, H, D): row b attends to the first
    context_lens[b] >= 1 tokens of block_tables[b] (B, W), which must name blocks for all of them."""
    cfg = config or default_config(kv.int8)
    (bsz, heads, d), hkv = q.shape, kv.num_kv_heads
    group = heads // hkv
    splits = choose_splits(bsz, hkv, block_tables.shape[1] * kv.block_size, cfg, num_sms(q.device))
    out, target, part_m, part_l = split_outputs(q, splits)
    ksz = kv.k_sz if kv.int8 else kv.k  # never read when INT8 is False
    vsz = kv.v_sz if kv.int8 else kv.v
    strides = kv_strides(kv.k, kv.block_size, kv.block_major)
    if kv_strides(kv.v, kv.block_size, kv.block_major) != strides or q.stride(-1) != 1:
        raise ValueError("k and v must share strides, and q's last dimension must be contiguous")
    args = (q, kv.k, kv.v, ksz, vsz, block_tables, context_lens, target, part_m, part_l, scale * LOG2E, heads,
            splits, q.stride(0), q.stride(1), block_tables.stride(0), *strides,
            *kv_strides(ksz, kv.block_size, kv.block_major), out.stride(0), out.stride(1))
    meta = dict(HEAD_DIM=d, BS=kv.block_size, BLOCK_N=cfg.block_n, IS_SPLIT=splits > 1, ASM=cfg.asm and use_asm(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    offset = cfg.offset and kv.int8
    if group == 1 and not cfg.use_dot and kv.int8 and cfg.two_pass and not offset:
        scores = q.new_empty((bsz * heads, block_tables.shape[1] * kv.block_size), dtype=torch.float32)
        _decode_int8_two_pass_kernel[(hkv, bsz, splits)](*args[:10], scores, *args[10:], scores.stride(0), **meta)
    elif group == 1 and not cfg.use_dot and not offset:
        _decode_mha_kernel[(hkv, bsz, splits)](*args, INT8=kv.int8, PREFETCH=cfg.prefetch, **meta)
    else:  # tl.dot needs 16 rows: the group is padded
        gp = max(16, triton.next_power_of_2(group))
        dtype = tl.float16 if offset else dot_dtype(q.dtype)  # 1024 + code is exact in fp16, not in bf16
        _decode_gqa_kernel[(hkv, bsz, splits)](*args, G=group, GP=gp, INT8=kv.int8, DOT_DTYPE=dtype,
                                               OFFSET=offset, **meta)
    if splits > 1:
        merge_splits(target, part_m, part_l, out, splits)
    return out


def paged_decode_attention(
    q: Tensor, kv: PagedKV, block_tables: Tensor, context_lens: Tensor, scale: float,
    config: DecodeConfig | None = None,
) -> Tensor:
    """Decode attention (B, H, D) -> (B, H, D): int8 MHA pools take the CUDA kernel where it compiles
    (paged_attention_cuda.py), other pools the Triton kernel on CUDA, else the gather reference."""
    if config is None and cuda_int8_supported(q, kv, block_tables, context_lens):
        out = paged_decode_int8_cuda(q, kv, block_tables, context_lens, scale)
        if out is not None:
            return out
    if triton_supports(q, q.shape[1], kv):
        return paged_decode_attention_triton(q, kv, block_tables, context_lens, scale, config)
    cu = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_reference(q, kv, block_tables, cu, context_lens, 1, scale)
