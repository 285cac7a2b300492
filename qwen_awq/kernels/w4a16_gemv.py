"""CUDA-core W4A16 GEMV for decode (M = 1, and small M by one program row per x row) on the repacked layout.

Each program keeps one K range of x in registers (32 consecutive k per lane and chunk) and streams its output
rows past it: a lane loads 16 bytes (4 words = 32 k of one row), so the k reduction stays in-thread until one
warp shuffle per row. Per nibble: one shift per two nibbles, one lop3 that drops the nibble into the mantissa of
256.0 or 16.0 (so the word holds 256 + q or 16 + q exactly), one FFMA. Scale and zero apply once per 32 k:
sum_k x_k (q_k - z) s = s * (sum_k x_k (C_k + q_k) - sum_k C_k x_k - z sum_k x_k), the x sums shared by all rows.
"""

from __future__ import annotations

from qwen_awq.kernels.w4a16_common import arrive, jit, load_x, release, scale_zero, store_out, sum_partials, tl

# fp32 bit patterns of 256.0 and 16.0: a nibble in bits 15..18 (19..22) of a float with one of these
# exponents and an empty mantissa reads as 256 + q (16 + q). Passed as runtime arguments so that ptxas
# fuses "& mask | magic" into one lop3 (two immediates cannot share one instruction).
MAGIC_256, MAGIC_16 = 0x43800000, 0x41800000


@jit
def _slots(w, SHIFT: tl.constexpr, magic_256, magic_16):
    """Slots (2p, 2p + 1) of words w (bits 8p..8p+7) moved to bits 15..22: fp32 256 + q and 16 + q."""
    if SHIFT > 0:
        v = w << SHIFT
    else:
        v = w >> (-SHIFT)  # arithmetic shift: the sign bits land above bit 22, outside both masks
    even = ((v & 0x78000) | magic_256).to(tl.float32, bitcast=True)
    odd = ((v & 0x780000) | magic_16).to(tl.float32, bitcast=True)
    return even, odd


@jit
def _row_block(qw_ptr, sz_ptr, rows, kw, grp, cmask, gmask, limit, KW, KG, MASK_ROWS: tl.constexpr):
    """Packed words (LANES, BLOCK_N, CHUNKS, 4) and scale_zero words (LANES, BLOCK_N, CHUNKS) of BLOCK_N rows;
    masked words stay undefined (they meet x = 0 and s = 0), masked scale_zero words read 0."""
    r4 = rows[None, :, None, None]
    r3 = rows[None, :, None]
    if MASK_ROWS:
        w = tl.load(qw_ptr + r4 * KW + kw, mask=cmask & (r4 < limit))
        sz = tl.load(sz_ptr + r3 * KG + grp, mask=gmask & (r3 < limit), other=0)
    else:
        w = tl.load(qw_ptr + r4 * KW + kw, mask=cmask)
        sz = tl.load(sz_ptr + r3 * KG + grp, mask=gmask, other=0)
    return w, sz


@jit
def _dot_rows(w, sz, x0, x1, x2, x3, x4, x5, x6, x7, csum, xsum, magic_256, magic_16,
              BF16_SCALES: tl.constexpr):
    """(BLOCK_N,) partial dot products of BLOCK_N rows with this program's K range of x."""
    e, o = _slots(w, 15, magic_256, magic_16)  # slots 0, 1: k offsets 0, 2
    acc = e * x0
    acc = acc + o * x1
    e, o = _slots(w, 7, magic_256, magic_16)  # slots 2, 3: k offsets 4, 6
    acc = acc + e * x2
    acc = acc + o * x3
    e, o = _slots(w, -1, magic_256, magic_16)  # slots 4, 5: k offsets 1, 3
    acc = acc + e * x4
    acc = acc + o * x5
    e, o = _slots(w, -9, magic_256, magic_16)  # slots 6, 7: k offsets 5, 7
    acc = acc + e * x6
    acc = acc + o * x7
    a = tl.sum(acc, axis=3)  # (LANES, BLOCK_N, CHUNKS): sum_k x_k (C_k + q_k) per 32-k chunk
    s, z = scale_zero(sz, BF16_SCALES)
    part = tl.sum(s * (a - csum - z * xsum), axis=2)  # (LANES, BLOCK_N)
    return tl.sum(part, axis=0)  # (BLOCK_N,): one warp shuffle tree per row


