"""`qwen-awq bench step-kernels`: kernels per decoder layer in one decode step, fused path on and off (issue 10).

One step = `Decoder.forward_tokens` on `batch` single-token sequences (dense attention over the token itself:
the attention kernels are the same in both columns, the norm / residual / MLP ones are what the fusions change).
Per layer is the marginal count: (kernels of the step with every layer - with the first layer only) / (layers - 1),
so the embedding, the final norm and the first block (which has no residual add yet) do not blur it.

What counts as a kernel: on CUDA, every device activity torch.profiler records (kernels, memcpy, memset); on the
CPU, as a proxy, every aten op called from Python that computes (views and allocations excluded) plus every Triton
launch, which runs there only under TRITON_INTERPRET=1 with fp16/bf16 weights (without it the fused kernels take
their torch references, and both columns are equal).
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.models.fusion import FUSED_ENV, fusion

TRITON_TAG = "triton::"  # record_function name prefix of a Triton launch on the CPU
NO_KERNEL_OPS = frozenset({  # leaf aten ops that only make views or allocate: no kernel on a GPU
    "aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::_reshape_alias",
    "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::slice", "aten::select",
    "aten::permute", "aten::t", "aten::transpose", "aten::split", "aten::chunk", "aten::narrow", "aten::reshape",
    "aten::split_with_sizes", "aten::unbind", "aten::set_", "aten::view_as", "aten::unflatten", "aten::flatten",
    "aten::to", "aten::result_type", "aten::resize_", "aten::contiguous",  # as leaves: no copy was needed
})


def step_batch(model: nn.Module, batch: int) -> tuple[torch.Tensor, ForwardBatch]:
    """input_ids (batch,) and the ForwardBatch of one decode step of `batch` one-token sequences."""
    dev = model.device
    ids = (100 + torch.arange(batch, device=dev)) % model.cfg.vocab_size  # (batch,)
    fb = ForwardBatch(positions=torch.zeros(batch, dtype=torch.long, device=dev),
                      ntk_alpha=torch.ones(batch, device=dev), attn=DenseAttention(batch, 1))
    return ids, fb


@contextlib.contextmanager
def _tagged_triton_launches() -> Iterator[None]:
    """Wrap each interpreted Triton launch in a record_function, so the CPU count sees one op per launch and
    skips the torch ops the interpreter issues inside it. A no-op where the interpreter is not in use."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield
        return
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        with record_function(TRITON_TAG + getattr(self.fn, "__name__", "kernel")):
            return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _under_triton(evt: Any) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith(TRITON_TAG):
            return True
        parent = parent.cpu_parent
    return False


def _does_work(evt: Any) -> bool:
    """An aten op that computes: a leaf outside NO_KERNEL_OPS, or an op with such a leaf below it."""
    if not evt.cpu_children:
        return evt.name not in NO_KERNEL_OPS
    return any(_does_work(c) for c in evt.cpu_children)


def _top_level_aten(evt: Any) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return evt.name.startswith("aten::")


def count_events(events: list[Any], cuda: bool) -> int:
    """Kernels among a profile's events: device activities on CUDA; on the CPU, each Triton launch plus each
    aten op called from Python that computes (linear, add, rms_norm, cat, a copying .to: one each)."""
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    n = 0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or _under_triton(e):
            continue
        if e.name.startswith(TRITON_TAG) or (_top_level_aten(e) and _does_work(e)):
            n += 1
    return n


@torch.inference_mode()
def count_step(model: nn.Module, batch: int, fused: bool) -> int:
    """Kernels of one decode step with the fusions on or off (a warm-up step first: Triton compiles, lazy init)."""
    ids, fb = step_batch(model, batch)
    cuda = model.device.type == "cuda"
    with fusion(fused):
        model.forward_tokens(ids, fb)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with _tagged_triton_launches(), profile(activities=activities) as prof:
            model.forward_tokens(ids, fb)
            if cuda:
                torch.cuda.synchronize()
    return count_events(list(prof.events()), cuda)


@contextlib.contextmanager
def _first_layer_only(model: nn.Module) -> Iterator[None]:
    layers = model.layers
    model.layers = nn.ModuleList(layers[:1])
    try:
        yield
    finally:
        model.layers = layers


def layer_counts(model: nn.Module, batch: int = 1) -> dict[str, Any]:
    """{"fused": {...}, "unfused": {...}}: kernels of the whole step and per layer (marginal), each path."""
    n_layers = len(model.layers)
    if n_layers < 2:
        raise ValueError("the per-layer count needs a model of at least 2 layers")
    out: dict[str, Any] = {"layers": n_layers, "batch": batch, "device": str(model.device),
                           "dtype": str(model.dtype).removeprefix("torch."),
                           "quant": "awq" if model.cfg.quant else "plain"}
    for name, on in (("fused", True), ("unfused", False)):
        total = count_step(model, batch, on)
        with _first_layer_only(model):
            first = count_step(model, batch, on)
        out[name] = {"step": total, "per_layer": (total - first) / (n_layers - 1)}
    out["saved_per_layer"] = out["unfused"]["per_layer"] - out["fused"]["per_layer"]
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| weights | device | batch | kernels/layer unfused | fused | saved | step unfused | step fused |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['quant']} {r['dtype']} | {r['device']} | {r['batch']} | {r['unfused']['per_layer']:g} "
                     f"| {r['fused']['per_layer']:g} | {r['saved_per_layer']:g} | {r['unfused']['step']} "
                     f"| {r['fused']['step']} |")
    return "\n".join(lines)


def cmd_step_kernels(args: argparse.Namespace) -> int:
    from qwen_awq.eval.bench_report import environment, write_outputs
    from qwen_awq.eval.synthetic import model_from_args

    rows = []
    for quant in (args.quant if args.synthetic else [None]):
        model, _ = model_from_args(args, quant)
        rows += [layer_counts(model, b) for b in args.batch]
        del model
    write_outputs({"env": environment(), "rows": rows}, markdown(rows), args.json_out, args.md_out)
    return 0


def register_step_kernels(bench_sub: Any) -> None:
    from qwen_awq.cli_args import add_model_args
    from qwen_awq.eval.bench_report import add_output_args
    from qwen_awq.eval.synthetic import add_synthetic_args

    p = bench_sub.add_parser("step-kernels", help="kernels per decoder layer in one decode step, fused vs unfused",
                             description=__doc__.split("\n\n")[0] + f" The decoder reads {FUSED_ENV}=0 as off.")
    add_model_args(p)
    add_synthetic_args(p, quant="many")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences in the step (default 1)")
    add_output_args(p)
    p.set_defaults(func=cmd_step_kernels)
