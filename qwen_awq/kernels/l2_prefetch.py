"""L2 prefetch of the next weight matrix of a decode step, on a second stream (issue 10).

At batch 1 HBM idles while the small kernels between a layer's four GEMVs run (norms, rotary, attention, SiLU) and
during each GEMV's ramp and tail: one kernel per matrix reads these sizes at <= 57% of copy bandwidth on the H200
(bench/results/gemv_cuda_H200_2026-12-03.md). The weights do not depend on the step's data, so a one-block kernel on
a side stream can start pulling the next matrix's first bytes into L2 while that other work runs, and the next
GEMV finds them there. A prefetch is only a hint: every output is bit-identical with it on or off (a GPU test).

The chain (decode_chain) is every layer's qkv, o, gate_up and down projections, then the lm_head, in the order a
step runs them. `prefetching(model)` wraps one decode forward (the CUDA-graph capture does): hooks launch, at matrix
j, the prefetch of matrix j + 1 (QWEN_AWQ_L2_PREFETCH=during: forked before matrix j's kernel, so it overlaps it;
=after: forked after it, overlapping the small kernels), capped at QWEN_AWQ_L2_PREFETCH_MB per matrix, spread
over QWEN_AWQ_L2_PREFETCH_BLOCKS one-warp blocks; the forward's exit joins the side stream, so a captured graph
has no dangling branch. Off by default until measured (=off); the CPU and cards without NVRTC never prefetch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.w4a16_cuda import NvrtcKernel, compile_variant, nvrtc_enabled

MODES = ("off", "during", "after")
CHUNK = 1 << 15  # bytes per bulk prefetch instruction (a multiple of 16, as cp.async.bulk wants)
THREADS = 32  # per block: one warp, each lane a chunk at a time; the blocks spread the issue over SMs

_SOURCE = r"""
// Prefetch into L2 the first a_bytes of a and b_bytes of b (a matrix's packed weights and its scales; multiples
// of 16): thread i of the grid takes chunks i, i + grid threads, ... of CHUNK bytes, one bulk prefetch each
// (sm_90: cp.async.bulk; LAST: with an evict-last L2 policy) or one line prefetch per 128 bytes.
__device__ __forceinline__ void fetch(const char* p, int bytes) {
#if BULK && LAST
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" :: "l"(p), "r"(bytes), "l"(policy)
                 : "memory");
