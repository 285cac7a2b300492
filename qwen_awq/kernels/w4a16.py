"""W4A16 matmul on the repacked layout (quant/packing.py repack_awq): the kernel family chosen by M.

M = 1: a CUDA-core GEMV, the NVRTC-compiled one (w4a16_cuda.py) or Triton's (w4a16_gemv.py), or the NVRTC
tensor-core kernel where the table says it measured faster (on the H200 for three of Qwen-7B's four shapes); M =
2..32: that tensor-core kernel (w4a16_cuda_mma.py) where it measured faster, else Triton's (w4a16_mma.py), which
also takes M up to the dense threshold; beyond it: dequantize once + cuBLAS. Per-card tables of measured choices
(w4a16_tuned.TUNED), else defaults; every NVRTC kernel falls back to Triton's choice where it cannot run. CPU
tensors, and anything the kernels do not cover, take the plain-PyTorch reference (reference.w4a16_matmul_reference).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.reference import w4a16_matmul_reference
from qwen_awq.kernels.silu_mul import silu_mul
from qwen_awq.kernels.w4a16_common import triton
from qwen_awq.kernels.w4a16_cuda import CudaGemvConfig, cuda_gemv_supported, w4a16_gemv_cuda
from qwen_awq.kernels.w4a16_cuda_mma import CudaMmaConfig, cuda_mma_supported, w4a16_mma_cuda
from qwen_awq.kernels.w4a16_cuda_norm import norm_prologue_fits, w4a16_norm_mma_cuda
from qwen_awq.kernels.w4a16_gemv import MAGIC_16, MAGIC_256, gemv_kernel
from qwen_awq.kernels.w4a16_mma import MAGIC_BF16, MAGIC_FP16, dequant_kernel, mma_kernel
from qwen_awq.kernels.w4a16_tuned import TUNED

LOCKS_PER_LAYER = 4096  # split-K tile counters per layer; a launch with more tiles runs without split-K
_INTERPRETER_SMS = 4  # stands in for the SM count when the Triton interpreter runs on CPU tensors
_DTYPES = (torch.float16, torch.bfloat16)
_CHUNK = 32  # k per 16-byte word load: the granularity of the GEMV's K ranges and the smallest group size


def _pow2(name: str, value: int) -> None:
    if value <= 0 or value & (value - 1):
        raise ConfigError(f"{name} must be a positive power of two, found {value}")


@dataclass(frozen=True)
class GemvConfig:
    """GEMV launch: rows per loop step, K lanes x 32-k chunks per lane (the K range a program holds; lanes
    beyond 32 spread over warps), warps, register prefetch of the next rows (blocks ahead: False/True = 0/1, or
    2), programs per SM to aim for (rows per program follow from it), x rows per program, whether the first
    prefetched blocks load before x (early), whether x loads as contiguous vectors (xvec) and a register cap."""

    block_n: int = 16
    lanes: int = 128
    chunks: int = 1
    num_warps: int = 4
    prefetch: bool | int = False
    progs_per_sm: int = 3
    block_m: int = 1  # x rows per program: the weights are unpacked once for all of them
    early: bool = False
    xvec: bool = False
    rows_first: bool = False  # (rows, lanes, ...) tiles: one lane per thread (w4a16_gemv.gemv_kernel, RF)
    maxnreg: int | None = None  # ptxas register cap: more programs per SM at the price of spills

    def __post_init__(self) -> None:
        for name in ("block_n", "lanes", "chunks", "num_warps", "block_m"):
            _pow2(f"GemvConfig.{name}", getattr(self, name))
        if int(self.prefetch) not in (0, 1, 2):
            raise ConfigError(f"GemvConfig.prefetch must be 0 (False), 1 (True) or 2, found {self.prefetch}")
        if self.progs_per_sm < 1:
            raise ConfigError(f"GemvConfig.progs_per_sm must be >= 1, found {self.progs_per_sm}")


@dataclass(frozen=True)
class MmaConfig:
    """Tensor-core launch: x rows (>= 16, the dot's smallest side), weight rows, K tile (capped at the group
    size), warps, pipeline stages, split-K aiming at waves programs per SM, where the scale applies."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 4
    scale_w: bool = False  # scale the weights before the dot (else the fp32 accumulator per K tile)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            _pow2(f"MmaConfig.{name}", getattr(self, name))
        if min(self.block_m, self.block_n, self.block_k) < 16 or self.num_stages < 1 or self.waves < 1:
            raise ConfigError(f"MmaConfig needs tiles >= 16, num_stages >= 1 and waves >= 1, found {self}")


