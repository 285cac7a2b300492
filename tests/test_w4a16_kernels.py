"""W4A16 kernels on the repacked layout (GEMV, tensor-core, dequantize + cuBLAS, the dispatcher) and the fused
add + RMSNorm against float64 oracles: compiled on the GPU under QWEN_AWQ_TEST_DEVICE=cuda (there also at
Qwen-7B's real shapes and in bf16 on tensor cores), else run by Triton's CPU interpreter in a subprocess.

TRITON_INTERPRET must be set before a kernel is decorated, so `python tests/test_w4a16_kernels.py` (with the
variable set) computes every case and prints JSON, as tests/test_awq_kernel.py does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
from assets import DEVICE
from interpret import run_interpreted

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Max |y - oracle| / max |oracle|: one rounding of the output (fp16 2**-11, bf16 2**-8) plus fp32 summation
# order; a misplaced nibble, zero or scale errs by O(1) on this scale.
TOLERANCE = {"fp16": 4e-3, "bf16": 3e-2}


@dataclass(frozen=True)
class Case:
    path: str  # gemv | mma | dense | cuda, cudamma, cudanorm (NVRTC, GPU only) | fallback, fallbackmma (their CPU
    # fallbacks) | auto | dequant | norm
    m: int
    k: int
    n: int
    group: int = 128
    dtype: str = "fp16"
    bias: bool = False
    silu: bool = False
    scales: str = "fp16"  # the dtype whose bits scale_zero stores
    layout: str = "2d"  # 2d | 3d: x (2, M/2, K) | strided: x a column slice of a wider tensor
    config: tuple = ()  # (name, value) pairs for GemvConfig / MmaConfig / CudaGemvConfig / CudaMmaConfig
    split: int | None = None
    resid: bool = False  # cudanorm: a residual added before the norm (else the first block's norm(x))

    @property
    def id(self) -> str:
        named = (("bias", self.bias), ("silu", self.silu), ("resid", self.resid))
        flags = "-".join(f for f, on in named if on) or "plain"
        cfg = "".join(f"-{k}{v}" for k, v in self.config)
        return (f"{self.path}-m{self.m}-k{self.k}-n{self.n}-g{self.group}-{self.dtype}-s{self.scales}-{flags}"
                f"-{self.layout}{cfg}-split{self.split}")


G = (("lanes", 4), ("chunks", 1), ("block_n", 8))  # small GEMV K ranges: several splits on small K
CASES = [
    Case("gemv", 1, 256, 40, 32, bias=True, config=G),
    Case("gemv", 1, 640, 40, 64, config=(("lanes", 8), ("chunks", 2), ("block_n", 16))),  # K tail masked
    Case("gemv", 2, 384, 48, 128, "bf16", silu=True, config=(("lanes", 2), ("chunks", 2), ("prefetch", False))),
    Case("gemv", 1, 128, 64, 128, "bf16", bias=True, scales="bf16", config=(("lanes", 4), ("chunks", 1))),
    Case("gemv", 3, 256, 56, 64, bias=True, layout="strided", config=G),
    Case("gemv", 3, 256, 40, 64, bias=True, config=(("lanes", 2), ("chunks", 2), ("block_m", 2))),  # ragged M
    Case("gemv", 4, 256, 16, 128, "bf16", silu=True, config=(("lanes", 4), ("chunks", 1), ("block_m", 4),
                                                            ("block_n", 4), ("prefetch", False))),
    # prefetch 2 blocks ahead, first blocks before x, x as vectors: split-K, a ragged last block in a multi-block
    # program (rows first), SiLU with two x rows, ragged M; and a register cap
    Case("gemv", 1, 640, 72, 64, bias=True, config=(("lanes", 8), ("chunks", 2), ("block_n", 16), ("prefetch", 2),
                                                    ("early", True), ("xvec", True), ("progs_per_sm", 1),
                                                    ("rows_first", True))),
    Case("gemv", 2, 384, 48, 128, "bf16", silu=True, config=(("lanes", 2), ("chunks", 2), ("prefetch", 2),
                                                              ("xvec", True), ("block_m", 2))),
    Case("gemv", 3, 256, 40, 32, config=(("lanes", 4), ("block_n", 8), ("prefetch", True), ("early", True),
                                         ("block_m", 2), ("maxnreg", 128))),
    # rows-first tiles (one lane per thread) without prefetch, with chunks sharing a group, and with x as vectors
    Case("gemv", 2, 384, 48, 64, "bf16", bias=True, silu=True, scales="bf16",
         config=(("lanes", 4), ("chunks", 2), ("block_n", 4), ("rows_first", True), ("block_m", 2))),
    Case("gemv", 3, 256, 56, 32, config=(("lanes", 4), ("block_n", 8), ("prefetch", True), ("rows_first", True),
                                         ("xvec", True), ("block_m", 2))),
    Case("mma", 1, 256, 72, 64, bias=True, config=(("block_n", 32), ("block_k", 64))),
    Case("mma", 3, 256, 200, 32, layout="strided", config=(("block_n", 64),), split=3),
    Case("mma", 16, 128, 64, 32, bias=True, scales="bf16", config=(("block_n", 16),), split=1),
    Case("mma", 17, 384, 40, 128, silu=True, config=(("block_n", 16),), split=3),
    Case("mma", 33, 256, 136, 64, bias=True, config=(("block_m", 32), ("block_n", 32))),
    Case("mma", 5, 256, 72, 64, config=(("block_n", 32), ("scale_w", True)), split=2),
    Case("dense", 33, 256, 200, 64, bias=True),
    Case("dense", 5, 256, 72, 128, "bf16", silu=True),
    Case("dequant", 0, 256, 200, 64),
    Case("dequant", 0, 384, 40, 128, scales="bf16"),
    Case("fallback", 1, 256, 40, 32, bias=True),  # the "cuda" table kind where NVRTC cannot run: Triton's GEMV
    Case("fallback", 2, 384, 48, 128, "bf16", silu=True),
    Case("fallbackmma", 5, 256, 72, 64, bias=True),  # the "cudamma" kind off the GPU: Triton's tensor-core kernel
    Case("fallbackmma", 2, 384, 40, 32, silu=True),  # ... and Triton's GEMV at M = 2
    Case("auto", 1, 256, 200, 64, bias=True, layout="3d"),
    Case("auto", 6, 256, 200, 64, layout="3d"),
    Case("auto", 300, 128, 64, 32, bias=True),
    Case("norm", 3, 0, 200, dtype="fp16"),
    Case("norm", 2, 0, 96, layout="strided"),
]
# The interpreter adds bf16 and multiplies bf16 dots on their raw 16-bit storage and truncates fp32 -> bf16, so
# bf16 on tensor cores and the exact bf16 roundings are checked on the GPU only, together with Qwen-7B's shapes
# (K, N): qkv, o, gate_up, down.
SA = (("scale_after", True),)  # CudaMmaConfig.scale_after
GPU_CASES = [
    Case("mma", 3, 256, 200, 64, "bf16", bias=True, config=(("block_n", 64),)),
    Case("mma", 7, 384, 200, 128, "bf16", bias=True, config=(("block_n", 64), ("scale_w", True))),
    Case("mma", 20, 256, 136, 64, silu=True, config=(("block_m", 32), ("block_n", 64), ("scale_w", True))),
    Case("gemv", 3, 512, 200, 128, "bf16", config=(("lanes", 128), ("chunks", 1), ("block_n", 16),
                                                     ("block_m", 2), ("prefetch", False)), layout="3d"),
    Case("mma", 40, 384, 72, 128, "bf16", silu=True, config=(("block_m", 64), ("block_n", 64))),
    Case("dequant", 0, 256, 200, 32, "bf16"),
    Case("dequant", 0, 384, 40, 128, "bf16", scales="bf16"),
    Case("norm", 2, 0, 96, dtype="bf16", layout="strided"),
    Case("norm", 5, 0, 4096, dtype="bf16"),
    Case("gemv", 1, 4096, 12288, bias=True),  # Qwen-7B's real shapes; the sweep checks every config at them too
    Case("gemv", 1, 11008, 4096, dtype="bf16", silu=True),
    Case("mma", 4, 11008, 4096, dtype="bf16", silu=True),
    Case("mma", 64, 4096, 22016),
    # 128-token tiles (the H200 table's M = 128 entries): ragged M and N, bias; K tiles of 64 at the real shape
    Case("mma", 100, 384, 200, 128, bias=True, config=(("block_m", 128), ("scale_w", True))),
    Case("mma", 128, 4096, 22016, config=(("block_m", 128), ("block_k", 64), ("num_stages", 4), ("scale_w", True))),
    Case("auto", 4096, 4096, 4096, bias=True),
    # The NVRTC GEMV: ragged N (rows per block 8), K with fewer chunks than lanes and with a ragged last step,
    # every group size, bf16 activations and scales, a strided and a 3-d x, M = 1..4, the real shapes.
    Case("cuda", 1, 256, 40, 32, bias=True, config=(("rows", 2), ("unroll", 4))),
    Case("cuda", 1, 640, 48, 64, config=(("rows", 1), ("unroll", 2), ("warps", 2))),
    Case("cuda", 2, 11008, 72, 128, "bf16", silu=True, config=(("rows", 4), ("unroll", 2))),
    Case("cuda", 3, 4096, 200, 128, bias=True, scales="bf16", layout="strided", config=(("rows", 1),)),
    Case("cuda", 4, 384, 48, 64, "bf16", bias=True, scales="bf16", layout="3d", config=(("unroll", 1),)),
    Case("cuda", 1, 4096, 12288, bias=True, config=(("rows", 2), ("unroll", 4))),
    Case("cuda", 1, 11008, 4096, silu=True, config=(("rows", 1), ("unroll", 8), ("warps", 8))),
    Case("cuda", 2, 4096, 22016, dtype="bf16"),
    # The NVRTC tensor-core kernel: ragged N (not a multiple of 16, nor of a block's rows), K with a ragged last
    # 128-k step (672 = 21 x 32) and fewer steps than K warps, every group size, M = 1..64 (1, 2, 4, 8 n-tiles,
    # ragged), bf16 activations and scales, bias, SiLU, strided and 3-d x, then the real shapes.
    Case("cudamma", 2, 672, 40, 32, bias=True, config=(("rb", 1), ("wn", 2), ("wk", 4))),
    Case("cudamma", 9, 640, 72, 64, "bf16", config=(("rb", 2), ("wn", 1), ("wk", 2), ("unroll", 2))),
    Case("cudamma", 17, 384, 200, 128, bias=True, scales="bf16", layout="strided", config=(("wk", 8),)),
    Case("cudamma", 24, 672, 72, 32, "bf16", bias=True, config=(("rb", 1), ("wk", 4), ("xperm", True))),
    Case("cudamma", 3, 384, 40, 64, scales="bf16", layout="strided", config=(("wn", 2), ("wk", 2), ("xperm", True))),
    Case("cudamma", 64, 640, 200, 128, layout="3d", config=(("rb", 1), ("wk", 4), ("unroll", 2), ("xperm", True))),
    Case("cudamma", 33, 672, 48, 32, "bf16", silu=True, config=(("rb", 1), ("wn", 1), ("wk", 2))),
    Case("cudamma", 64, 256, 136, 64, bias=True, layout="3d", config=(("rb", 1), ("wn", 2), ("wk", 2))),
    Case("cudamma", 1, 4096, 200, 128, "bf16", bias=True, scales="bf16", config=(("unroll", 2),)),
    Case("cudamma", 16, 4096, 12288, bias=True),
    Case("cudamma", 8, 11008, 4096, silu=True, config=(("rb", 1), ("wn", 1), ("wk", 8))),
    Case("cudamma", 32, 4096, 22016, dtype="bf16", config=(("rb", 2), ("wn", 2), ("wk", 2))),
    Case("cudamma", 5, 4096, 4096, config=(("rb", 1), ("wn", 2), ("wk", 4), ("unroll", 2))),
    # scale_after (each 128-k step's sums scaled, the fold deferred past the next loads): ragged N and steps
    # (640 = 5 steps over 2 or 4 K warps), unroll 2, bf16 (its own dequant), bias, SiLU, xperm, every n-tile
    # count, the real shapes; and a group size of 64, where the flag is ignored (the weight-scaled path)
    Case("cudamma", 1, 640, 200, 128, bias=True, config=(("rb", 2), ("wk", 2), ("unroll", 2)) + SA),
    Case("cudamma", 3, 640, 72, 128, "bf16", scales="bf16", layout="strided", config=(("wn", 2), ("wk", 4)) + SA),
    Case("cudamma", 12, 384, 40, 128, "bf16", bias=True, config=(("rb", 1), ("wk", 2), ("xperm", True)) + SA),
    Case("cudamma", 40, 640, 136, 128, silu=True, layout="3d", config=(("rb", 1), ("wk", 4), ("unroll", 2)) + SA),
    Case("cudamma", 2, 384, 48, 64, bias=True, config=(("rb", 1), ("wk", 2)) + SA),
    Case("cudamma", 1, 4096, 12288, bias=True, config=(("rb", 2), ("wk", 8)) + SA),
    Case("cudamma", 1, 11008, 4096, config=(("rb", 1), ("wn", 2), ("wk", 16)) + SA),
    Case("cudamma", 1, 4096, 22016, dtype="bf16", config=(("rb", 2), ("wn", 2), ("wk", 4)) + SA),
    Case("cudamma", 32, 4096, 12288, config=(("rb", 1), ("wn", 2), ("wk", 4), ("xperm", True)) + SA),
    # The residual add + RMSNorm in the tensor-core kernel's prologue (one x row): fewer 16-byte vectors than
    # threads (672 = 84 x 8), several per thread (8192), ragged N and steps, bf16, bias, no residual (the first
    # block), both scalings, xperm asked for (the prologue drops it), the two real shapes it takes.
    Case("cudanorm", 1, 672, 72, 32, bias=True, resid=True, config=(("rb", 1), ("wk", 4))),
    Case("cudanorm", 1, 8192, 40, 128, "bf16", resid=True, config=(("rb", 1), ("wn", 2), ("wk", 4)) + SA),
    Case("cudanorm", 1, 640, 200, 128, config=(("rb", 2), ("wk", 2), ("unroll", 2)) + SA),
    Case("cudanorm", 1, 384, 48, 64, "bf16", bias=True, scales="bf16", resid=True, config=(("wk", 2), ("xperm", True))),
    Case("cudanorm", 1, 4096, 12288, bias=True, resid=True, config=(("rb", 2), ("wk", 8)) + SA),
    Case("cudanorm", 1, 4096, 22016, resid=True, config=(("rb", 2), ("wn", 2), ("wk", 4)) + SA),
]


def _weights(case: Case, seed: int, device: str):
    """Random AWQ GEMM tensors on `device` (full-range words: negative ones test the shifts), and their repack."""
    from qwen_awq.quant.packing import repack_awq

    gen = torch.Generator().manual_seed(seed)
    k, n, g = case.k, case.n, case.group
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)  # (K, N/8)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // g, n // 8), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.002).to(DTYPES[case.scales])  # never zero
    awq = (qweight.to(device), qzeros.to(device), scales.to(device))
    return awq, repack_awq(*awq, g)


def _inputs(case: Case, width: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.m, 2 * width, generator=gen).to(DTYPES[case.dtype]).to(device)  # (M, 2W)
    x = x[:, :width] if case.layout == "strided" else x[:, width:].contiguous()  # (M, W)
    if case.layout == "3d":
        x = x.view(2, case.m // 2, width) if case.m % 2 == 0 else x.view(1, case.m, width)
    bias = torch.randn(case.n, generator=gen).half().to(device) if case.bias else None  # (N,)
    return x, bias


def _norm_case(case: Case, seed: int, device: str) -> tuple[float, float]:
    """Fused add + RMSNorm against the float64 sum, norm and weight, each rounded where Qwen's block rounds."""
    from qwen_awq.kernels.rms_norm import fused_add_rms_norm

    x, _ = _inputs(case, case.n, seed, device)
    residual, _ = _inputs(case, case.n, seed + 7, device)
    weight = (torch.rand(case.n, generator=torch.Generator().manual_seed(seed)) + 0.5).to(x.dtype).to(device)
    normed, new_res = fused_add_rms_norm(x, residual, weight, 1e-6)
    h = (x.double() + residual.double()).to(x.dtype)  # the sum rounds once, as x + residual does
    n64 = h.double() * torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    expect = (n64.to(x.dtype).double() * weight.double()).cpu()
    if not torch.equal(new_res.cpu(), h.cpu()):  # new_residual must be exact
        return float("inf"), 0.0
    return float((normed.double().cpu() - expect).abs().max() / expect.abs().max()), TOLERANCE[case.dtype]