#elif BULK
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
#else
    for (int off = 0; off < bytes; off += 128)
        asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(p + off) : "memory");
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS) KERNEL_NAME(const char* a, int a_bytes, const char* b,
                                                                     int b_bytes) {
    const int a_chunks = (a_bytes + CHUNK - 1) / CHUNK, total = a_chunks + (b_bytes + CHUNK - 1) / CHUNK;
    for (int i = blockIdx.x * THREADS + threadIdx.x; i < total; i += gridDim.x * THREADS) {
        const bool in_a = i < a_chunks;
        const int off = (in_a ? i : i - a_chunks) * CHUNK;
        fetch((in_a ? a : b) + off, min(CHUNK, (in_a ? a_bytes : b_bytes) - off));
    }
}
"""


@dataclass(frozen=True)
class PrefetchConfig:
    """Where the prefetch of matrix j + 1 forks (see the module doc), bytes per matrix, bulk or line prefetches."""

    mode: str = "off"
    megabytes: float = 16.0
    bulk: bool = True
    blocks: int = 32
    evict_last: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"QWEN_AWQ_L2_PREFETCH must be one of {', '.join(MODES)}, found {self.mode!r}")
        if self.megabytes <= 0:
            raise ConfigError(f"QWEN_AWQ_L2_PREFETCH_MB must be positive, found {self.megabytes}")
        if not 1 <= self.blocks <= 1024:
            raise ConfigError(f"QWEN_AWQ_L2_PREFETCH_BLOCKS must be in 1..1024, found {self.blocks}")

    @classmethod
    def from_env(cls) -> PrefetchConfig:
        env = os.environ.get
        return cls(env("QWEN_AWQ_L2_PREFETCH", "off"), float(env("QWEN_AWQ_L2_PREFETCH_MB", "16")),
                   env("QWEN_AWQ_L2_PREFETCH_BULK", "1") != "0", int(env("QWEN_AWQ_L2_PREFETCH_BLOCKS", "32")),
                   env("QWEN_AWQ_L2_PREFETCH_LAST", "0") == "1")


def weights_of(module: nn.Module) -> list[Tensor]:
    """The tensors a linear layer's kernel streams, in the order it reads them (repacked AWQ: words, then
    scales/zeros; a plain Linear: its weight); [] for anything else."""
    if getattr(module, "repacked", False):
        return [module.qweight_t, module.scale_zero]
    weight = getattr(module, "weight", None)
    return [weight] if isinstance(weight, Tensor) and weight.dim() == 2 else []


def decode_chain(model: nn.Module) -> list[nn.Module]:
    """The matrices of one decode step in launch order: per block qkv, o, gate_up, down; then the lm_head."""
    chain = []
    for block in model.layers:
        chain += [block.attn.qkv_proj, block.attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj]
    return chain + [model.lm_head]


@functools.cache
def _kernel(bulk: bool, last: bool) -> NvrtcKernel | None:
    if bulk and torch.cuda.get_device_capability() < (9, 0):
        return None  # cp.async.bulk is sm_90's
    defines = {"BULK": int(bulk), "LAST": int(last), "CHUNK": CHUNK, "THREADS": THREADS}
    return compile_variant(_SOURCE, "l2_prefetch", defines, "no prefetch")


@functools.cache
def _side_stream(device: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def prefetch(tensors: list[Tensor], budget: int, cfg: PrefetchConfig) -> None:
    """Prefetch on the current stream the same leading fraction of each of one or two tensors (a matrix's words and
    its scales, both row-major over the output rows, so the first rows whole), `budget` bytes in all."""
    kernel = _kernel(cfg.bulk, cfg.evict_last)
    if kernel is None or not tensors:
        return
    sizes = [t.numel() * t.element_size() for t in tensors[:2]]
    fraction = min(1.0, budget / sum(sizes))
    args = []
    for t, size in zip(tensors[:2], sizes, strict=True):
        args += [t, int(size * fraction) // 16 * 16]
    if len(args) == 2:
        args += [tensors[0], 0]  # no second buffer
    if args[1] + args[3]:
        kernel(cfg.blocks, THREADS, args)


class _Chain:
    """The hooks of one prefetching forward: fork a prefetch of matrix j + 1 at matrix j. No GEMV waits for one (a
    prefetch that waits for its bytes takes as long as they do: joined before each next matrix, a one-block version
    halved batch-1 decode on the H200); the side stream keeps them in order, and one join ends the forward."""

    def __init__(self, chain: list[nn.Module], cfg: PrefetchConfig, device: torch.device) -> None:
        self.next = {id(m): chain[i + 1] for i, m in enumerate(chain[:-1])}
        self.cfg, self.budget = cfg, int(cfg.megabytes * (1 << 20))
        self.side = _side_stream(device.index or 0)
        self.pending = False

    def fork(self, target: nn.Module) -> None:
        tensors = weights_of(target)
        if not tensors:
            return
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            prefetch(tensors, self.budget, self.cfg)
        self.pending = True

    def join(self) -> None:
        if self.pending:
            torch.cuda.current_stream().wait_stream(self.side)
            self.pending = False

    def before(self, module: nn.Module, args: tuple) -> None:
        if self.cfg.mode == "during" and id(module) in self.next:
            self.fork(self.next[id(module)])

    def after(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.cfg.mode == "after" and id(module) in self.next:
            self.fork(self.next[id(module)])


def enabled(model: nn.Module, cfg: PrefetchConfig) -> bool:
    device = model.device
    probe = torch.empty(1, 1, dtype=torch.float16, device=device)
    on = cfg.mode != "off" and device.type == "cuda" and nvrtc_enabled(probe)
    return on and _kernel(cfg.bulk, cfg.evict_last) is not None


@contextmanager
def prefetching(model: nn.Module, cfg: PrefetchConfig | None = None) -> Iterator[None]:
    """Within: one decode forward of `model` prefetches each next matrix (where cfg, by default the environment's,
    turns it on); on exit every prefetch is joined to the current stream."""
    cfg = cfg or PrefetchConfig.from_env()
    if not enabled(model, cfg):
        yield
        return
    chain = decode_chain(model)
    hooks = _Chain(chain, cfg, model.device)
    handles = [h for m in chain for h in (m.register_forward_pre_hook(hooks.before),
                                          m.register_forward_hook(hooks.after))]
    try:
        hooks.fork(chain[0])  # the first matrix overlaps the embedding and the first norm
        yield
    finally:
        hooks.join()
        for h in handles:
            h.remove()
