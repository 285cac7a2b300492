"""Tensor-core W4A16 kernel (any M, padded to 16 rows) and the dequantize kernel, on the repacked layout.

The weight tile is the dot's left operand, out^T (N, M) = W (N, K) @ x^T (K, M), so N fills the MMA's 64-row
side and M <= 16 pads only x. Dequantization stays in 16-bit lanes: one lop3 per two nibbles turns a word's bits
4t and 4t + 16 (k = 8j + 2t, 8j + 2t + 1) into two halves 1024 + q (fp16; 128 + q in bf16), one sub.f16x2 removes
1024 + z exactly, and the group's scale multiplies the fp32 accumulator once per K tile (one group per tile).
"""

from __future__ import annotations

from qwen_awq.kernels.w4a16_common import finish_tile, jit, load_x, scale_zero, tl

# Two 16-bit lanes of 1024.0 (fp16 0x6400) or 128.0 (bf16 0x4300): 4-bit codes OR-ed into their mantissas.
MAGIC_FP16, MAGIC_BF16 = 0x64006400, 0x43004300


@jit
def _half(u, HI: tl.constexpr, BF16: tl.constexpr):
    if HI:
        u = u >> 16
    if BF16:  # one return per function: Triton 3.6 rejects returns of different types, constexpr or not
        v = u.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        v = u.to(tl.int16).to(tl.float16, bitcast=True)
    return v


@jit
def _unpack(w, magic, BLOCK_N: tl.constexpr, BKW: tl.constexpr, BF16: tl.constexpr):
    """(BLOCK_N, BKW) words -> (BLOCK_N, 8 BKW) 16-bit floats C + q, k = 8 * word + 2t + h.

    The joins nest so that h (low or high half of one lop3 result) is the fastest in-register index: the two
    halves of a result sit side by side and no byte permutes are needed to pair them again."""
    u0 = (w & 0x000F000F) | magic
    u1 = ((w >> 4) & 0x000F000F) | magic
    u2 = ((w >> 8) & 0x000F000F) | magic
    u3 = ((w >> 12) & 0x000F000F) | magic
    lo = tl.join(tl.join(_half(u0, False, BF16), _half(u2, False, BF16)),
                 tl.join(_half(u1, False, BF16), _half(u3, False, BF16)))  # (.., 2, 2): t = 2a + b
    hi = tl.join(tl.join(_half(u0, True, BF16), _half(u2, True, BF16)),
                 tl.join(_half(u1, True, BF16), _half(u3, True, BF16)))
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BKW * 8))


@jit
def _minus_zero(a, zz, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """a - zz[:, None] exactly ((C + q) - (C + z) = q - z); on the GPU two lanes per instruction."""
    zb = zz[:, None] + tl.zeros_like(a)
    if USE_ASM:  # elementwise on packed pairs, so correct in any register layout
        if BF16:
            d = tl.inline_asm_elementwise("sub.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, zb],
                                          dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            d = tl.inline_asm_elementwise("sub.f16x2 $0, $1, $2;", "=r,r,r", [a, zb],
                                          dtype=tl.float16, is_pure=True, pack=2)
    else:
        d = (a.to(tl.float32) - zb.to(tl.float32)).to(a.dtype)  # exact; the interpreter mis-adds bf16
    return d


@jit
def _times_scale(d, s, USE_ASM: tl.constexpr, BF16: tl.constexpr):
    """(q - z) * s[:, None] in d's dtype: the weights the reference dequantizes (fp16: the same rounding)."""
    if USE_ASM:
        sb = s[:, None].to(d.dtype) + tl.zeros_like(d)
        if BF16:
            w = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [d, sb],
                                          dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [d, sb],
                                          dtype=tl.float16, is_pure=True, pack=2)
    else:
        w = (d.to(tl.float32) * s[:, None]).to(d.dtype)
    return w


@jit
def _weights(qw_ptr, sz_ptr, rows, it, N, KW, KG, magic, G: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr, BF16_SCALES: tl.constexpr):
    """K tile `it` of BLOCK_N rows: (q - z) in x's dtype (BLOCK_N, BLOCK_K) and the fp32 scales (BLOCK_N,)."""
    BKW: tl.constexpr = BLOCK_K // 8
    kw = it * BKW + tl.arange(0, BKW)
    w = tl.load(qw_ptr + rows[:, None] * KW + kw[None, :], mask=rows[:, None] < N, other=0)
    sz = tl.load(sz_ptr + rows * KG + it * BLOCK_K // G, mask=rows < N, other=0)
    s, z = scale_zero(sz, BF16_SCALES)
    a = _unpack(w, magic, BLOCK_N, BKW, BF16)
    if BF16:
        zz = (z + 128.0).to(tl.bfloat16)
    else:
        zz = (z + 1024.0).to(tl.float16)
    return _minus_zero(a, zz, USE_ASM, BF16), s


@jit
def mma_kernel(x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
               M, N, KW, KG, stride_xm, up_offset, iters_per_split, n_splits, magic,
               G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SILU: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BF16: tl.constexpr,
               BF16_SCALES: tl.constexpr, USE_ASM: tl.constexpr, SCALE_W: tl.constexpr):
    """Grid (N tiles, M tiles, K splits); BLOCK_K divides G, so each K tile has one scale per row. SCALE_W
    scales the weights before the dot (one packed multiply per two weights) so the MMAs accumulate in place
    and can overlap the next tile's dequantization; otherwise the fp32 accumulator takes the scale per tile."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m[None, :] < M
    start = pid_k * iters_per_split
    end = tl.minimum(start + iters_per_split, KW * 8 // BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(start, end):
        a, s = _weights(qw_ptr, sz_ptr, rows, it, N, KW, KG, magic, G, BLOCK_N, BLOCK_K, USE_ASM, BF16,
                        BF16_SCALES)
        offs_k = it * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm
        if SILU:
            xt = load_x(x_ptrs, offs_k[:, None], m_ok, up_offset, True).to(a.dtype)  # (BLOCK_K, BLOCK_M)
        else:
            xt = tl.load(x_ptrs + offs_k[:, None], mask=m_ok, other=0.0)
        if SCALE_W:
            acc = tl.dot(_times_scale(a, s, USE_ASM, BF16), xt, acc)
        else:
            acc += s[:, None] * tl.dot(a, xt)
    idx = offs_m[None, :] * N + rows[:, None]  # (BLOCK_N, BLOCK_M): out is (M, N)
    mask = m_ok & (rows[:, None] < N)
    tile = pid_m * tl.num_programs(0) + pid_n
    finish_tile(acc, out_ptr, part_ptr, bias_ptr, lock_ptr, idx, rows[:, None], mask, M * N, tile, pid_k,
                n_splits, HAS_BIAS, SPLIT)


@jit
def dequant_kernel(qw_ptr, sz_ptr, out_ptr, N, KW, KG, magic, G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr, BF16: tl.constexpr, BF16_SCALES: tl.constexpr):
    """W (N, K) in out's dtype = (q - z) * s rounded once, as packing.dequantize_repacked; grid (N, K tiles)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    it = tl.program_id(1)
    a, s = _weights(qw_ptr, sz_ptr, rows, it, N, KW, KG, magic, G, BLOCK_N, BLOCK_K, USE_ASM, BF16, BF16_SCALES)
    offs_k = it * BLOCK_K + tl.arange(0, BLOCK_K)
    w = (a.to(tl.float32) * s[:, None]).to(out_ptr.dtype.element_ty)  # exact product, one rounding
    tl.store(out_ptr + rows[:, None] * (KW * 8) + offs_k[None, :], w, mask=rows[:, None] < N)
