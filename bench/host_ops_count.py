"""Device ops that an engine decode step runs outside its CUDA graph (issue 12 item 2), counted on the CPU.

A qwen-tiny engine gets DecodeGraphs whose "graphs" (and greedy tails) replay eagerly, as tests/test_engine.py
does; a TorchDispatchMode counts every aten op of the decode steps outside those replays, by kind: tensors made
from host data (torch.tensor: an H2D copy each on a GPU when made on the device), uploads (.to(device) of a
host-built tensor: an H2D on a GPU, a no-op here), copies, fills, graph replays, other compute (views are free).

  python3 bench/host_ops_count.py [--batch 1] [--tokens 8] [--sampling greedy|topp]
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.kv_cache import KVPool
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.eval.synthetic import load_synthetic

HOST_DATA = {"aten.detach_.default"}  # what torch.tensor(list) dispatches under inference mode


# lift_fresh: torch.tensor's no-op; resolve_*: what tolist() calls on the tensor it reads (host work, no kernel);
# empty: an allocation, no kernel.
HOST_ONLY = {torch.ops.aten.lift_fresh.default, torch.ops.aten.resolve_conj.default,
             torch.ops.aten.resolve_neg.default, torch.ops.aten.empty.memory_format}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = False

    @contextlib.contextmanager
    def hidden(self):
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and func not in HOST_ONLY and not _is_view(func, out, args):  # views cost nothing
            self.counts[str(func)] += 1
        return out


class _READ:
    is_write = False


def _is_view(func, out, args) -> bool:
    """True when the op returned (a view of) an input's storage without writing it: `to` a dtype it already has,
    slices, views; in-place ops (copy_, fill_) and new tensors count."""
    if isinstance(out, (tuple, list)):
        return bool(out) and all(_is_view(func, o, args) for o in out)
    if not isinstance(out, torch.Tensor):
        return False
    inputs = [a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)]
    return out.untyped_storage().data_ptr() in inputs and not (func._schema.returns[0].alias_info or _READ).is_write


class CountedReplay:
    """An eager stand-in for a captured graph, invisible to the counter but for one "graph replay"."""

    def __init__(self, fn, b: int, counter: OpCounter) -> None:
        self.fn, self.b, self.counter = fn, b, counter

    def replay(self) -> None:
        self.counter.counts["graph replay"] += 1
        with self.counter.hidden():
            self.fn(self.b)


@contextlib.contextmanager
def counted_uploads(counter: OpCounter):
    """Tensor.to(device, non_blocking=True) of a host tensor is an H2D copy on a GPU but returns the tensor itself
    on the CPU (no op): counted here as "upload". Tensor.numpy() (host-only) is hidden from the counter."""
    to, numpy = torch.Tensor.to, torch.Tensor.numpy

    def counted_to(self, *a, **k):
        if k.get("non_blocking") and not counter.paused:
            counter.counts["upload (H2D on a GPU)"] += 1
        return to(self, *a, **k)

    def hidden_numpy(self, *a, **k):
        with counter.hidden():
            return numpy(self, *a, **k)
    torch.Tensor.to, torch.Tensor.numpy = counted_to, hidden_numpy
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.numpy = to, numpy


def graphed_engine(batch: int, counter: OpCounter) -> LLMEngine:
    model = load_synthetic("qwen-tiny", device="cpu", dtype="float32")
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=batch, max_model_len=256, kv_cache_memory=2**24))
    n = engine.block_manager.num_blocks
    engine.pool = engine.runner.pool = KVPool(model.cfg, n + 1, 16, model.dtype, model.device)
    graphs = engine.runner.graphs = DecodeGraphs(model, engine.pool, batch, 256 // 16, scratch_block=n)
    graphs.logits = torch.empty(graphs.sizes[-1], model.cfg.vocab_size)
    def forward(b: int) -> None:
        graphs.logits[:b].copy_(graphs._forward(b))
    graphs.graphs = {b: CountedReplay(forward, b, counter) for b in graphs.sizes}
    graphs.tails = {b: CountedReplay(graphs._greedy_tail, b, counter) for b in graphs.sizes}
    return engine


def summarize(counts: Counter[str]) -> dict[str, int]:
    kinds = Counter()
    for name, k in counts.items():
        kind = ("host data" if name in HOST_DATA else "upload" if name.startswith("upload")
                else "graph replay" if name == "graph replay"
                else "copy" if "copy" in name else "fill" if "fill" in name else "compute")
        kinds[kind] += k
    return dict(kinds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--sampling", choices=["greedy", "topp"], default="greedy")
    args = ap.parse_args()
    counter = OpCounter()
    engine = graphed_engine(args.batch, counter)
    params = (SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True) if args.sampling == "greedy"
              else SamplingParams(temperature=0.7, top_p=0.8, max_tokens=args.tokens, ignore_eos=True, seed=1))
    for i in range(args.batch):
        engine.add_request(f"r{i}", [100 + i, 7, 9], params)
    engine.step()  # the prefill step (eager) is not counted
    decode_steps = 0
    with torch.inference_mode(), counter, counted_uploads(counter):
        while engine.has_unfinished():
            engine.step()
            decode_steps += 1
    per_step = {k: round(v / decode_steps, 2) for k, v in sorted(counter.counts.items())}
    kinds = {k: round(v / decode_steps, 2) for k, v in summarize(counter.counts).items()}
    print(json.dumps({"batch": args.batch, "sampling": args.sampling, "decode_steps": decode_steps,
                      "replays": engine.runner.graphs.replays, "per_step_by_kind": kinds,
                      "per_step_ops": per_step}, indent=1))


if __name__ == "__main__":
    main()
