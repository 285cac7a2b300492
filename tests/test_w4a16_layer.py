"""The repacked W4A16 layout and AWQLinear.post_load on the CPU: exact dequantization, an exact inverse for the
state dict, the layer's forward against float64 oracles, the dispatcher's choices and the add + RMSNorm reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwen_awq.errors import CheckpointError, ConfigError
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.reference import fused_add_rms_norm_reference
from qwen_awq.kernels.rms_norm import fused_add_rms_norm
from qwen_awq.models.layers import RMSNorm
from qwen_awq.quant.linear import AWQLinear
from qwen_awq.quant.packing import (
    AWQ_ORDER,
    dequantize,
    dequantize_repacked,
    fake_quantize,
    repack_awq,
    unpack_int4,
    unrepack_awq,
)


def _awq(k: int, n: int, group: int, scale_dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)  # (K, N/8)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).to(scale_dtype)  # (K/G, N)
    return qweight, qzeros, scales


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_repack_dequantizes_exactly_and_inverts(group: int, scale_dtype: torch.dtype) -> None:
    qweight, qzeros, scales = _awq(256, 48, group, scale_dtype, seed=group)
    qweight_t, scale_zero = repack_awq(qweight, qzeros, scales, group)
    assert qweight_t.shape == (48, 256 // 8) and scale_zero.shape == (48, 256 // group)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        expected = dequantize(qweight, qzeros, scales, group, dtype=dtype).t()  # (N, K)
        assert torch.equal(dequantize_repacked(qweight_t, scale_zero, group, scale_dtype, dtype), expected)
    back = unrepack_awq(qweight_t, scale_zero, group, scale_dtype)
    assert all(torch.equal(a, b) for a, b in zip(back, (qweight, qzeros, scales), strict=True))


def test_repacked_words_hold_k_contiguous_codes() -> None:
    """Word (n, j), bits 4i hold the code of (k = 8j + AWQ_ORDER[i], n), read independently of the repack."""
    qweight, qzeros, scales = _awq(128, 16, 64, torch.float16, seed=1)
    qweight_t, scale_zero = repack_awq(qweight, qzeros, scales, 64)
    codes = unpack_int4(qweight)  # (K, N) in natural order
    for n, j in ((0, 0), (5, 3), (15, 15)):
        word = int(qweight_t[n, j]) & 0xFFFFFFFF
        assert [(word >> (4 * i)) & 15 for i in range(8)] == [int(codes[8 * j + o, n]) for o in AWQ_ORDER]
    s = (scale_zero[3, 1] & 0xFFFF).to(torch.int16).view(torch.float16)
    z = (scale_zero[3, 1] >> 16).to(torch.int16).view(torch.float16)
    assert float(s) == float(scales[1, 3]) and float(z) == float(unpack_int4(qzeros)[1, 3])


def test_repack_rejects_fp32_scales() -> None:
    qweight, qzeros, scales = _awq(128, 16, 64, torch.float32, seed=2)
    with pytest.raises(CheckpointError):
        repack_awq(qweight, qzeros, scales, 64)


def _linear(k: int, n: int, bias: bool, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05 + torch.randn(n, 1, generator=gen) * 0.03)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return linear


@pytest.mark.parametrize("bias", [True, False])
def test_post_load_keeps_the_checkpoint_state_dict_and_the_function(bias: bool) -> None:
    linear = _linear(256, 48, bias, seed=3)
    parent = nn.Sequential(AWQLinear.from_linear(linear, 64))  # a prefix: "0.qweight", ...
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    layer = parent[0]
    layer.post_load()  # the CPU gains nothing from the kernel layout: a no-op
    assert not layer.repacked
    layer.post_load(cpu=True)
    first = layer.qweight_t
    layer.post_load(cpu=True)  # idempotent
    assert layer.repacked and layer.qweight_t is first and layer.qweight is None
    after = parent.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(4)).double()
    w_q = fake_quantize(linear.weight.detach(), 64).double()  # (N, K): the weights the checkpoint holds
    expected = x @ w_q.T + (linear.bias.detach().half().double() if bias else 0)
    torch.testing.assert_close(layer(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dequantized_weight(), w_q.float())


def test_loading_into_a_repacked_layer_repacks_the_new_values() -> None:
    src = AWQLinear.from_linear(_linear(256, 48, True, seed=5), 64)
    dst = AWQLinear(256, 48, 64, bias=True)
    dst.post_load(cpu=True)  # repacked zeros
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    assert dst.repacked and torch.equal(dst.dequantized_weight(), src.dequantized_weight())
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_post_load_leaves_fp32_scales_alone() -> None:
    layer = AWQLinear(256, 48, 64, bias=False, dtype=torch.float32)
    layer.post_load(cpu=True)
    assert not layer.repacked


@pytest.mark.parametrize("prologue_max_m", [0, 64])  # silu_mul first / SiLU in the kernel's prologue
def test_silu_mul_forward_is_down_of_silu_gate_times_up(monkeypatch, prologue_max_m: int) -> None:
    from qwen_awq.kernels import w4a16

    monkeypatch.setattr(w4a16, "SILU_PROLOGUE_MAX_M", prologue_max_m)
    layer = AWQLinear.from_linear(_linear(128, 32, False, seed=7), 32)
    gate_up = torch.randn(4, 256, generator=torch.Generator().manual_seed(8)).double()
    w = layer.dequantized_weight(torch.float64)  # (N, K)
    expected = (gate_up[:, :128] * torch.sigmoid(gate_up[:, :128]) * gate_up[:, 128:]) @ w.T
    for repack in (False, True):
        if repack:
            layer.post_load(cpu=True)
        got = layer.silu_mul_forward(gate_up.float()).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cpu_dispatch_matches_float64_oracle() -> None:
    qweight, qzeros, scales = _awq(256, 40, 128, torch.float16, seed=9)
    qweight_t, scale_zero = repack_awq(qweight, qzeros, scales, 128)
    w = kern.W4Weight(qweight_t, scale_zero, 128, torch.float16, kern.new_locks("cpu"))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(10))
    bias = torch.randn(40).half()
    exact = x.double() @ dequantize(qweight, qzeros, scales, 128, torch.float64) + bias.double()
    got = kern.w4a16_matmul(x, w, bias)
    assert float((got.double() - exact).abs().max() / exact.abs().max()) < 1e-5


def test_choose_reads_the_card_table_else_defaults(monkeypatch) -> None:
    assert kern.m_bucket(1) == 1 and kern.m_bucket(3) == 4 and kern.m_bucket(16) == 16 and kern.m_bucket(17) == 32
    assert kern.default_choice(1)[0] == "gemv" and kern.default_choice(300) == ("dense", None)
    assert kern.default_choice(20)[1].block_m == 32
    assert kern.default_choice(8)[0] == "cudamma" and kern.triton_choice(8)[0] == "mma"  # NVRTC, else Triton
    table = {(4096, 4096): {4: ("mma", {"block_m": 16, "block_n": 64}), 1: ("dense", None)}}
    monkeypatch.setitem(kern.TUNED, "Fake GPU", {"table": table})
    monkeypatch.setattr(kern, "_device_name", lambda index: "Fake GPU")
    kern.choose.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert kern.choose(3, 4096, 4096, cuda) == ("mma", kern.MmaConfig(block_m=16, block_n=64))
        assert kern.choose(1, 4096, 4096, cuda) == ("dense", None)
        assert kern.choose(1, 4096, 12288, cuda) == kern.default_choice(1)  # shape not in the table
    finally:
        kern.choose.cache_clear()


@pytest.mark.parametrize("bad", [{"block_n": 6}, {"lanes": 0}, {"progs_per_sm": 0}, {"prefetch": 3}])
def test_gemv_config_validation(bad: dict) -> None:
    with pytest.raises(ConfigError):
        kern.GemvConfig(**bad)


def test_every_tuned_entry_is_a_config_its_kernel_can_launch() -> None:
    """A table entry that cannot run at its bucket would fall back silently on every call: each must build, and
    an NVRTC tensor-core entry's reduction must fit in shared memory at the bucket's largest M."""
    from qwen_awq.kernels.w4a16_cuda_mma import MAX_M, SHARED_BYTES, n_tiles

    configs = {"gemv": kern.GemvConfig, "mma": kern.MmaConfig, "cuda": kern.CudaGemvConfig,
               "cudamma": kern.CudaMmaConfig}
    for card in kern.TUNED.values():
        for shape, buckets in card["table"].items():
            for bucket, (kind, params) in buckets.items():
                if kind == "dense":
                    assert params is None
                    continue
                cfg = configs[kind](**params)
                if kind == "cudamma":
                    assert bucket <= MAX_M and cfg.reduce_bytes(n_tiles(bucket)) <= SHARED_BYTES, (shape, bucket)


@pytest.mark.parametrize("bad", [{"rb": 3}, {"wk": 0}, {"wn": 8, "wk": 8}, {"unroll": 32}])
def test_cuda_mma_config_validation(bad: dict) -> None:
    with pytest.raises(ConfigError):
        kern.CudaMmaConfig(**bad)


@pytest.mark.parametrize("bad", [{"block_m": 8}, {"block_n": 48}, {"num_stages": 0}])
def test_mma_config_validation(bad: dict) -> None:
    with pytest.raises(ConfigError):
        kern.MmaConfig(**bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_rms_norm_reference_is_residual_add_then_rmsnorm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    x, residual = (torch.randn(3, 64, generator=gen).to(dtype) for _ in range(2))
    norm = RMSNorm(64, 1e-6, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    h = x + residual
    normed, new_res = fused_add_rms_norm(x, residual, norm.weight.detach(), 1e-6)  # CPU: the reference
    assert torch.equal(new_res, h) and torch.equal(normed, norm(h).detach())
    assert torch.equal(normed, fused_add_rms_norm_reference(x, residual, norm.weight.detach(), 1e-6)[0])


@pytest.mark.parametrize("max_rows", [1, 5, 48, 2048])
def test_warm_up_rows_reach_every_kernel_variant_a_step_can_take(max_rows: int) -> None:
    """Every row count 1..max_rows that a W4A16 kernel (not dequantize + cuBLAS) can take shares its M bucket and
    its divisibility by 16 (what Triton specializes on) with a warmed-up count: no compile inside a later step."""
    from qwen_awq.kernels.w4a16 import DENSE_MIN_M, m_bucket
    from qwen_awq.quant.linear import warm_up_rows

    warmed = {(m_bucket(m), m % 16 == 0, m == 1) for m in warm_up_rows(max_rows)}
    for m in range(1, min(max_rows, 2 * DENSE_MIN_M) + 1):
        assert (m_bucket(m), m % 16 == 0, m == 1) in warmed, m
    assert warm_up_w4a16_calls_on_cpu() == 0


def warm_up_w4a16_calls_on_cpu() -> int:
    """The warm-up compiles for the GPU only: a CPU model's layers (repacked or not) get no calls."""
    from qwen_awq.quant.linear import warm_up_w4a16

    layer = AWQLinear.from_linear(_linear(128, 32, True, seed=3), 32)
    layer.post_load(cpu=True)
    return warm_up_w4a16(torch.nn.Sequential(layer), 64)
