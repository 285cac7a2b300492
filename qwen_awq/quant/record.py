"""What the AWQ search keeps of each Linear's calibration inputs, gathered by forward pre-hooks while the
unquantized block runs micro-batch by micro-batch (quant/awq.py record_block): never all tokens at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen_awq.quant.groups import QUANT_LINEARS

ABS_SUM_SEQS = 8  # sequences per fp32 partial sum of |x| for x_mean: the order of the sums when all were held


@dataclass
class LinearInputs:
    """What the search uses of one Linear's inputs over all calibration tokens, kept as they stream past so
    that no (tokens, K) tensor of all of them is ever held: at Qwen-7B's 128 x 512 tokens those were 3 GB
    in fp16 per copy (eval/quant_memory.py measures it)."""

    x_mean: torch.Tensor  # (K,) mean |x| per input channel, fp32 sums
    search: torch.Tensor  # (search_samples, S, K) whole sequences, spread out, for the scale search's loss
    clip: torch.Tensor  # (t, K) every clip_step-th token of all, for the clip search


class InputRecorder:
    """Forward pre-hooks on a block's Linears; `rows` names the sequences of the micro-batch now running. The
    kept sequences and tokens go into buffers of their final size (no list + cat, which would hold them twice)."""

    def __init__(self, n: int, seqlen: int, search_samples: int, clip_tokens: int) -> None:
        step = max(1, n // search_samples)
        self.search_ids = list(range(0, n, step))[:search_samples]  # whole sequences, spread out
        self.clip_step = max(1, n * seqlen // clip_tokens)  # strided token sample, as AutoAWQ takes it
        self.n, self.seqlen, self.rows = n, seqlen, slice(0, 0)
        self.sums: dict[str, torch.Tensor] = {}  # (K,) per Linear
        self.pending: dict[str, torch.Tensor] = {}  # (< ABS_SUM_SEQS, S, K) per Linear
        self.search: dict[str, torch.Tensor] = {}  # (search_samples, S, K) per Linear
        self.clip: dict[str, torch.Tensor] = {}  # (t, K) per Linear

    def hook(self, name: str) -> Callable:
        return lambda _module, args: self.record(name, args[0])

    def record(self, name: str, x: torch.Tensor) -> None:
        """x (b * S, K): the Linear's input for sequences `rows`."""
        lo, hi, seqlen = self.rows.start, self.rows.stop, self.seqlen
        seqs = x.reshape(hi - lo, seqlen, -1).contiguous()  # (b, S, K)
        self._sum_abs(name, seqs, lo)
        if name not in self.search:
            tokens = len(range(0, self.n * seqlen, self.clip_step))
            self.search[name] = seqs.new_empty(len(self.search_ids), seqlen, seqs.shape[-1])
            self.clip[name] = seqs.new_empty(tokens, seqs.shape[-1])
        picked = [j for j, i in enumerate(self.search_ids) if lo <= i < hi]
        if picked:
            self.search[name][picked] = seqs[[self.search_ids[j] - lo for j in picked]]
        first = -lo * seqlen % self.clip_step  # the first token whose global index is a multiple of the step
        piece = seqs.flatten(0, 1)[first::self.clip_step]  # (t_b, K)
        start = (lo * seqlen + first) // self.clip_step
        self.clip[name][start:start + piece.shape[0]] = piece

    def _sum_abs(self, name: str, seqs: torch.Tensor, lo: int) -> None:
        """Add sum |x| per channel (fp32) in pieces of ABS_SUM_SEQS sequences at global multiples of it, in
        order: the same sums, bit for bit, whatever the micro-batch. A piece it cuts waits in `pending`."""
        pending = self.pending.pop(name, None)
        if pending is not None:
            seqs, lo = torch.cat([pending, seqs]), lo - pending.shape[0]
        end = lo + seqs.shape[0]
        whole = end if end == self.n else end - end % ABS_SUM_SEQS  # the last piece of all may be short
        for piece in seqs[:whole - lo].split(ABS_SUM_SEQS):  # (<= ABS_SUM_SEQS, S, K)
            part = piece.abs().float().sum((0, 1))  # (K,)
            self.sums[name] = part if name not in self.sums else self.sums[name] + part
        if whole < end:
            self.pending[name] = seqs[whole - lo:].clone()

    def inputs(self, tokens: int) -> dict[str, LinearInputs]:
        return {name: LinearInputs(self.sums[name] / tokens, self.search[name], self.clip[name])
                for name in QUANT_LINEARS}
