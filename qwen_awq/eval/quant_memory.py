"""Where the AWQ quantizer's memory goes (issue 10 item 5): live tensor bytes of one block's search, counted
exactly on the CPU after every aten op, with what was alive at the peak. `python -m qwen_awq.eval.quant_memory`
runs a Qwen-7B-wide block on 128 x 40 calibration tokens and extrapolates the peak to 128 x 512.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GB = 1e9  # decimal, as eval/bench_report.py


@dataclass
class Live:
    ref: StorageWeakRef
    nbytes: int
    scaled: float  # bytes at the extrapolated scale (see LiveBytes.scale)
    label: str  # creating op and shape


class LiveBytes(TorchDispatchMode):
    """Sums the bytes of every live tensor storage after each op (views and in-place results count once).

    `scale(shape)` says by how much a tensor of that shape grows at the target scale, so the same pass also
    tracks the peak the target run would reach (exact when every tensor's size is a product of its dims).
    Tensors made before the mode (weights, inputs) count once `track`ed."""

    def __init__(self, scale: Callable[[torch.Size], float] = lambda _shape: 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.live: dict[int, Live] = {}  # storage address -> entry
        self.now = self.peak = 0
        self.now_scaled = self.peak_scaled = 0.0
        self.at_peak_scaled: list[tuple[str, float]] = []  # (label, bytes at target scale)
        self.where_scaled = ""  # the quantizer's call stack at the extrapolated peak

    def track(self, t: torch.Tensor, label: str) -> None:
        storage = t.untyped_storage()
        key, old = storage.data_ptr(), self.live.get(storage.data_ptr())
        if storage.nbytes() == 0 or (old is not None and not old.ref.expired()):
            return
        if old is not None:
            self._drop(key)
        scaled = storage.nbytes() * self.scale(t.shape)
        self.live[key] = Live(StorageWeakRef(storage), storage.nbytes(), scaled, label)
        self.now, self.now_scaled = self.now + storage.nbytes(), self.now_scaled + scaled

    def _drop(self, key: int) -> None:
        entry = self.live.pop(key)
        self.now, self.now_scaled = self.now - entry.nbytes, self.now_scaled - entry.scaled

    def sweep(self) -> None:
        for key in [k for k, e in self.live.items() if e.ref.expired()]:
            self._drop(key)
        self.peak = max(self.peak, self.now)
        if self.now_scaled > self.peak_scaled:
            self.peak_scaled = self.now_scaled
            self.at_peak_scaled = [(e.label, e.scaled) for e in self.live.values()]
            self.where_scaled = _quantizer_stack()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, f"{func.__name__} {tuple(t.shape)} {str(t.dtype)[6:]}")
        self.sweep()
        return out


def _quantizer_stack() -> str:
    frame, names = sys._getframe(2), []
    while frame is not None:
        if "qwen_awq/quant" in frame.f_code.co_filename:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return " <- ".join(names)


def token_scale(seqlen: int, target_seqlen: int) -> Callable[[torch.Size], float]:
    """Tokens enter every activation's shape as a multiple of seqlen (S, b * S or samples * S), and no weight
    dim of the measured model is one (checked by the caller): scale each such dim by target / seqlen."""
    ratio = target_seqlen / seqlen
    return lambda shape: math.prod(ratio for d in shape if d % seqlen == 0)


def block_weight_bytes(block: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())


def measure_block(cfg, samples: int, seqlen: int, target_seqlen: int, dtype: torch.dtype = torch.bfloat16,
                  micro_batch: int = 8, search_samples: int = 8, group_size: int = 128,
                  clip: bool = True) -> LiveBytes:
    """Quantize one random block of cfg's widths on (samples, seqlen) random hidden states under LiveBytes.

    The clip search's token sample shrinks with seqlen (awq.CLIP_TOKENS scaled) so that every token count of
    the run is the target run's times seqlen / target_seqlen. bf16 on the CPU stands for fp16 on the GPU: the
    same bytes per element, and the search then keeps the model's dtype, as it does on the GPU."""
    from qwen_awq.eval.synthetic import randomize_
    from qwen_awq.models.decoder import Block
    from qwen_awq.quant import awq

    block = Block(cfg, 0, dtype).requires_grad_(False)
    randomize_(block)
    for p in block.parameters():
        if any(d % seqlen == 0 for d in p.shape):
            raise ValueError(f"weight dim of {tuple(p.shape)} is a multiple of seqlen {seqlen}: pick another")
    x = 0.5 * torch.randn(samples, seqlen, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    calib = awq.Calibration(SimpleNamespace(cfg=cfg), micro_batch, seqlen, torch.device("cpu"))
    tracker = LiveBytes(scale=token_scale(seqlen, target_seqlen))
    for name, p in block.named_parameters():
        tracker.track(p, f"weight {name}")
    tracker.track(x, "block input x")
    saved = awq.CLIP_TOKENS
    awq.CLIP_TOKENS = saved * seqlen // target_seqlen
    try:
        with torch.inference_mode(), tracker:
            awq.awq_block(block, x, calib, group_size, clip, search_samples)
    finally:
        awq.CLIP_TOKENS = saved
    return tracker


def report(tracker: LiveBytes, top: int = 12) -> str:
    rows = sorted(tracker.at_peak_scaled, key=lambda r: -r[1])
    lines = [f"measured peak {tracker.peak / GB:.3f} GB; extrapolated peak {tracker.peak_scaled / GB:.3f} GB in "
             f"{tracker.where_scaled}"]
    lines += [f"  {b / GB:7.3f} GB  {label}" for label, b in rows[:top]]
    rest = sum(b for _, b in rows[top:])
    lines.append(f"  {rest / GB:7.3f} GB  {len(rows) - top} others")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qwen_awq.eval.bench_quantize import memory_bound
    from qwen_awq.eval.synthetic import synthetic_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen-7b")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=40, help="measured tokens per sequence (no weight dim divides)")
    p.add_argument("--target-seqlen", type=int, default=512)
    p.add_argument("--no-clip", action="store_true")
    args = p.parse_args(argv)
    cfg = synthetic_config(args.model, None, 1)
    tracker = measure_block(cfg, args.samples, args.seqlen, args.target_seqlen, clip=not args.no_clip)
    bound = memory_bound(cfg, args.samples, args.target_seqlen)
    print(report(tracker))
    print(f"bound at {args.samples} x {args.target_seqlen}: {bound['bound_bytes'] / GB:.3f} GB (weights "
          f"{bound['block_weights_bytes'] / GB:.3f} + activations {bound['activations_bytes'] / GB:.3f} + 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