def _norm_matmul_case(case: Case, seed: int, device: str) -> tuple[float, float]:
    """The RMSNorm prologue of the tensor-core kernel against the float64 norm (rounded where Qwen's block rounds)
    and product; the returned residual must be x + residual exactly (x itself without one)."""
    from qwen_awq.kernels import w4a16_cuda_mma as mma
    from qwen_awq.kernels.w4a16_cuda_norm import w4a16_norm_mma_cuda
    from qwen_awq.quant.packing import dequantize

    (qweight, qzeros, scales), (qweight_t, scale_zero) = _weights(case, seed, device)
    w_exact = dequantize(qweight, qzeros, scales, case.group).t()  # (N, K)
    x, bias = _inputs(case, case.k, seed, device)  # (1, K)
    residual = _inputs(case, case.k, seed + 7, device)[0] if case.resid else None
    weight = (torch.rand(case.k, generator=torch.Generator().manual_seed(seed)) + 0.5).to(x.dtype).to(device)
    got = w4a16_norm_mma_cuda(x, residual, weight, 1e-6, qweight_t, scale_zero, case.group,
                              scales.dtype == torch.bfloat16, bias, mma.CudaMmaConfig(**dict(case.config)))
    if got is None:
        return float("inf"), 0.0
    y, h = got
    h_ref = x if residual is None else (x.double() + residual.double()).to(x.dtype)  # one rounding
    n64 = h_ref.double() * torch.rsqrt(h_ref.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    xn = (n64.to(x.dtype).double() * weight.double()).to(x.dtype)  # what the projection reads
    ref = xn.double() @ w_exact.double().t() + (0 if bias is None else bias.double())
    if not torch.equal(h.cpu(), h_ref.cpu()) or y.shape != ref.shape:
        return float("inf"), 0.0
    return float((y.double() - ref).abs().max() / ref.abs().max()), TOLERANCE[case.dtype]


def _run_case(case: Case, seed: int, device: str = "cpu") -> tuple[float, float]:
    """(relative error vs a float64 oracle, tolerance) of one case; dequant must be exact."""
    from qwen_awq.kernels import w4a16 as kern
    from qwen_awq.quant.packing import dequantize

    if case.path == "norm":
        return _norm_case(case, seed, device)
    if case.path == "cudanorm":
        return _norm_matmul_case(case, seed, device)
    (qweight, qzeros, scales), (qweight_t, scale_zero) = _weights(case, seed, device)
    w = kern.W4Weight(qweight_t, scale_zero, case.group, scales.dtype, kern.new_locks(device))
    w_exact = dequantize(qweight, qzeros, scales, case.group).t()  # (N, K) fp32, from the AutoAWQ layout
    if case.path == "dequant":
        got = kern.dequantize_w4(w, DTYPES[case.dtype])
        return float((got.float() - w_exact.to(got.dtype).float()).abs().max()), 0.0
    x, bias = _inputs(case, 2 * case.k if case.silu else case.k, seed, device)
    cfg = dict(case.config)
    if case.path == "gemv":
        y = kern.w4a16_gemv(x, w, bias, case.silu, kern.GemvConfig(**cfg))
    elif case.path == "mma":
        y = kern.w4a16_mma(x, w, bias, case.silu, kern.MmaConfig(**cfg), split_k=case.split)
    elif case.path == "dense":
        y = kern.w4a16_dense(x, w, bias, case.silu)
    elif case.path == "cuda":
        y = kern.w4a16_nvrtc_only(x, w, bias, case.silu, kern.CudaGemvConfig(**cfg))
    elif case.path == "cudamma":
        y = kern.w4a16_nvrtc_only(x, w, bias, case.silu, kern.CudaMmaConfig(**cfg))
    elif case.path == "fallback":
        y = kern.w4a16_nvrtc(x, w, bias, case.silu, kern.CudaGemvConfig())
    elif case.path == "fallbackmma":
        y = kern.w4a16_nvrtc(x, w, bias, case.silu, kern.CudaMmaConfig())
    else:
        y = kern.w4a16_triton(x, w, bias, case.silu)
    xa = x.double()
    if case.silu:  # the oracle applies silu in float64 to the same inputs
        gate, up = xa.chunk(2, dim=-1)
        xa = gate * torch.sigmoid(gate) * up
    ref = xa @ w_exact.double().t() + (0 if bias is None else bias.double())
    if y.shape != ref.shape or y.dtype != x.dtype or int(w.locks.abs().sum()) != 0:
        return float("inf"), TOLERANCE[case.dtype]  # split-K counters must be reset for the next launch
    return float((y.double() - ref).abs().max() / ref.abs().max()), TOLERANCE[case.dtype]


def _main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    print(json.dumps({case.id: _run_case(case, seed) for seed, case in enumerate(CASES)}))


def _cases() -> list[Case]:
    return CASES + GPU_CASES if DEVICE.startswith("cuda") else CASES


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, list[float]]:
    """Per case (error, tolerance): compiled on the GPU when the tests run there, else through the Triton
    interpreter on the CPU, in a subprocess because TRITON_INTERPRET is read when kernels are decorated."""
    if DEVICE.startswith("cuda"):
        return _OnDemand({case.id: (seed, case) for seed, case in enumerate(_cases())})
    return run_interpreted(__file__, timeout=900, threads=1)


