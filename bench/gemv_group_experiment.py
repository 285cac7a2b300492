"""Experiment, kept for the record (bench/results/gemv_group_experiment_H100.md): a group-at-a-time W4A16 GEMV
that unpacks each nibble with a shift, one mask-or into the mantissa of 2**23 and one subtraction, accumulates
x * q, and applies zeros and scales once per group: y[n] += s[g, n] * (sum_k x[k] q[k, n] - z[g, n] * sum_k x[k]).
About 4 instructions per nibble instead of the package GEMV's ~6, yet no faster (so not what limits the GEMV).

    TRITON_INTERPRET=1 python bench/gemv_group_experiment.py --check     # correctness on the CPU
    python bench/gemv_group_experiment.py                                # GPU: configs vs the package GEMV
"""
from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

from qwen_awq.kernels import awq_gemm as kern
from qwen_awq.kernels.reference import awq_matmul_reference

MAGIC = 0x4B000000  # bits of 2**23 as fp32: OR-ing q < 16 into the mantissa gives 2**23 + q exactly


@triton.jit
def _codes(words, shift):
    """int32 words (G, W) -> fp32 codes (G, W, 8), column j of a word being nibble shift[j] / 4."""
    w = words.to(tl.uint32, bitcast=True)
    bits = ((w[:, :, None] >> shift[None, None, :]) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes1(words, shift):
    """int32 words (W,) -> fp32 codes (W, 8)."""
    w = words.to(tl.uint32, bitcast=True)
    bits = ((w[:, None] >> shift[None, :]) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv2_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, M, N, NW, K, stride_xm, groups_per_split,
                  G: tl.constexpr, BLOCK_W: tl.constexpr, IS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)
    g0 = tl.program_id(2) * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, K // G)
    offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)  # (W,) packed columns
    j = tl.arange(0, 8)
    shift = ((j // 2) + (j % 2) * 4) * 4  # (8,) packing order 0 2 4 6 1 3 5 7
    offs_n = offs_w[:, None] * 8 + j[None, :]  # (W, 8) output columns
    w_mask = offs_w < NW
    offs_k = tl.arange(0, G)
    x_row = x_ptr + row * stride_xm
    w_ptrs = qw_ptr + offs_k[:, None] * NW + offs_w[None, :]  # (G, W) for group 0
    y = tl.zeros((BLOCK_W, 8), dtype=tl.float32)
    words = tl.load(w_ptrs + g0 * G * NW, mask=w_mask[None, :], other=0)
    xk = tl.load(x_row + g0 * G + offs_k).to(tl.float32)
    for g in range(g0, g1):
        g_next = tl.minimum(g + 1, g1 - 1)  # prefetch; the last group reloads itself
        words_next = tl.load(w_ptrs + g_next * G * NW, mask=w_mask[None, :], other=0)
        x_next = tl.load(x_row + g_next * G + offs_k).to(tl.float32)
        part = tl.sum(xk[:, None, None] * _codes(words, shift), axis=0)  # (W, 8)
        z = _codes1(tl.load(qz_ptr + g * NW + offs_w, mask=w_mask, other=0), shift)  # (W, 8)
        s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y += s * (part - z * tl.sum(xk, axis=0))
        words, xk = words_next, x_next
    mask = offs_n < N
    if not IS_SPLIT:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + tl.program_id(2) * M * N + row * N + offs_n, y, mask=mask)


def gemv2(x, qweight, qzeros, scales, group_size, bias=None, block_w=16, num_warps=4, waves=4, split_k=None):
    x2d = x.reshape(-1, x.shape[-1])
    m, k = x2d.shape
    nw = qweight.shape[1]
    n = nw * 8
    n_tiles = triton.cdiv(nw, block_w)
    n_groups = k // group_size
    if split_k is None:
        split_k = max(1, min(n_groups, waves * kern._num_sms(x.device) // (m * n_tiles)))
    per = triton.cdiv(n_groups, split_k)
    split_k = triton.cdiv(n_groups, per)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else out
    _gemv2_kernel[(m, n_tiles, split_k)](x2d, qweight, qzeros, scales, bias_arg, target, m, n, nw, k, x2d.stride(0),
                                         per, G=group_size, BLOCK_W=block_w, IS_SPLIT=split_k > 1,
                                         HAS_BIAS=bias is not None, num_warps=num_warps)
    if split_k > 1:
        kern._splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](target, bias_arg, out, m, n, split_k,
                                                              HAS_BIAS=bias is not None, BLOCK=1024)
    return out.view(*x.shape[:-1], n)


def check(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for k, n, g, bias in ((256, 200, 64, True), (256, 64, 32, False), (512, 136, 128, True)):
        qw = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)
        qz = torch.randint(-(2**31), 2**31 - 1, (k // g, n // 8), dtype=torch.int32, generator=gen)
        sc = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.002).half()
        x = torch.randn(1, k, generator=gen).half()
        b = torch.randn(n, generator=gen).half() if bias else None
        ref = awq_matmul_reference(x, qw, qz, sc, g, b).float()

        def to(t):
            return None if t is None else t.to(device)

        for split in (1, 2, None):
            y = gemv2(to(x), to(qw), to(qz), to(sc), g, to(b), block_w=8, split_k=split).float().cpu()
            err = float((y - ref).abs().max() / ref.abs().max())
            print(k, n, g, bias, split, f"{err:.2e}")
            assert err < 4e-3


def bench() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import awq_kernel_bench as B

    check("cuda")
    gen = torch.Generator().manual_seed(1)
    bw = B.copy_bandwidth()
    print(torch.cuda.get_device_name(), f"copy {bw:.0f} GB/s")
    totals = {}
    for k, n in B.SHAPES:
        w4 = [B.random_packed(k, n, B.GROUP, gen) for _ in range(B.n_copies(B.w4_bytes(k, n, 1)))]
        x = torch.randn(1, k, generator=gen).half().cuda()
        floor = B.w4_bytes(k, n, 1) / (bw * 1e3)
        ref = kern.awq_gemv_triton(x, *w4[0], B.GROUP)
        v1 = B.time_rotated(lambda x, p: kern.awq_gemv_triton(x, *p, B.GROUP), x, w4, rep_ms=100)
        totals.setdefault("v1", 0.0)
        totals["v1"] += v1
        line = [f"K={k} N={n} floor {floor:.1f} v1 {v1:.1f}"]
        for bw_, nwarps, waves in itertools.product((4, 8, 16, 32), (2, 4, 8), (2, 4, 8)):
            call = partial(lambda x, p, a, b, c: gemv2(x, *p, B.GROUP, block_w=a, num_warps=b, waves=c),
                           a=bw_, b=nwarps, c=waves)
            y = call(x, w4[0])
            err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
            if err > 4e-3:
                print("MISMATCH", bw_, nwarps, waves, err)
                continue
            us = B.time_rotated(call, x, w4, rep_ms=50)
            key = (bw_, nwarps, waves)
            totals[key] = totals.get(key, 0.0) + us
            line.append(f"{key}:{us:.1f}")
        print(" ".join(line), flush=True)
    best = sorted(totals.items(), key=lambda kv: kv[1])[:8]
    print("sum over the 4 shapes (us):", [(k, round(v, 1)) for k, v in best], "v1", round(totals["v1"], 1))


if __name__ == "__main__":
    if "--check" in sys.argv:
        check("cpu")
    else:
        bench()
