"""The NVRTC dense GEMV (kernels/dense_gemv_cuda.py) against a float64 oracle on the GPU (QWEN_AWQ_TEST_DEVICE=cuda):
ragged N, K not a multiple of a lane step, bias, bf16, M = 1..4, a strided x, every config shape, a graph
capture; on the CPU, PlainLinear is nn.Linear (same keys, F.linear's values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from assets import DEVICE

GPU = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="NVRTC kernels need a GPU (QWEN_AWQ_TEST_DEVICE=cuda)")
# Max |y - oracle| / max |oracle|: one output rounding (fp16 2**-11, bf16 2**-8) plus fp32 summation order.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CASES = [  # (M, K, N, dtype, bias, strided, (rows, unroll, warps))
    (1, 4096, 4096, torch.float16, False, False, (2, 4, 4)),
    (1, 11008, 4096, torch.float16, False, False, (2, 4, 4)),
    (1, 264, 44, torch.float16, True, False, (4, 2, 4)),  # 33 chunks: one lane of the second step; N ragged
    (2, 4096, 200, torch.bfloat16, True, False, (1, 8, 8)),
    (3, 1024, 72, torch.float16, False, True, (2, 1, 2)),
    (4, 512, 40, torch.bfloat16, False, False, (1, 4, 4)),
]


@GPU
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-k{c[1]}-n{c[2]}-{str(c[3])[6:]}-b{int(c[4])}")
def test_dense_gemv_matches_float64(case: tuple) -> None:
    from qwen_awq.kernels.dense_gemv_cuda import dense_gemv
    from qwen_awq.kernels.w4a16_cuda import CudaGemvConfig

    m, k, n, dtype, has_bias, strided, cfg = case
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(m, 2 * k if strided else k, generator=gen).to(dtype).to(DEVICE)[:, :k]  # (M, K)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype).to(DEVICE)  # (N, K)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if has_bias else None
    y = dense_gemv(x, w, bias, CudaGemvConfig(*cfg))
    assert y is not None and y.dtype == dtype and y.shape == (m, n)
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= TOLERANCE[dtype], f"error {err:.3g}"


@GPU
def test_dense_gemv_captures_in_a_graph() -> None:
    from qwen_awq.kernels.dense_gemv_cuda import dense_gemv
    from qwen_awq.kernels.w4a16_cuda import CudaGemvConfig

    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.float16)  # the graph's static input
    w = torch.randn(4096, 4096, device=DEVICE, dtype=torch.float16) * 0.05
    cfg = CudaGemvConfig()
    dense_gemv(x, w, None, cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dense_gemv(x, w, None, cfg)
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).half().to(DEVICE))
        graph.replay()
        assert torch.equal(y, dense_gemv(x, w, None, cfg))


def test_plain_linear_is_nn_linear_on_the_cpu() -> None:
    from qwen_awq.quant.formats import PlainLinear

    layer = PlainLinear(24, 40, bias=True)
    assert list(layer.state_dict()) == ["weight", "bias"] and isinstance(layer, torch.nn.Linear)
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
