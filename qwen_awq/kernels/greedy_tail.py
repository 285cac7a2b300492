"""The plain greedy sampling tail in one pass over the lm_head's logits: per row the argmax id and its log-prob,
packed as (B, 2) float64 [id, log-prob] rows (engine/sampler.greedy_rows). CPU tensors take the reference.

Two launches whose grids depend on shapes only (CUDA-graph capturable): every (row, split) program reduces its
column range to (max, first argmax, sum of exp(x - max)); one program per row then combines the splits in order.
Special values as torch gives them: a row holding NaN takes its first NaN's id, an all -inf row id 0, a +inf maximum
its first column; the log-prob of all three is NaN.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from qwen_awq.kernels.w4a16_common import jit, tl, triton

BLOCK = 1024  # columns per tile: one 16-byte fp16 load (8 columns) per thread at 4 warps
# (row, split) programs the splits aim for: ~4 per SM on a 132-SM H200, so one row of Qwen's 151,851 ids still
# spreads over 149 programs (one tile each), 32 rows take 15 splits of 10 tiles and 256 rows 2 of 75
PROGRAMS = 512
_NO_INDEX = 2**31 - 1  # larger than any column: lanes that saw no candidate lose every min()
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def greedy_tail_reference(logits: Tensor, vocab_size: int) -> Tensor:
    """(B, 2) float64 [argmax id, log-prob] of logits (B, V_padded) over the first vocab_size columns, with the
    torch ops of sampler.sample(): fp32 argmax (lowest index of a tie), then logit - logsumexp(row)."""
    raw = logits[:, :vocab_size].float().contiguous()  # (B, V)
    tokens = raw.argmax(dim=-1)  # (B,)
    logprobs = raw.gather(-1, tokens[:, None]).squeeze(-1) - raw.logsumexp(dim=-1)  # (B,)
    return torch.stack([tokens.double(), logprobs.double()], dim=1)


@jit
def _split_kernel(x_ptr, m_ptr, i_ptr, s_ptr, V, stride_b, stride_v, span, n_splits, BLOCK: tl.constexpr,
                  NO_INDEX: tl.constexpr):
    """Columns [split * span, (split + 1) * span) of one row -> (max, its first column, sum of exp(x - max)).
    A split holding a NaN stores (NaN, its first NaN column) instead."""
    row, split = tl.program_id(0), tl.program_id(1)
    start = split * span
    end = tl.minimum(start + span, V)
    base = x_ptr + row.to(tl.int64) * stride_b
    lanes = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: running max, its first column, sum exp(x - m)
    idx = tl.full([BLOCK], NO_INDEX, tl.int32)
    s = tl.zeros([BLOCK], tl.float32)
    full_end = start + (end - start) // BLOCK * BLOCK
    for off in range(start, full_end, BLOCK):  # whole tiles unmasked: 16-byte loads (a ragged mask splits them)
        offs = off + lanes
        m, idx, s = _update(tl.load(base + offs * stride_v).to(tl.float32), offs, m, idx, s)
    if full_end < end:  # the row's last, partial tile
        offs = full_end + lanes
        x = tl.load(base + offs * stride_v, mask=offs < end, other=float("-inf"))
        m, idx, s = _update(x.to(tl.float32), offs, m, idx, s)
    m_split = tl.max(m, axis=0)
    i_split = tl.min(tl.where(m == m_split, idx, NO_INDEX), axis=0)
    s_split = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - m_split)), axis=0)
    if s_split != s_split:  # a NaN column, or two +inf in a lane: rescan for the first NaN (rare rows only)
        first = _first_nan(base, start, end, stride_v, BLOCK, NO_INDEX)
        m_split = tl.where(first < NO_INDEX, float("nan"), m_split)
        i_split = tl.where(first < NO_INDEX, first, i_split)
    slot = row * n_splits + split
    tl.store(m_ptr + slot, m_split)
    tl.store(i_ptr + slot, i_split)
    tl.store(s_ptr + slot, s_split)


@jit
def _update(x, offs, m, idx, s):
    """One tile of fp32 logits x at columns offs into the per-lane (max, first column of it, sum exp(x - max))."""
    gt = x > m  # strict: a later equal value keeps the earlier column (torch.argmax's tie rule)
    t = x - m
    # one exp a column: exp(-|x - m|) rescales the sum when x is the new max, else is x's term; -inf adds 0 (-inf -
    # -inf would be NaN); a NaN x makes the sum NaN and leaves m and idx alone (NaN > m is false)
    e = tl.where(x == float("-inf"), 0.0, tl.exp(tl.where(gt, -t, t)))
    return tl.where(gt, x, m), tl.where(gt, offs, idx), tl.where(gt, s * e + 1.0, s + e)


@jit
def _first_nan(base, start, end, stride_v, BLOCK: tl.constexpr, NO_INDEX: tl.constexpr):
    first = tl.full([BLOCK], NO_INDEX, tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(base + offs * stride_v, mask=offs < end, other=0.0).to(tl.float32)
        first = tl.minimum(first, tl.where(x != x, offs, NO_INDEX))
    return tl.min(first, axis=0)


@jit
def _combine_kernel(m_ptr, i_ptr, s_ptr, out_ptr, n_splits, stride_out, stride_col, SPLITS: tl.constexpr,
                    NO_INDEX: tl.constexpr):
    """One row's splits -> out[row] = [id, log-prob] in float64. log-prob = logit[id] - logsumexp = -log(sum of
    exp(x - max)), the same value without the rounding of max + log(sum); NaN wherever torch's formula gives NaN."""
    row = tl.program_id(0)
    k = tl.arange(0, SPLITS)
    mask = k < n_splits
    m = tl.load(m_ptr + row * n_splits + k, mask=mask, other=float("-inf"))
    i = tl.load(i_ptr + row * n_splits + k, mask=mask, other=NO_INDEX)
    s = tl.load(s_ptr + row * n_splits + k, mask=mask, other=0.0)
    is_nan = m != m
    first_nan = tl.min(tl.where(is_nan, i, NO_INDEX), axis=0)
    m = tl.where(is_nan, float("-inf"), m)
    top = tl.max(m, axis=0)
    best = tl.min(tl.where(m == top, i, NO_INDEX), axis=0)  # splits are in column order: the first maximum
    total = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - top)), axis=0)
    # torch: argmax of an all -inf row is 0 and of a row with NaN its first NaN; the log-prob is NaN for both and
    # for a +inf maximum (inf - inf)
    best = tl.where(top == float("-inf"), 0, best)
    best = tl.where(first_nan < NO_INDEX, first_nan, best)
    logprob = tl.where((first_nan < NO_INDEX) | (tl.abs(top) == float("inf")), float("nan"), -tl.log(total))
    tl.store(out_ptr + row * stride_out, best.to(tl.float64))
    tl.store(out_ptr + row * stride_out + stride_col, logprob.to(tl.float64))


