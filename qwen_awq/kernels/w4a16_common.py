"""Pieces shared by the W4A16 kernels on the repacked layout (quant/packing.py): the Triton import guard, the
scale/zero decoding, the SiLU(gate) * up prologue and the fused split-K epilogue.

Split-K without a second kernel: every program of an output tile stores its fp32 partial, then bumps the tile's
counter (acq_rel); the program that sees count == splits - 1 sums the partials in split order (deterministic),
adds the bias, writes x's dtype and resets the counter to 0, so the kernels stay CUDA-graph capturable.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the dispatcher takes the plain-PyTorch reference
    triton = None
    tl = None


def jit(fn):
    return fn if triton is None else triton.jit(fn)


@jit
def scale_zero(sz, BF16_SCALES: tl.constexpr):
    """int32 scale_zero words -> (scale, zero) as fp32: bits 0..15 the scale, 16..31 the zero point."""
    if BF16_SCALES:
        s = (sz & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, z


@jit
def load_x(x_ptr, offs, mask, up_offset, SILU: tl.constexpr):
    """fp32 activations at offs; with SILU, x is a gate_up row and the value is silu(gate[k]) * up[k], rounded to
    x's dtype after the silu and after the product as the unfused MLP's torch ops round (models/fusion.py), so the
    fused decode step computes the same activations."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SILU:
        u = tl.load(x_ptr + up_offset + offs, mask=mask, other=0.0).to(tl.float32)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
        x = (act * u).to(x.dtype)
    return x.to(tl.float32)


@jit
def store_out(acc, out_ptr, bias_ptr, idx, n_idx, mask, HAS_BIAS: tl.constexpr):
    """out[idx] = acc (+ bias[n_idx]) in out's dtype; idx = m * N + n."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def arrive(lock_ptr, tile, n_splits):
    """Count this program's partials for `tile` as written; true for the last of its n_splits programs."""
    tl.debug_barrier()  # every thread's partial stores happen before the release below
    old = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return old == n_splits - 1


@jit
def sum_partials(part_ptr, idx, mask, mn, n_splits, acc):
    """acc + the sum over splits of part[s, idx], in split order; .cg reads L2, where other SMs wrote."""
    for s in range(n_splits):
        acc += tl.load(part_ptr + s * mn + idx, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@jit
def release(lock_ptr, tile):
    """Reset the tile's counter for the next launch (the last program alone touches it now)."""
    tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")


@jit
def finish_tile(acc, out_ptr, part_ptr, bias_ptr, lock_ptr, idx, n_idx, mask, mn, tile, split, n_splits,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Write one output tile directly, or as split `split` of n_splits with the fused reduction."""
    if SPLIT:
        tl.store(part_ptr + split * mn + idx, acc, mask=mask)
        if arrive(lock_ptr, tile, n_splits):
            total = sum_partials(part_ptr, idx, mask, mn, n_splits, tl.zeros_like(acc))
            store_out(total, out_ptr, bias_ptr, idx, n_idx, mask, HAS_BIAS)
            release(lock_ptr, tile)
    else:
        store_out(acc, out_ptr, bias_ptr, idx, n_idx, mask, HAS_BIAS)