# ("gemv" | "mma" | "cuda" | "cudamma" | "dense", config): Triton GEMV, Triton MMA, NVRTC GEMV, NVRTC MMA, cuBLAS
Choice = tuple[str, "GemvConfig | MmaConfig | CudaGemvConfig | CudaMmaConfig | None"]
DENSE_MIN_M = 256  # from here on dequantize + cuBLAS (H200: bench/results/awq_kernel_H200_w4a16.md)
# Up to this M the down projection takes SiLU(gate) * up in its prologue; beyond it silu_mul runs first. On the
# H200 the prologue lost at every M measured (`qwen-awq bench kernels`, fusions: M = 1: 23.5 us fused vs 18.3
# separate; M = 16: 26.8 vs 26.2; in the engine at M = 128 the down kernels took ~60 us per layer more than
# without it: bench/results/gpu_step_profile_H200.md): each N tile recomputes the activations of its whole K range.
SILU_PROLOGUE_MAX_M = 0


def silu_in_prologue(m: int) -> bool:
    return m <= SILU_PROLOGUE_MAX_M


TRITON_GEMV_M1 = GemvConfig(block_n=8, prefetch=True)  # the H200 sweep's best Triton GEMV at M = 1


REFERENCE_CARD = "NVIDIA H200"  # cards without a table take its "any" NVRTC tensor-core entries


def default_choice(m: int) -> Choice:
    """For cards without a tuned table: the H200 sweep's winners over Qwen-7B's shapes ("any" in w4a16_tuned), the
    NVRTC tensor-core entries read from that table (they fall back to triton_choice where they cannot run)."""
    entry = TUNED[REFERENCE_CARD]["table"]["any"].get(m_bucket(m))
    if entry is not None and entry[0] == "cudamma":
        return "cudamma", CudaMmaConfig(**entry[1])
    return triton_choice(m)


def triton_choice(m: int) -> Choice:
    """The Triton (or cuBLAS) kernel for M rows on a card without a table: the H200's Triton winners."""
    if m == 1:
        return "gemv", TRITON_GEMV_M1
    if m == 2:
        return "gemv", GemvConfig(block_n=8, block_m=2)
    if m >= DENSE_MIN_M:
        return "dense", None
    block_m = min(max(16, 1 << (m - 1).bit_length()), 128)  # next power of two in 16..128: one M tile to M = 128
    return "mma", MmaConfig(block_m=block_m, waves=5 if m <= 16 else 4 if m <= 32 else 2, scale_w=True)


def m_bucket(m: int) -> int:
    """The tuned table's M key: the next power of two (1, 2, 4, ..., 4096)."""
    return 1 << max(m - 1, 0).bit_length()


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


@functools.cache  # called per layer per eager forward; the answer depends on these alone
def choose(m: int, k: int, n: int, device: torch.device) -> Choice:
    """Kernel and config for M rows of a (K -> N) layer: the card's tuned table, else the defaults."""
    if device.type == "cuda":
        table = TUNED.get(_device_name(device.index or 0), {}).get("table", {})
        entry = (table.get((k, n)) or table.get("any", {})).get(m_bucket(m))
        if entry is not None:
            kind, params = entry
            config = {"gemv": GemvConfig, "mma": MmaConfig, "cuda": CudaGemvConfig, "cudamma": CudaMmaConfig}.get(kind)
            return kind, None if config is None else config(**params)
    return default_choice(m)


@dataclass(frozen=True)
class W4Weight:
    """A repacked W4A16 weight (packing.repack_awq) with its split-K counters (zero between launches)."""

    qweight_t: Tensor  # (N, K/8) int32
    scale_zero: Tensor  # (N, K/G) int32
    group_size: int
    scale_dtype: torch.dtype  # the 16-bit float dtype whose bits scale_zero holds
    locks: Tensor  # (LOCKS_PER_LAYER,) int32

    @property
    def n(self) -> int:
        return self.qweight_t.shape[0]

    @property
    def k(self) -> int:
        return self.qweight_t.shape[1] * 8


