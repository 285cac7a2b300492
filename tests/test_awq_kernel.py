"""AWQ W4A16 Triton kernels vs the plain-PyTorch reference: compiled on the GPU under QWEN_AWQ_TEST_DEVICE=cuda,
else run by Triton's CPU interpreter in a subprocess.

TRITON_INTERPRET must be set before a kernel is decorated, and other test modules import the kernels first,
so `python tests/test_awq_kernel.py` (with the variable set) computes every case and prints JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from assets import DEVICE
from interpret import run_interpreted

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.awq_gemm import TileConfig, awq_matmul
from qwen_awq.kernels.reference import awq_matmul_reference
from qwen_awq.quant.packing import dequantize

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Max |y - ref| / max |ref|: one rounding of the output plus fp32 summation order; bf16 keeps 8 mantissa bits.
# A misplaced nibble, zero or scale errs by O(1) on this scale.
TOLERANCE = {"fp16": 4e-3, "bf16": 3e-2}
CPU_TOLERANCE = {torch.float32: 1e-5, torch.float16: TOLERANCE["fp16"], torch.bfloat16: TOLERANCE["bf16"]}


@dataclass(frozen=True)
class Case:
    path: str  # dequant | gemv | gemm | dequant_mm | auto (the dispatcher's CUDA choice by M)
    m: int
    k: int
    n: int
    group: int
    dtype: str = "fp16"
    bias: bool = False
    split_k: int | None = None
    layout: str = "2d"  # 2d | 3d: x (2, M/2, K) | strided: x a column slice of a wider tensor

    @property
    def id(self) -> str:
        bias = "bias" if self.bias else "nobias"
        shape = f"m{self.m}-k{self.k}-n{self.n}-g{self.group}"
        return f"{self.path}-{shape}-{self.dtype}-{bias}-s{self.split_k}-{self.layout}"


# Triton's interpreter computes bf16 tl.dot on the raw uint16 storage (garbage), so the tensor-core
# kernel is checked in fp16 here; bench/awq_kernel_bench.py checks bf16 on the GPU.
CASES = [
    Case("dequant", 0, 256, 200, 64),
    Case("dequant", 0, 128, 64, 32),
    Case("dequant", 0, 256, 72, 128),
    Case("gemv", 1, 256, 200, 64, bias=True),
    Case("gemv", 1, 128, 64, 32, split_k=1),
    Case("gemv", 1, 256, 72, 128, "bf16", bias=True),
    Case("gemv", 1, 256, 136, 128, split_k=3),
    Case("gemv", 3, 256, 200, 32, bias=True, split_k=2, layout="strided"),
    Case("gemm", 1, 256, 200, 64, bias=True),
    Case("gemm", 3, 256, 200, 32, layout="strided"),
    Case("gemm", 16, 128, 64, 32, bias=True, split_k=1),
    Case("gemm", 16, 256, 72, 128),
    Case("gemm", 33, 256, 200, 64, bias=True, split_k=3),
    Case("gemm", 33, 128, 136, 32),
    Case("dequant_mm", 33, 256, 200, 64, bias=True),
    Case("dequant_mm", 16, 256, 72, 128, "bf16"),
    Case("dequant_mm", 3, 128, 64, 32, "bf16", bias=True),
    Case("auto", 1, 256, 200, 64, bias=True, layout="3d"),
    Case("auto", 1, 128, 64, 32, "bf16"),
    Case("auto", 6, 256, 200, 64, bias=True, layout="3d"),
    Case("auto", 33, 256, 72, 32),
    Case("auto", 256, 128, 64, 32, bias=True),
]


def _weights(k: int, n: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed words over the full int32 range (negative words test the arithmetic shift)."""
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)  # (K, N/8)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).half()  # (K/G, N), never zero
    return qweight, qzeros, scales


