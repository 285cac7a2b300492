"""Fused rotary + KV write: the qkv projection's output -> rotated, LogN-scaled q, with rotated k and v stored
in the paged pool (model dtype, or Qwen's int8 codes with their (scale, zero)) in one kernel launch.

Bit-exact with rotary_kv_write_reference: the same fp32 operations in the same order (FMA contraction off, IEEE
division), the same roundings to the model dtype. int8 takes one range per (token, head), which is Qwen's scheme
for a one-token chunk; for Qwen's shared range per (sequence, head) over a longer chunk, pass chunk_seq: a first
kernel then reduces each chunk's range with atomics.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qwen_awq.kernels.paged_common import jit, kv_strides, tl, triton, triton_supports
from qwen_awq.kernels.paged_reference import INT8_LEVELS, MIN_SCALE, PagedKV, rotary_kv_write_reference

ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (x + M) - M rounds an fp32 |x| < 2^22 half-to-even (literal in _codes)
BLOCK_H = 8  # heads per program: (8, D/2) tiles keep one token's q in a few programs


@jit
def _rotate(X, heads, live, half, cos, sin, HALF: tl.constexpr):
    """Rows `heads` of one token's q or k block at X -> the rotated halves (BH, D/2), rounded to X's dtype."""
    ptrs = X + heads[:, None] * (2 * HALF) + half[None, :]
    x1 = tl.load(ptrs, mask=live[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=live[:, None], other=0.0).to(tl.float32)
    dtype = X.dtype.element_ty
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@jit
def _codes(x, scale, zero, levels):
    """fp32 round-half-even(x / scale + zero) clamped to 0..levels, as uint8 (the reference's torch.round)."""
    y = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], x.shape)) + zero[:, None]
    return tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, 0.0), levels).to(tl.uint8)  # ROUND_MAGIC


@jit
def _quantize_store(dst, sz_dst, x1, x2, lo, hi, live, levels, inv_levels, min_scale, HALF: tl.constexpr):
    """Halves (BH, D/2) -> uint8 codes at dst, (scale, zero) at sz_dst; lo/hi (BH,) the range to cover."""
    scale = tl.maximum((hi - lo) * inv_levels, min_scale)
    zero = tl.math.div_rn(-lo, scale)
    tl.store(dst, _codes(x1, scale, zero, levels), mask=live[:, None])
    tl.store(dst + HALF, _codes(x2, scale, zero, levels), mask=live[:, None])
    tl.store(sz_dst, scale, mask=live)
    tl.store(sz_dst + 1, zero, mask=live)


@jit
def _row_range(x1, x2):
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return tl.minimum(tl.min(x1, 1), tl.min(x2, 1)), tl.maximum(tl.max(x1, 1), tl.max(x2, 1))