def new_locks(device: torch.device | str) -> Tensor:
    return torch.zeros(LOCKS_PER_LAYER, dtype=torch.int32, device=device)


def _check(x: Tensor, w: W4Weight, silu: bool) -> Tensor:
    """x as (M, K') with unit stride along K; with silu, x holds [gate | up] and K' = 2K."""
    if triton is None:
        raise ConfigError("the W4A16 Triton kernels need Triton: pip install triton (w4a16_matmul falls back)")
    if w.group_size % _CHUNK != 0 or w.k % w.group_size != 0:
        raise ConfigError(f"W4A16 kernels need a group size divisible by 32, found {w.group_size}")
    if x.shape[-1] != (2 * w.k if silu else w.k):
        raise ValueError(f"input has {x.shape[-1]} features, the W4A16 weight expects {w.k}{' x 2' * silu}")
    if x.dtype not in _DTYPES:
        raise ConfigError(f"W4A16 kernels take fp16 or bf16 activations, found {x.dtype}")
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _use_asm(x: Tensor) -> bool:
    """Inline PTX on the GPU; Triton's CPU interpreter runs the plain-Triton equivalent."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _grid_rows(n: int, m_groups: int, splits: int, cfg: GemvConfig, sms: int) -> tuple[int, int]:
    """(rows per program, programs along N) so that about progs_per_sm programs land on each SM."""
    target = max(1, cfg.progs_per_sm * sms // (splits * m_groups))
    rows = -(-n // target)
    rows = -(-rows // cfg.block_n) * cfg.block_n  # whole loop steps
    return rows, -(-n // rows)


def w4a16_gemv(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False,
               config: GemvConfig | None = None) -> Tensor:
    """y (..., N) on the CUDA-core GEMV: for M = 1 and a few rows (block_m x rows share each unpacked weight)."""
    x2d = _check(x, w, silu)
    cfg, (m, n, k) = config or GemvConfig(), (x2d.shape[0], w.n, w.k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    chunks = min(cfg.chunks, w.group_size // _CHUNK)  # a lane's chunks must share one group
    lanes = min(cfg.lanes, max(32, triton.next_power_of_2(-(-(k // _CHUNK) // chunks))))  # no lanes past K
    splits = -(-(k // _CHUNK) // (lanes * chunks))
    groups = -(-m // cfg.block_m)
    rows, progs = _grid_rows(n, groups, splits, cfg, _num_sms(x.device))
    if splits > 1 and progs * groups > w.locks.numel():
        raise ConfigError(f"GEMV grid needs {progs * groups} split-K counters, the layer has {w.locks.numel()}")
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    gemv_kernel[(progs, splits, groups)](
        x2d, w.qweight_t, w.scale_zero, out if bias is None else bias, out, part, w.locks,
        m, n, k // 8, k // w.group_size, x2d.stride(0), k, rows, splits, MAGIC_256, MAGIC_16,
        G=w.group_size, BLOCK_N=cfg.block_n, LANES=lanes, CHUNKS=chunks, PREFETCH=int(cfg.prefetch),
        EVEN_N=rows * progs == n, SILU=silu, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        BF16_SCALES=w.scale_dtype == torch.bfloat16, BLOCK_M=cfg.block_m, EARLY=cfg.early, XVEC=cfg.xvec,
        RF=cfg.rows_first, num_warps=cfg.num_warps, num_stages=1, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out.view(*x.shape[:-1], n)


def w4a16_mma(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False,
              config: MmaConfig | None = None, split_k: int | None = None) -> Tensor:
    """y (..., N) on the tensor-core kernel; split-K (fused reduction) fills the GPU at small M."""
    x2d = _check(x, w, silu)
    cfg, (m, n, k) = config or triton_choice(max(x2d.shape[0], 2))[1] or MmaConfig(), (x2d.shape[0], w.n, w.k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    block_k = min(cfg.block_k, w.group_size & -w.group_size)
    iters, tiles = k // block_k, -(-n // cfg.block_n) * -(-m // cfg.block_m)
    split = split_k or max(1, min(iters, cfg.waves * _num_sms(x.device) // tiles))
    if tiles > w.locks.numel():
        split = 1
    per_split = -(-iters // split)
    split = -(-iters // per_split)  # drop splits left without a K tile
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    bf16 = x.dtype == torch.bfloat16
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), split)
    mma_kernel[grid](
        x2d, w.qweight_t, w.scale_zero, out if bias is None else bias, out, part, w.locks,
        m, n, k // 8, k // w.group_size, x2d.stride(0), k, per_split, split, MAGIC_BF16 if bf16 else MAGIC_FP16,
        G=w.group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SILU=silu,
        HAS_BIAS=bias is not None, SPLIT=split > 1, BF16=bf16, BF16_SCALES=w.scale_dtype == torch.bfloat16,
        USE_ASM=_use_asm(x), SCALE_W=cfg.scale_w, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*x.shape[:-1], n)


def dequantize_w4(w: W4Weight, dtype: torch.dtype) -> Tensor:
    """W (N, K) in dtype, equal to packing.dequantize_repacked(..., dtype=dtype)."""
    if triton is None:
        raise ConfigError("the W4A16 Triton kernels need Triton: pip install triton (w4a16_matmul falls back)")
    block_n, block_k = 64, min(128, w.group_size & -w.group_size)
    out = torch.empty(w.n, w.k, dtype=dtype, device=w.qweight_t.device)
    dequant_kernel[(-(-w.n // block_n), w.k // block_k)](
        w.qweight_t, w.scale_zero, out, w.n, w.k // 8, w.k // w.group_size,
        MAGIC_BF16 if dtype == torch.bfloat16 else MAGIC_FP16, G=w.group_size, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_ASM=_use_asm(out), BF16=dtype == torch.bfloat16, BF16_SCALES=w.scale_dtype == torch.bfloat16,
        num_warps=4)
    return out


def w4a16_dense(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False) -> Tensor:
    """y (..., N): dequantize to x's dtype, then the vendor GEMM (for large M, where it beats the fused kernel)."""
    x2d = _check(x, w, silu)
    if silu:
        x2d = silu_mul(x2d)  # one pass over [gate | up], rounding as F.silu(gate) * up does
    y = F.linear(x2d, dequantize_w4(w, x.dtype), None if bias is None else bias.to(x.dtype))
    return y.view(*x.shape[:-1], w.n)