def split_span(rows: int, vocab_size: int, block: int = BLOCK, programs: int = PROGRAMS) -> tuple[int, int]:
    """(splits per row, columns per split, a multiple of block): about `programs` programs in all, at least one
    tile each, and no empty split."""
    tiles = -(-vocab_size // block)
    splits = max(1, min(tiles, -(-programs // max(rows, 1))))
    span = block * -(-tiles // splits)
    return -(-vocab_size // span), span


def _triton_ok(logits: Tensor) -> bool:
    on_device = logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and logits.dtype in _DTYPES


def greedy_tail(logits: Tensor, vocab_size: int, out: Tensor | None = None, block: int = BLOCK,
                programs: int = PROGRAMS) -> Tensor:
    """(B, 2) float64 [argmax id, log-prob] of logits (B, V_padded >= vocab_size), written into `out` when given
    (e.g. a view of a decode graph's static buffer): two kernels on CUDA, else the reference. The kernels give the
    reference's ids and NaNs. Their fp32 log-prob is -log(sum exp(x - max)), which skips the rounding of max +
    log(sum): it differs from the reference's by a few fp32 ulps of the row's logsumexp, and is usually closer to the
    exact value."""
    if logits.dim() != 2 or not 0 < vocab_size <= logits.shape[1]:
        raise ValueError(f"logits of shape {tuple(logits.shape)} need 2 dims and at least vocab_size = {vocab_size} "
                         "columns")
    if not _triton_ok(logits):
        ref = greedy_tail_reference(logits, vocab_size)
        return ref if out is None else out.copy_(ref)
    n_rows = logits.shape[0]
    if out is None:
        out = torch.empty(n_rows, 2, dtype=torch.float64, device=logits.device)
    if n_rows == 0:
        return out
    splits, span = split_span(n_rows, vocab_size, block, programs)
    m = torch.empty(n_rows, splits, dtype=torch.float32, device=logits.device)  # (B, splits) each
    i = torch.empty(n_rows, splits, dtype=torch.int32, device=logits.device)
    s = torch.empty_like(m)
    _split_kernel[(n_rows, splits)](logits, m, i, s, vocab_size, logits.stride(0), logits.stride(1), span, splits,
                                    BLOCK=block, NO_INDEX=_NO_INDEX, num_warps=4)
    _combine_kernel[(n_rows,)](m, i, s, out, splits, out.stride(0), out.stride(1),
                               SPLITS=triton.next_power_of_2(splits), NO_INDEX=_NO_INDEX, num_warps=1)
    return out