def _inputs(case: Case, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed + 1)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.m, 2 * case.k, generator=gen).to(dtype).to(device)  # (M, 2K): sliced when strided
    x = x[:, : case.k] if case.layout == "strided" else x[:, case.k :].contiguous()  # (M, K)
    if case.layout == "3d":
        x = x.view(2, case.m // 2, case.k) if case.m % 2 == 0 else x.view(1, case.m, case.k)
    bias = torch.randn(case.n, generator=gen).half().to(device) if case.bias else None  # (N,)
    return x, bias


def _run_case(kern, case: Case, seed: int, device: str = "cpu") -> tuple[float, float]:
    """(relative max error, tolerance) of one case, the kernels on `device` and the reference on the CPU;
    the dequant case must be exact."""
    qweight, qzeros, scales = _weights(case.k, case.n, case.group, seed)
    packed = (qweight.to(device), qzeros.to(device), scales.to(device))
    if case.path == "dequant":
        wt = kern.dequantize_triton(*packed, case.group, torch.float16)  # (K, N)
        expected = dequantize(qweight, qzeros, scales, case.group, dtype=torch.float16)
        return float((wt.float().cpu() - expected.float()).abs().max()), 0.0
    x, bias = _inputs(case, seed, device)
    args = (x, *packed, case.group, bias)
    if case.path == "gemv":
        y = kern.awq_gemv_triton(*args, split_k=case.split_k)
    elif case.path == "gemm":
        y = kern.awq_gemm_triton(*args, split_k=case.split_k)
    elif case.path == "dequant_mm":
        y = kern.awq_dequant_matmul(*args)
    else:
        y = kern.awq_matmul_triton(*args)
    ref = awq_matmul_reference(x.cpu(), qweight, qzeros, scales, case.group, None if bias is None else bias.cpu())
    if y.shape != ref.shape or y.dtype != x.dtype:
        return float("inf"), TOLERANCE[case.dtype]
    return float((y.float().cpu() - ref.float()).abs().max() / ref.float().abs().max()), TOLERANCE[case.dtype]


def _main() -> None:
    import triton

    from qwen_awq.kernels import awq_gemm as kern

    if not triton.knobs.runtime.interpret:
        raise SystemExit("run with TRITON_INTERPRET=1")
    results = {case.id: _run_case(kern, case, seed) for seed, case in enumerate(CASES)}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, list[float]]:
    """Per case (error, tolerance): compiled on the GPU when the tests run there (QWEN_AWQ_TEST_DEVICE=cuda),
    else through the Triton interpreter on the CPU, in a subprocess because TRITON_INTERPRET is read at import."""
    if DEVICE.startswith("cuda"):
        from qwen_awq.kernels import awq_gemm as kern

        return {case.id: list(_run_case(kern, case, seed, DEVICE)) for seed, case in enumerate(CASES)}
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_kernel_matches_reference(kernel_errors: dict[str, list[float]], case: Case) -> None:
    err, tol = kernel_errors[case.id]
    assert err <= tol, f"{case.id}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [8, 32, 128])
def test_dispatcher_takes_reference_on_cpu(dtype: torch.dtype, group: int) -> None:
    qweight, qzeros, scales = _weights(256, 40, group, seed=group)
    x = torch.randn(2, 3, 256).to(dtype)  # (batch, tokens, K)
    bias = torch.randn(40).half()
    w = dequantize(qweight, qzeros, scales, group, dtype=torch.float64)  # (K, N), an independent float64 oracle
    for b in (None, bias):
        y = awq_matmul(x, qweight, qzeros, scales, group, b)
        assert torch.equal(y, awq_matmul_reference(x, qweight, qzeros, scales, group, b))
        exact = x.double() @ w + (0 if b is None else b.double())
        assert float((y.double() - exact).abs().max() / exact.abs().max()) <= CPU_TOLERANCE[dtype]


def test_tile_config_rejects_bad_shapes() -> None:
    for bad in ((16, 128, 48), (16, 8, 64), (0, 128, 64)):
        with pytest.raises(ConfigError):
            TileConfig(*bad)


if __name__ == "__main__":
    _main()
