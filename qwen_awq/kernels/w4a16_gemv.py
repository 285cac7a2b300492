"""CUDA-core W4A16 GEMV for decode (M = 1, and a few x rows per program for small M) on the repacked layout.

Each program keeps one K range of x in registers (CHUNKS x 32 consecutive k per lane) and streams its output
rows past it: a lane loads 16 bytes per chunk (4 words = 32 k of one row), so the k reduction stays in-thread
until one warp shuffle per row. Per nibble: one shift per two nibbles, one lop3 that drops the nibble into the
mantissa of 256.0 or 16.0 (the word then reads 256 + q or 16 + q exactly), one FFMA. Scale and zero apply once
per lane and row (a lane's chunks share a group): sum_k x_k (q_k - z) s = s * (sum_k x_k (C_k + q_k)
- sum_k C_k x_k - z sum_k x_k), the x sums shared by all rows. Launch options (GemvConfig) pick the tile order
(rows_first: one lane per thread), how many row blocks are in flight, and how x is loaded; see gemv_kernel.
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
def _row_block(w_ptrs, sz_ptrs, rows, row_end, EVEN_N: tl.constexpr, RF: tl.constexpr = False):
    """Packed words (LANES, BLOCK_N, CHUNKS, 4) and scale_zero words (LANES, BLOCK_N) of one block of rows (RF:
    rows first, (BLOCK_N, LANES, ...)); masked only on a ragged last block (rows past it read 0)."""
    if EVEN_N:
        w = tl.load(w_ptrs)
        sz = tl.load(sz_ptrs)
    elif RF:
        w = tl.load(w_ptrs, mask=rows[:, None, None, None] < row_end, other=0)
        sz = tl.load(sz_ptrs, mask=rows[:, None] < row_end, other=0)
    else:
        w = tl.load(w_ptrs, mask=rows[None, :, None, None] < row_end, other=0)
        sz = tl.load(sz_ptrs, mask=rows[None, :] < row_end, other=0)
    return w, sz


@jit
def _block_at(w_ptrs, sz_ptrs, r, row0, last, row_end, KW, KG, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr,
              RF: tl.constexpr):
    """The block of rows starting at min(r, last) (last = the program's last block start), from pointers at row0:
    blocks prefetched past the end reload the last one (cache hits) so that nothing needs a mask."""
    r = tl.minimum(r, last)
    rows = r + tl.arange(0, BLOCK_N)
    return _row_block(w_ptrs + (r - row0) * KW, sz_ptrs + (r - row0) * KG, rows, row_end, EVEN_N, RF)


@jit
def _first_blocks(w_ptrs, sz_ptrs, row0, last, row_end, KW, KG, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr,
                  RF: tl.constexpr, PREFETCH: tl.constexpr):
    """The blocks in flight when the loop starts: rows row0.. and (PREFETCH = 2) the next block (else block 0
    again, unused)."""
    w, sz = _block_at(w_ptrs, sz_ptrs, row0, row0, last, row_end, KW, KG, EVEN_N, BLOCK_N, RF)
    w1, sz1 = w, sz
    if PREFETCH == 2:
        w1, sz1 = _block_at(w_ptrs, sz_ptrs, row0 + BLOCK_N, row0, last, row_end, KW, KG, EVEN_N, BLOCK_N, RF)
    return w, sz, w1, sz1


@jit
def _words(w):
    """(LANES, BLOCK_N, CHUNKS, 4) words -> their 4 words (LANES, BLOCK_N, CHUNKS) in order, in-register."""
    t = tl.reshape(w, (w.shape[0], w.shape[1], w.shape[2], 2, 2))  # word j = 2a + b
    lo, hi = tl.split(tl.permute(t, (0, 1, 2, 4, 3)))  # split on a: words (0, 1) and (2, 3)
    w0, w1 = tl.split(lo)
    w2, w3 = tl.split(hi)
    return w0, w1, w2, w3


@jit
def _x_slots(x_ptr, stride_xm, m0, M, ck3, cmask, up_offset, SILU: tl.constexpr, BLOCK_M: tl.constexpr,
             XVEC: tl.constexpr):
    """For each of BLOCK_M x rows: x at every (word j, slot i) of a lane's chunks, k = 32 * chunk + 8j +
    (0, 2, 4, 6, 1, 3, 5, 7)[i] (AWQ_ORDER), flat (row, j, i)-major; sum_k C_k x_k per chunk (C = 256 for even
    slots, 16 for odd ones) and sum_k x_k per lane, one per row. Rows past M read 0. XVEC loads a lane's 32
    consecutive x as one contiguous tile (vector loads) and picks the slots in registers (_x_by_k), instead of
    32 scalar loads at a 64-byte lane stride."""
    xs = ()
    csums = ()
    xsums = ()
    for m in tl.static_range(BLOCK_M):
        ptr = x_ptr + (m0 + m) * stride_xm
        mask = cmask & (ck3 * 0 + m0 + m < M)  # a tensor compare: the interpreter rejects scalar masks
        if XVEC:
            xk = _x_by_k(ptr, ck3, mask, up_offset, SILU)
        even = tl.zeros(ck3.shape, tl.float32)
        odd = tl.zeros(ck3.shape, tl.float32)
        for v in tl.static_range(32):  # v = 8j + i
            off = 8 * (v // 8) + (v % 8 // 4) + 2 * (v % 4)  # slot i holds k offset 2 (i % 4) + i // 4
            if XVEC:  # _x_by_k's order: bit b of off is bit 4 - b of the index (off's bits 0..4 are v's 2, 0, 1, 3, 4)
                x = xk[16 * (v // 4 % 2) + 8 * (v % 2) + 4 * (v // 2 % 2) + 2 * (v // 8 % 2) + v // 16]
            else:
                x = load_x(ptr, ck3 * 32 + off, mask, up_offset, SILU)  # (LANES, 1, CHUNKS)
            xs = xs + (x,)
            if v % 2 == 0:
                even += x
            else:
                odd += x
        csums = csums + (256.0 * even + 16.0 * odd,)
        xsums = xsums + (tl.sum(even + odd, axis=2),)
    return xs, csums, xsums


@jit
def _x_by_k(ptr, ck3, mask, up_offset, SILU: tl.constexpr):
    """x at k = 32 * chunk + o, o = 0..31, from one (LANES, 1, CHUNKS, 32) load, split into 32 (LANES, 1, CHUNKS)
    tensors by halving on the lowest k bit five times: tuple index = bits of o reversed."""
    offs = ck3[:, :, :, None] * 32 + tl.arange(0, 32)[None, None, None, :]  # (LANES, 1, CHUNKS, 32)
    x = load_x(ptr, offs, mask[:, :, :, None], up_offset, SILU)
    parts = (x,)
    for level in tl.static_range(5):
        halves = ()
        for p in tl.static_range(1 << level):
            t = parts[p]
            if level < 4:
                t = tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2], t.shape[3] // 2, 2))
            a, b = tl.split(t)  # the last level splits (LANES, 1, CHUNKS, 2) itself
            halves = halves + (a, b)
        parts = halves
    return parts


@jit
def _word_dot(w, xs, J: tl.constexpr, accs, magic_256, magic_16, BLOCK_M: tl.constexpr):
    """accs[m] + sum over word J's 8 slots of x_k (C_k + q_k): the nibbles are unpacked once for all rows of x,
    each row's products chain on its own accumulator."""
    for p in tl.static_range(4):  # slots (2p, 2p + 1) sit in bits 8p..8p+7
        e, o = _slots(w, 15 - 8 * p, magic_256, magic_16)
        new = ()
        for m in tl.static_range(BLOCK_M):
            acc = accs[m] + e * xs[32 * m + 8 * J + 2 * p]
            new = new + (acc + o * xs[32 * m + 8 * J + 2 * p + 1],)
        accs = new
    return accs


@jit
def _dot_rows(w, sz, xs, csums, xsums, magic_256, magic_16, BF16_SCALES: tl.constexpr, BLOCK_M: tl.constexpr,
              RF: tl.constexpr):
    """Per x row, the (BLOCK_N,) partial dot products of BLOCK_N weight rows with this program's K range; a
    lane's chunks share one group, so the scale and zero apply once per lane and row (RF: w is rows first)."""
    w0, w1, w2, w3 = _words(w)
    accs = ()
    for m in tl.static_range(BLOCK_M):  # start at -sum C_k x_k: no separate subtraction
        if RF:
            accs = accs + (-csums[m] + tl.zeros((w.shape[0], 1, 1), tl.float32),)
        else:
            accs = accs + (-csums[m] + tl.zeros((1, w.shape[1], 1), tl.float32),)
    accs = _word_dot(w0, xs, 0, accs, magic_256, magic_16, BLOCK_M)
    accs = _word_dot(w1, xs, 1, accs, magic_256, magic_16, BLOCK_M)
    accs = _word_dot(w2, xs, 2, accs, magic_256, magic_16, BLOCK_M)
    accs = _word_dot(w3, xs, 3, accs, magic_256, magic_16, BLOCK_M)  # (LANES, BLOCK_N, CHUNKS): sum_k x_k q_k
    s, z = scale_zero(sz, BF16_SCALES)  # (LANES, BLOCK_N)
    ys = ()
    for m in tl.static_range(BLOCK_M):
        part = s * (tl.sum(accs[m], axis=2) - z * xsums[m])
        if RF:
            ys = ys + (tl.sum(part, axis=1),)  # one shuffle tree per row
        else:
            ys = ys + (tl.sum(part, axis=0),)
    return ys


@jit
def _finish_rows(ys, out_ptr, part_ptr, bias_ptr, rows, row_end, m0, M, N, split,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Store each x row's (BLOCK_N,) results: the output, or this split's partials (split, M, N)."""
    for m in tl.static_range(BLOCK_M):
        idx = (m0 + m) * N + rows
        mask = (rows < row_end) & (rows * 0 + m0 + m < M)
        if SPLIT:
            tl.store(part_ptr + split * M * N + idx, ys[m], mask=mask)
        else:
            store_out(ys[m], out_ptr, bias_ptr, idx, rows, mask, HAS_BIAS)


@jit
def gemv_kernel(x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
                M, N, KW, KG, stride_xm, up_offset, rows_per_prog, n_splits, magic_256, magic_16,
                G: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr, CHUNKS: tl.constexpr,
                PREFETCH: tl.constexpr, EVEN_N: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                SPLIT: tl.constexpr, BF16_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, EARLY: tl.constexpr,
                XVEC: tl.constexpr, RF: tl.constexpr):
    """Grid (row programs, K splits, x row groups): rows [pid_n * rows_per_prog, +rows_per_prog) of x rows
    [pid_m * BLOCK_M, +BLOCK_M) over K chunks [pid_k * LANES * CHUNKS, +LANES * CHUNKS), a chunk being
    4 words = 32 k; 32 CHUNKS <= G. PREFETCH (0, 1, 2) blocks of rows are in flight ahead of the one computed;
    EARLY issues the first ones before x's loads (independent of them), so the x prologue overlaps that DRAM
    round trip. RF lays tiles out rows first, (BLOCK_N, LANES, CHUNKS, 4): Triton spreads a warp's threads from
    the fastest dims, so lanes (not rows) go to threads and each thread holds one lane's x (32 CHUNKS values)
    rather than those of LANES / 16 lanes, as in the (LANES, BLOCK_N, ...) layout at BLOCK_N = 8."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m0 = pid_m * BLOCK_M
    lane = tl.arange(0, LANES)[None, :, None] if RF else tl.arange(0, LANES)[:, None, None]
    ck3 = (pid_k * LANES + lane) * CHUNKS + tl.arange(0, CHUNKS)[None, None, :]  # (LANES, 1, CHUNKS) or RF (1, ...)
    # Lanes past K read the last chunk instead of being masked (x = 0 there): no predicates, no zero fills.
    last = tl.minimum(ck3, KW // 4 - 1)
    kw = last[:, :, :, None] * 4 + tl.arange(0, 4)[None, None, None, :]  # (LANES, 1, CHUNKS, 4) word index (RF:
    grp = tl.max(last, axis=2) * 32 // G  # (LANES, 1): the lane's group                   (1, LANES, ...) both)
    row0 = pid_n * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, N)
    last_r = row0 + (row_end - row0 - 1) // BLOCK_N * BLOCK_N  # the last block's first row
    rows = row0 + tl.arange(0, BLOCK_N)
    if RF:
        w_ptrs = qw_ptr + rows[:, None, None, None] * KW + kw  # (BLOCK_N, LANES, CHUNKS, 4) at row0
        sz_ptrs = sz_ptr + rows[:, None] * KG + grp  # (BLOCK_N, LANES)
    else:
        w_ptrs = qw_ptr + rows[None, :, None, None] * KW + kw  # (LANES, BLOCK_N, CHUNKS, 4) at row0
        sz_ptrs = sz_ptr + rows[None, :] * KG + grp  # (LANES, BLOCK_N)
    if EARLY and PREFETCH > 0:
        w, sz, w1, sz1 = _first_blocks(w_ptrs, sz_ptrs, row0, last_r, row_end, KW, KG, EVEN_N, BLOCK_N, RF, PREFETCH)
    xs, csums, xsums = _x_slots(x_ptr, stride_xm, m0, M, ck3, ck3 < KW // 4, up_offset, SILU, BLOCK_M, XVEC)
    if not EARLY and PREFETCH > 0:
        w, sz, w1, sz1 = _first_blocks(w_ptrs, sz_ptrs, row0, last_r, row_end, KW, KG, EVEN_N, BLOCK_N, RF, PREFETCH)
    for r in range(row0, row_end, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        if PREFETCH == 0:
            w, sz = _block_at(w_ptrs, sz_ptrs, r, row0, last_r, row_end, KW, KG, EVEN_N, BLOCK_N, RF)
        else:  # the block PREFETCH ahead goes out before this block's arithmetic
            ahead = r + PREFETCH * BLOCK_N
            nw, nsz = _block_at(w_ptrs, sz_ptrs, ahead, row0, last_r, row_end, KW, KG, EVEN_N, BLOCK_N, RF)
        ys = _dot_rows(w, sz, xs, csums, xsums, magic_256, magic_16, BF16_SCALES, BLOCK_M, RF)
        if PREFETCH == 1:
            w, sz = nw, nsz
        if PREFETCH == 2:
            w, sz, w1, sz1 = w1, sz1, nw, nsz
        _finish_rows(ys, out_ptr, part_ptr, bias_ptr, rows, row_end, m0, M, N, pid_k, HAS_BIAS, SPLIT, BLOCK_M)
    if SPLIT:
        _split_epilogue(out_ptr, part_ptr, bias_ptr, lock_ptr, pid_m * tl.num_programs(0) + pid_n, row0, row_end,
                        m0, M, N, n_splits, BLOCK_N, HAS_BIAS, BLOCK_M)


@jit
def _split_epilogue(out_ptr, part_ptr, bias_ptr, lock_ptr, tile, row0, row_end, m0, M, N, n_splits,
                    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The last of a row range's K splits to arrive sums the partials of all rows, in split order."""
    if arrive(lock_ptr, tile, n_splits):
        for r in range(row0, row_end, BLOCK_N):
            rows = r + tl.arange(0, BLOCK_N)
            for m in tl.static_range(BLOCK_M):
                idx = (m0 + m) * N + rows
                mask = (rows < row_end) & (rows * 0 + m0 + m < M)
                y = sum_partials(part_ptr, idx, mask, M * N, n_splits, tl.zeros((BLOCK_N,), tl.float32))
                store_out(y, out_ptr, bias_ptr, idx, rows, mask, HAS_BIAS)
        release(lock_ptr, tile)