def w4a16_nvrtc_only(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False,
                     config: CudaGemvConfig | CudaMmaConfig | None = None) -> Tensor:
    """y (..., N) on one NVRTC kernel alone: the GEMV (CudaGemvConfig, the default; M <= 4) or the tensor-core
    kernel (CudaMmaConfig; M <= 64); ConfigError where it cannot run here or did not compile."""
    x2d = _check(x, w, silu)
    mma = isinstance(config, CudaMmaConfig)
    what = "tensor-core kernel (M <= 64)" if mma else "GEMV (M <= 4)"
    # checked before the SiLU pass, so that a fallback (which fuses its own) does not pay for it twice
    if not (cuda_mma_supported if mma else cuda_gemv_supported)(x2d, w.group_size):
        raise ConfigError(f"the CUDA W4A16 {what} needs a CUDA GPU (sm_80+) and torch.cuda._compile_kernel")
    if silu:
        x2d = silu_mul(x2d)
    run = w4a16_mma_cuda if mma else w4a16_gemv_cuda
    y = run(x2d, w.qweight_t, w.scale_zero, w.group_size, w.scale_dtype == torch.bfloat16, bias,
            config or CudaGemvConfig())
    if y is None:
        raise ConfigError(f"the CUDA W4A16 {what} did not compile on this machine (see the warning above)")
    return y.view(*x.shape[:-1], w.n)


