"""AWQLinear (W4A16): forward against the fake-quantized fp32 Linear, state-dict loading, error cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwen_awq.errors import CheckpointError
from qwen_awq.kernels.reference import awq_matmul_reference
from qwen_awq.quant.linear import AWQLinear
from qwen_awq.quant.packing import fake_quantize, pack_linear, quantize_groups

K, N = 256, 48


def _linear(bias: bool, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        # Per-row offsets make the groups asymmetric so the zero points are not all 8.
        linear.weight.copy_(torch.randn(N, K, generator=g) * 0.05 + torch.randn(N, 1, generator=g) * 0.03)
        if bias:
            linear.bias.copy_(torch.randn(N, generator=g))
    return linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_forward_equals_fake_quantized_linear(group_size: int, bias: bool) -> None:
    linear = _linear(bias, seed=group_size + bias)
    layer = AWQLinear.from_linear(linear, group_size)
    x = torch.randn(2, 7, K, generator=torch.Generator().manual_seed(9))
    w_q = fake_quantize(linear.weight.detach(), group_size)  # (N, K)
    assert not torch.equal(w_q, linear.weight)  # quantization really happened
    # The checkpoint stores the bias in fp16, so the oracle uses the fp16-rounded bias.
    b = linear.bias.detach().half().float() if bias else torch.zeros(N)
    expected = x @ w_q.T + b  # (2, 7, N)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.dequantized_weight(), w_q)


def test_buffers_have_checkpoint_shapes_and_dtypes() -> None:
    layer = AWQLinear(K, N, 64, bias=True)
    expected = {
        "qweight": ((K, N // 8), torch.int32),
        "qzeros": ((K // 64, N // 8), torch.int32),
        "scales": ((K // 64, N), torch.float16),
        "bias": ((N,), torch.float16),
    }
    got = {name: (tuple(t.shape), t.dtype) for name, t in layer.state_dict().items()}
    assert got == expected
    assert "bias" not in AWQLinear(K, N, 64, bias=False).state_dict()


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias: bool) -> None:
    src = AWQLinear.from_linear(_linear(bias, seed=3), 64)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    plain = AWQLinear(K, N, 64, bias=bias)
    plain.load_state_dict(src.state_dict(), strict=True)
    meta = AWQLinear(K, N, 64, bias=bias, device="meta")
    assert meta.qweight.is_meta
    meta.load_state_dict(src.state_dict(), strict=True, assign=True)
    for layer in (plain, meta):
        assert torch.equal(layer(x), src(x))
        got, want = layer.state_dict(), src.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_from_linear_with_given_scales_and_zeros() -> None:
    linear = _linear(True, seed=5)
    _, scales, zeros = quantize_groups(linear.weight.detach(), 32)
    given = AWQLinear.from_linear(linear, 32, scales=scales, zeros=zeros)
    assert torch.equal(given.qweight, AWQLinear.from_linear(linear, 32).qweight)
    # Deliberately coarser scales: the layer must use them, not recompute its own.
    coarse = AWQLinear.from_linear(linear, 32, scales=scales * 2, zeros=zeros)
    assert torch.equal(coarse.scales, (scales * 2).T.half())
    assert not torch.equal(coarse.qweight, given.qweight)


def test_fp16_and_bf16_activations() -> None:
    layer = AWQLinear.from_linear(_linear(True, seed=6), 128)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(7))
    ref = layer(x)  # (4, N) float32
    for dtype in (torch.float16, torch.bfloat16):
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_reference_matmul_matches_manual_dequant() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    t = pack_linear(w, 32, bias=torch.arange(16.0))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = awq_matmul_reference(x, t["qweight"], t["qzeros"], t["scales"], 32, t["bias"])
    assert y.dtype == torch.float64
    expected = x @ fake_quantize(w, 32).double().T + torch.arange(16.0, dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((96, 16, 64, False), "group size 64 does not divide in_features 96"),
        ((128, 12, 64, False), "divisible by 8, found 12"),
        ((128, 16, 0, False), "group size 0"),
    ],
)
def test_constructor_errors(args: tuple[int, int, int, bool], match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        AWQLinear(*args)


def test_from_linear_errors() -> None:
    linear = _linear(False, seed=10)
    with pytest.raises(CheckpointError, match="does not divide the input size 256"):
        AWQLinear.from_linear(linear, 96)
    _, scales, zeros = quantize_groups(linear.weight.detach(), 64)
    with pytest.raises(CheckpointError, match=r"scales must have shape \(48, 4\) .* found \(4, 48\)"):
        AWQLinear.from_linear(linear, 64, scales=scales.T, zeros=zeros.T)
    with pytest.raises(CheckpointError, match="zeros must lie in 0..15"):
        AWQLinear.from_linear(linear, 64, scales=scales, zeros=zeros.float() + 16)


def test_wrong_input_width_is_reported() -> None:
    layer = AWQLinear.from_linear(_linear(False, seed=11), 64)
    with pytest.raises(ValueError, match="input has 128 features but the AWQ weight expects 256"):
        layer(torch.randn(2, 128))