class _OnDemand(dict):
    """On the GPU each case compiles and runs when its test asks (so `-k` selects what gets compiled)."""

    def __init__(self, cases: dict[str, tuple[int, Case]]) -> None:
        super().__init__()
        self.cases = cases

    def __missing__(self, case_id: str) -> list[float]:
        seed, case = self.cases[case_id]
        self[case_id] = list(_run_case(case, seed, DEVICE))
        return self[case_id]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_kernel_matches_float64_oracle(kernel_errors: dict[str, list[float]], case: Case) -> None:
    err, tol = kernel_errors[case.id]
    assert err <= tol, f"{case.id}: error {err:.3g} > {tol:.3g}"


if __name__ == "__main__":
    _main()


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a GPU (QWEN_AWQ_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_graph_replay_with_split_k_matches_eager(m: int) -> None:
    """Replays reuse the split-K counters: each launch must leave them zeroed for the next."""
    from qwen_awq.kernels import w4a16 as kern

    _graph_replays_match_eager(lambda x, w: kern.w4a16_triton(x, w), m)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a GPU (QWEN_AWQ_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("kind,m", [("cuda", 1), ("cudamma", 16)])
def test_nvrtc_kernels_capture_in_a_graph(kind: str, m: int) -> None:
    """The NVRTC kernels launch on the capturing stream: replays recompute from the static input."""
    from qwen_awq.kernels import w4a16 as kern

    config = kern.CudaGemvConfig() if kind == "cuda" else kern.CudaMmaConfig()
    _graph_replays_match_eager(lambda x, w: kern.w4a16_nvrtc_only(x, w, config=config), m)


def _graph_replays_match_eager(call, m: int) -> None:
    from qwen_awq.kernels import w4a16 as kern

    case = Case("auto", m, 4096, 4096)
    _, (qweight_t, scale_zero) = _weights(case, 0, DEVICE)
    w = kern.W4Weight(qweight_t, scale_zero, 128, torch.float16, kern.new_locks(DEVICE))
    x = torch.randn(m, 4096, device=DEVICE, dtype=torch.float16)  # the graph's static input
    call(x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call(x, w)
    for seed in range(3):
        x.copy_(torch.randn(m, 4096, generator=torch.Generator().manual_seed(seed)).half().to(DEVICE))
        graph.replay()
        assert torch.equal(y, call(x, w))  # deterministic: split order fixed
