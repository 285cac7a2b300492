"""Paged prefill / chunked-prefill attention: a varlen batch of query chunks attends to the cached prefix in the
pool plus causally within the chunk, read straight from the block tables, so mixed steps never gather.

A program owns BLOCK_M (token, query head) rows of one chunk and kv head: the G query heads of a GQA group share
each key tile. The chunk's own keys must already be in the pool (rotary_kv.rotary_kv_write puts them there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.paged_common import (
    LOG2E,
    codes_f32,
    dot_dtype,
    jit,
    kv_strides,
    tl,
    triton,
    triton_supports,
    use_asm,
)
from qwen_awq.kernels.paged_reference import PagedKV, paged_attention_reference


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape of the prefill kernel (tuned on an H200: bench/attention_bench.py)."""

    block_m: int = 64
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, name)
            if value < 16 and name != "num_warps" or value < 1 or value & (value - 1):
                raise ConfigError(f"PrefillConfig.{name} must be a power of two (tiles >= 16), found {value}")
        if self.num_stages < 1:
            raise ConfigError(f"PrefillConfig.num_stages must be positive, found {self.num_stages}")


@jit
def _kv_tile(base, SZ, rows, zr, valid, d, INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """(N, D) keys or values of one kv head for the tile's tokens, dequantized (Qwen's int8) in registers."""
    x = tl.load(base + rows[:, None] + d[None, :], mask=valid[:, None], other=0)
    if INT8:
        scale = tl.load(SZ + zr, mask=valid, other=0.0)
        zero = tl.load(SZ + zr + 1, mask=valid, other=0.0)
        x = scale[:, None] * (codes_f32(x, ASM) - zero[:, None])
    return x.to(DOT_DTYPE)


@jit
def _prefill_kernel(
    Q, K, V, KSZ, VSZ, TABLES, LENS, CU, OUT, scale_log2,
    stride_qt, stride_qh, stride_tb, s_blk, s_tok, s_head, z_blk, z_tok, z_head, stride_ot, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr,
):
    tile, kvh, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU + b).to(tl.int32)
    q_len = tl.load(CU + b + 1).to(tl.int32) - q_start
    if tile * BLOCK_M < q_len * G:
        ctx = tl.load(LENS + b).to(tl.int32)
        prefix = ctx - q_len  # tokens cached before this chunk
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) row = token * G + head within the group
        tok = r // G
        live = tok < q_len
        d = tl.arange(0, HEAD_DIM)
        q_rows = (q_start + tok).to(tl.int64) * stride_qt + (kvh * G + r % G) * stride_qh
        q = tl.load(Q + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0).to(DOT_DTYPE)
        qpos = prefix + tok  # (M,) absolute positions
        hi = prefix + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, q_len - 1) + 1  # keys the tile can see
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        table = TABLES + b.to(tl.int64) * stride_tb
        k_base, v_base = K + kvh * s_head, V + kvh * s_head
        for start in range(0, hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            valid = offs < hi
            blk = tl.load(table + offs // BS, mask=valid, other=0).to(tl.int64)
            rows = blk * s_blk + (offs % BS) * s_tok
            zr = blk * z_blk + (offs % BS) * z_tok + kvh * z_head
            k = _kv_tile(k_base, KSZ, rows, zr, valid, d, INT8, DOT_DTYPE, ASM)  # (N, D)
            v = _kv_tile(v_base, VSZ, rows, zr, valid, d, INT8, DOT_DTYPE, ASM)
            s = tl.dot(q, tl.trans(k)) * scale_log2  # (M, N)
            s = tl.where((offs[None, :] <= qpos[:, None]) & valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
            m = m_new
        out = acc / tl.where(l_sum == 0, 1.0, l_sum)[:, None]
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + (kvh * G + r % G) * stride_oh
        tl.store(OUT + o_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=live[:, None])


def paged_prefill_attention_triton(
    q: Tensor, kv: PagedKV, block_tables: Tensor, cu_seqlens: Tensor, context_lens: Tensor, max_query_len: int,
    scale: float, config: PrefillConfig | None = None,
) -> Tensor:
    """q (T, H, D), chunk b = rows cu_seqlens[b]:cu_seqlens[b+1] (B + 1 offsets) -> (T, H, D). Query j of a chunk
    of n tokens sits at context_lens[b] - n + j and sees keys 0..that position; max_query_len bounds n (host int)."""
    cfg = config or PrefillConfig()
    (t, heads, d), hkv = q.shape, kv.num_kv_heads
    group = heads // hkv
    out = torch.empty_like(q)
    bsz = block_tables.shape[0]
    if t == 0 or bsz == 0:
        return out
    ksz = kv.k_sz if kv.int8 else kv.k  # never read when INT8 is False
    vsz = kv.v_sz if kv.int8 else kv.v
    s_blk, s_tok, s_head = kv_strides(kv.k, kv.block_size, kv.block_major)
    z_strides = kv_strides(ksz, kv.block_size, kv.block_major)
    if kv_strides(kv.v, kv.block_size, kv.block_major) != (s_blk, s_tok, s_head) or q.stride(-1) != 1:
        raise ValueError("k and v must share strides, and q's last dimension must be contiguous")
    grid = (triton.cdiv(max_query_len * group, cfg.block_m), hkv, bsz)
    _prefill_kernel[grid](
        q, kv.k, kv.v, ksz, vsz, block_tables, context_lens, cu_seqlens, out, scale * LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), s_blk, s_tok, s_head, *z_strides,
        out.stride(0), out.stride(1), G=group, HEAD_DIM=d, BS=kv.block_size, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, INT8=kv.int8, DOT_DTYPE=dot_dtype(q.dtype), ASM=use_asm(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def paged_prefill_attention(
    q: Tensor, kv: PagedKV, block_tables: Tensor, cu_seqlens: Tensor, context_lens: Tensor, max_query_len: int,
    scale: float, config: PrefillConfig | None = None,
) -> Tensor:
    """Chunked-prefill attention over the pool: the Triton kernel on CUDA, else the gather reference."""
    if triton_supports(q, q.shape[1], kv):
        return paged_prefill_attention_triton(q, kv, block_tables, cu_seqlens, context_lens, max_query_len, scale,
                                              config)
    return paged_attention_reference(q, kv, block_tables, cu_seqlens, context_lens, max_query_len, scale)