@jit
def _chunk_range_kernel(QKV, COS, SIN, SEQ, RANGE, stride_t, H: tl.constexpr, HKV: tl.constexpr,
                        HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """RANGE (B, Hkv, 4) <- per (sequence, head) min/max of the rotated k and of v over the step's chunk."""
    t, tile = tl.program_id(0), tl.program_id(1)
    half = tl.arange(0, HALF)
    cos = tl.load(COS + t * HALF + half)[None, :]
    sin = tl.load(SIN + t * HALF + half)[None, :]
    heads = tile * BLOCK_H + tl.arange(0, BLOCK_H)
    live = heads < HKV
    row = QKV + t.to(tl.int64) * stride_t
    k1, k2 = _rotate(row + H * 2 * HALF, heads, live, half, cos, sin, HALF)
    vp = row + (H + HKV) * 2 * HALF + heads[:, None] * (2 * HALF) + half[None, :]
    v1 = tl.load(vp, mask=live[:, None], other=0.0)
    v2 = tl.load(vp + HALF, mask=live[:, None], other=0.0)
    dst = RANGE + (tl.load(SEQ + t).to(tl.int64) * HKV + heads) * 4
    k_lo, k_hi = _row_range(k1, k2)
    v_lo, v_hi = _row_range(v1, v2)
    tl.atomic_min(dst, k_lo, mask=live)
    tl.atomic_max(dst + 1, k_hi, mask=live)
    tl.atomic_min(dst + 2, v_lo, mask=live)
    tl.atomic_max(dst + 3, v_hi, mask=live)


@jit
def _rotary_kv_kernel(
    QKV, COS, SIN, LOGN, SLOTS, QOUT, KC, VC, KSZ, VSZ, SEQ, RANGE, levels, inv_levels, min_scale,
    stride_t, stride_qo, s_blk, s_tok, s_head, z_blk, z_tok, z_head,
    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BS: tl.constexpr, BLOCK_H: tl.constexpr,
    NQ: tl.constexpr, HAS_LOGN: tl.constexpr, INT8: tl.constexpr, SHARED: tl.constexpr,
):
    t, tile = tl.program_id(0), tl.program_id(1)  # tiles 0..NQ-1 rotate q heads, the rest write k/v heads
    half = tl.arange(0, HALF)
    cos = tl.load(COS + t * HALF + half)[None, :]  # (1, D/2) fp32
    sin = tl.load(SIN + t * HALF + half)[None, :]
    row = QKV + t.to(tl.int64) * stride_t
    if tile < NQ:
        heads = tile * BLOCK_H + tl.arange(0, BLOCK_H)
        live = heads < H
        r1, r2 = _rotate(row, heads, live, half, cos, sin, HALF)
        if HAS_LOGN:  # the reference scales the rounded rotation and rounds again
            logn = tl.load(LOGN + t)
            r1, r2 = (r1.to(tl.float32) * logn).to(r1.dtype), (r2.to(tl.float32) * logn).to(r2.dtype)
        dst = QOUT + t.to(tl.int64) * stride_qo + heads[:, None] * (2 * HALF) + half[None, :]
        tl.store(dst, r1, mask=live[:, None])
        tl.store(dst + HALF, r2, mask=live[:, None])
    else:
        heads = (tile - NQ) * BLOCK_H + tl.arange(0, BLOCK_H)
        live = heads < HKV
        k1, k2 = _rotate(row + H * 2 * HALF, heads, live, half, cos, sin, HALF)
        vp = row + (H + HKV) * 2 * HALF + heads[:, None] * (2 * HALF) + half[None, :]
        v1 = tl.load(vp, mask=live[:, None], other=0.0)
        v2 = tl.load(vp + HALF, mask=live[:, None], other=0.0)
        slot = tl.load(SLOTS + t).to(tl.int64)
        base = (slot // BS) * s_blk + (slot % BS) * s_tok + heads[:, None] * s_head + half[None, :]
        if INT8:
            zb = (slot // BS) * z_blk + (slot % BS) * z_tok + heads * z_head
            if SHARED:
                rng = RANGE + (tl.load(SEQ + t).to(tl.int64) * HKV + heads) * 4
                kl, kh = tl.load(rng, mask=live, other=0.0), tl.load(rng + 1, mask=live, other=0.0)
                vl, vh = tl.load(rng + 2, mask=live, other=0.0), tl.load(rng + 3, mask=live, other=0.0)
            else:
                kl, kh = _row_range(k1, k2)
                vl, vh = _row_range(v1, v2)
            _quantize_store(KC + base, KSZ + zb, k1, k2, kl, kh, live, levels, inv_levels, min_scale, HALF)
            _quantize_store(VC + base, VSZ + zb, v1, v2, vl, vh, live, levels, inv_levels, min_scale, HALF)
        else:
            out_dtype = KC.dtype.element_ty
            tl.store(KC + base, k1.to(out_dtype), mask=live[:, None])
            tl.store(KC + base + HALF, k2.to(out_dtype), mask=live[:, None])
            tl.store(VC + base, v1.to(out_dtype), mask=live[:, None])
            tl.store(VC + base + HALF, v2.to(out_dtype), mask=live[:, None])


def rotary_kv_write_triton(
    qkv: Tensor, cos: Tensor, sin: Tensor, logn: Tensor | None, slot_mapping: Tensor, kv: PagedKV, num_heads: int,
    chunk_seq: Tensor | None = None, num_seqs: int = 0,
) -> Tensor:
    """Same contract as rotary_kv_write_reference; qkv (T, (H + 2 Hkv) D) with unit stride along features."""
    t, hkv, d = qkv.shape[0], kv.num_kv_heads, kv.head_dim
    if qkv.shape[1] != (num_heads + 2 * hkv) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be (T, {(num_heads + 2 * hkv) * d}) with contiguous features, got {qkv.shape}")
    if not kv.int8 and kv.k.dtype != qkv.dtype:
        raise ValueError(f"the pool holds {kv.k.dtype} but qkv is {qkv.dtype}")
    q = qkv.new_empty((t, num_heads, d))
    if t == 0:
        return q
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    shared = kv.int8 and chunk_seq is not None
    nq, nkv = triton.cdiv(num_heads, BLOCK_H), triton.cdiv(hkv, BLOCK_H)
    if shared:  # [k_lo, k_hi, v_lo, v_hi] per (sequence, head), reduced over each chunk
        rng = torch.tensor([float("inf"), float("-inf")] * 2, device=qkv.device).repeat(num_seqs, hkv, 1)
        _chunk_range_kernel[(t, nkv)](qkv, cos, sin, chunk_seq, rng, qkv.stride(0), H=num_heads, HKV=hkv,
                                      HALF=d // 2, BLOCK_H=BLOCK_H, enable_fp_fusion=False)
    else:
        rng = cos  # never read
    ksz = kv.k_sz if kv.int8 else kv.k  # never read when INT8 is False
    vsz = kv.v_sz if kv.int8 else kv.v
    strides = kv_strides(kv.k, kv.block_size, kv.block_major) + kv_strides(ksz, kv.block_size, kv.block_major)
    _rotary_kv_kernel[(t, nq + nkv)](
        qkv, cos, sin, cos if logn is None else logn, slot_mapping, q, kv.k, kv.v, ksz, vsz,
        slot_mapping if chunk_seq is None else chunk_seq, rng, float(INT8_LEVELS), 1.0 / INT8_LEVELS, MIN_SCALE,
        qkv.stride(0), q.stride(0), *strides,
        H=num_heads, HKV=hkv, HALF=d // 2, BS=kv.block_size, BLOCK_H=BLOCK_H, NQ=nq, HAS_LOGN=logn is not None,
        INT8=kv.int8, SHARED=shared, enable_fp_fusion=False,
    )
    return q


def rotary_kv_write(
    qkv: Tensor, cos: Tensor, sin: Tensor, logn: Tensor | None, slot_mapping: Tensor, kv: PagedKV, num_heads: int,
    chunk_seq: Tensor | None = None, num_seqs: int = 0,
) -> Tensor:
    """Rotate q/k, scale q by LogN, write k/v into the pool: one Triton kernel on CUDA, else the reference."""
    if triton_supports(qkv, num_heads, kv):
        return rotary_kv_write_triton(qkv, cos, sin, logn, slot_mapping, kv, num_heads, chunk_seq, num_seqs)
    return rotary_kv_write_reference(qkv, cos, sin, logn, slot_mapping, kv, num_heads, chunk_seq, num_seqs)