def w4a16_nvrtc(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False,
                config: CudaGemvConfig | CudaMmaConfig | None = None) -> Tensor:
    """An NVRTC kernel (w4a16_nvrtc_only), or Triton's choice for this M (triton_choice) where it cannot run."""
    try:
        return w4a16_nvrtc_only(x, w, bias, silu, config)
    except ConfigError:
        return _run_triton(*triton_choice(x.numel() // max(x.shape[-1], 1)), x, w, bias, silu)


def w4a16_triton(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False) -> Tensor:
    """y (..., N) on the GPU path, the kernel chosen by M = number of x rows (choose)."""
    m = x.numel() // max(x.shape[-1], 1)
    kind, cfg = choose(m, w.k, w.n, x.device)
    if kind in ("cuda", "cudamma"):
        return w4a16_nvrtc(x, w, bias, silu, cfg)
    return _run_triton(kind, cfg, x, w, bias, silu)


def _run_triton(kind: str, cfg: GemvConfig | MmaConfig | None, x: Tensor, w: W4Weight, bias: Tensor | None,
                silu: bool) -> Tensor:
    """A Triton choice ("gemv" | "mma") or "dense" (dequantize + cuBLAS)."""
    if kind == "gemv":
        return w4a16_gemv(x, w, bias, silu, cfg)
    if kind == "mma":
        return w4a16_mma(x, w, bias, silu, cfg)
    return w4a16_dense(x, w, bias, silu)


def triton_supports(x: Tensor, w: W4Weight, bias: Tensor | None) -> bool:
    tensors = (x, w.qweight_t, w.scale_zero) + (() if bias is None else (bias,))
    return (
        triton is not None
        and all(t.is_cuda for t in tensors)
        and x.dtype in _DTYPES
        and w.group_size % _CHUNK == 0
        and not (torch.is_grad_enabled() and x.requires_grad)  # the kernels have no backward
    )


NORM_PROLOGUE_ENV = "QWEN_AWQ_NORM_PROLOGUE"  # "1": the RMSNorm prologue at one token (w4a16_norm_matmul)


def norm_prologue_wanted(x: Tensor) -> bool:
    """The cheap half of w4a16_norm_matmul's conditions: one token, and QWEN_AWQ_NORM_PROLOGUE=1."""
    return x.numel() == x.shape[-1] and os.environ.get(NORM_PROLOGUE_ENV, "0") == "1"


def norm_prologue_config(k: int, n: int, device: torch.device) -> CudaMmaConfig | None:
    """The tensor-core config that takes the RMSNorm prologue for a (K -> N) layer at M = 1: the table's M = 1
    choice where it is that kernel, else its M = 2 choice (the same kernel and tile at one x row), else None."""
    for m in (1, 2):
        kind, cfg = choose(m, k, n, device)
        if kind == "cudamma" and norm_prologue_fits(k, cfg):
            return cfg
    return None


def w4a16_norm_matmul(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, w: W4Weight,
                      bias: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """(rms_norm(x + residual) * weight @ W^T + bias, x + residual) for one token (x (..., K) with one row) in
    one launch: the residual add and RMSNorm in the tensor-core kernel's prologue (w4a16_cuda_norm), rounded as
    kernels/rms_norm.py rounds; without a residual, h = x. None where that cannot run here (more rows, no NVRTC,
    no such config in the table) and unless QWEN_AWQ_NORM_PROLOGUE=1: off by default until its GPU tests and
    batch-1 A/B have run (bench/gpu_norm_2026-12-04l.sh); the caller then norms first."""
    if not norm_prologue_wanted(x):
        return None
    if not (triton_supports(x, w, bias) and cuda_mma_supported(x, w.group_size) and weight.dtype == x.dtype
            and x.shape[-1] == w.k and (residual is None or (residual.dtype == x.dtype
                                                               and residual.numel() == x.numel()))):
        return None
    cfg = norm_prologue_config(w.k, w.n, x.device)
    got = None if cfg is None else w4a16_norm_mma_cuda(
        x, residual, weight, eps, w.qweight_t, w.scale_zero, w.group_size, w.scale_dtype == torch.bfloat16, bias,
        cfg)
    if got is None:
        return None
    y, h = got
    return y.view(*x.shape[:-1], w.n), h.view(x.shape)


def w4a16_matmul(x: Tensor, w: W4Weight, bias: Tensor | None = None, silu: bool = False) -> Tensor:
    """y [..., N] = x' @ W^T + bias in x's dtype, x' = x or silu(x[..., :K]) * x[..., K:] (silu: x is the
    gate_up output). Triton on CUDA, else the plain-PyTorch reference."""
    if triton_supports(x, w, bias):
        return w4a16_triton(x, w, bias, silu)
    return w4a16_matmul_reference(x, w.qweight_t, w.scale_zero, w.group_size, w.scale_dtype, bias, silu)