@jit
def _x_slots(x_ptr, kw, cmask, up_offset, SILU: tl.constexpr):
    """x at k = 8 * word + offset of each slot (offsets 0, 2, 4, 6, 1, 3, 5, 7: AWQ_ORDER), and the chunk sums
    sum_k C_k x_k and sum_k x_k (C = 256 for even slots, 16 for odd ones)."""
    k8 = kw * 8
    x0 = load_x(x_ptr, k8 + 0, cmask, up_offset, SILU)
    x1 = load_x(x_ptr, k8 + 2, cmask, up_offset, SILU)
    x2 = load_x(x_ptr, k8 + 4, cmask, up_offset, SILU)
    x3 = load_x(x_ptr, k8 + 6, cmask, up_offset, SILU)
    x4 = load_x(x_ptr, k8 + 1, cmask, up_offset, SILU)
    x5 = load_x(x_ptr, k8 + 3, cmask, up_offset, SILU)
    x6 = load_x(x_ptr, k8 + 5, cmask, up_offset, SILU)
    x7 = load_x(x_ptr, k8 + 7, cmask, up_offset, SILU)
    even = tl.sum(x0 + x2 + x4 + x6, axis=3)  # (LANES, 1, CHUNKS)
    odd = tl.sum(x1 + x3 + x5 + x7, axis=3)
    return x0, x1, x2, x3, x4, x5, x6, x7, 256.0 * even + 16.0 * odd, even + odd


@jit
def gemv_kernel(x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
                M, N, KW, KG, stride_xm, up_offset, rows_per_prog, n_splits, magic_256, magic_16,
                G: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr, CHUNKS: tl.constexpr,
                PREFETCH: tl.constexpr, EVEN_N: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                SPLIT: tl.constexpr, BF16_SCALES: tl.constexpr):
    """Grid (row programs, K splits, M): rows [pid_n * rows_per_prog, +rows_per_prog) of x row pid_m over
    K chunks [pid_k * LANES * CHUNKS, +LANES * CHUNKS), a chunk being 4 words = 32 k."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lane = tl.arange(0, LANES)[:, None, None, None]
    ck = (pid_k * LANES + lane) * CHUNKS + tl.arange(0, CHUNKS)[None, None, :, None]  # (LANES, 1, CHUNKS, 1)
    cmask = ck < KW // 4
    kw = ck * 4 + tl.arange(0, 4)[None, None, None, :]  # (LANES, 1, CHUNKS, 4) word index along K
    x0, x1, x2, x3, x4, x5, x6, x7, csum, xsum = _x_slots(x_ptr + pid_m * stride_xm, kw, cmask, up_offset, SILU)
    ck3 = tl.sum(ck, axis=3)  # (LANES, 1, CHUNKS)
    gmask = ck3 < KW // 4
    grp = ck3 * 32 // G  # the chunk's group (G is a multiple of 32)
    row0 = pid_n * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, N)
    tile = pid_m * tl.num_programs(0) + pid_n
    mn = M * N
    if PREFETCH:
        w, sz = _row_block(qw_ptr, sz_ptr, row0 + tl.arange(0, BLOCK_N), kw, grp, cmask, gmask, row_end, KW, KG, True)
    for r in range(row0, row_end, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        if PREFETCH:  # the next block's loads go out before this block's arithmetic
            nw, nsz = _row_block(qw_ptr, sz_ptr, rows + BLOCK_N, kw, grp, cmask, gmask, row_end, KW, KG, True)
        else:
            w, sz = _row_block(qw_ptr, sz_ptr, rows, kw, grp, cmask, gmask, row_end, KW, KG, not EVEN_N)
        y = _dot_rows(w, sz, x0, x1, x2, x3, x4, x5, x6, x7, csum, xsum, magic_256, magic_16, BF16_SCALES)
        if PREFETCH:
            w, sz = nw, nsz
        idx = pid_m * N + rows
        if SPLIT:
            tl.store(part_ptr + pid_k * mn + idx, y, mask=rows < row_end)
        else:
            store_out(y, out_ptr, bias_ptr, idx, rows, rows < row_end, HAS_BIAS)
    if SPLIT:
        if arrive(lock_ptr, tile, n_splits):
            for r in range(row0, row_end, BLOCK_N):
                rows = r + tl.arange(0, BLOCK_N)
                idx = pid_m * N + rows
                y = sum_partials(part_ptr, idx, rows < row_end, mn, n_splits, tl.zeros((BLOCK_N,), tl.float32))
                store_out(y, out_ptr, bias_ptr, idx, rows, rows < row_end, HAS_BIAS)
            release(lock_ptr, tile)
