"""AWQ GEMM bit layout and group quantization: hand-computed vectors, round trips, AutoAWQ 0.2.9 as oracle."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.errors import CheckpointError
from qwen_awq.quant.linear import AWQLinear
from qwen_awq.quant.packing import (
    dequantize,
    fake_quantize,
    pack_int4,
    pack_linear,
    quantize_groups,
    unpack_int4,
    validate_packed,
)

SPEC_SHIFTS = [0, 16, 4, 20, 8, 24, 12, 28]  # spec: output column 8c + j is read at this shift


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def autoawq() -> types.SimpleNamespace:
    """AutoAWQ's packing_utils and gemm modules, loaded by path (its package __init__ needs transformers
    and accelerate); stub parent modules live in sys.modules only while gemm.py is executed."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:  # a test asset like the others: fail, never skip
        pytest.fail("the AutoAWQ oracle is not installed: pip install --no-deps autoawq==0.2.9")
    root = Path(spec.submodule_search_locations[0])
    packing_utils = _load("_autoawq_packing_utils", root / "utils" / "packing_utils.py")
    with pytest.MonkeyPatch.context() as mp:
        utils_stub = types.ModuleType("awq.utils.utils")  # the real one imports accelerate
        utils_stub.get_best_device = lambda: "cpu"
        mp.setitem(sys.modules, "awq", types.ModuleType("awq"))
        mp.setitem(sys.modules, "awq.utils", types.ModuleType("awq.utils"))
        mp.setitem(sys.modules, "awq.utils.module", _load("awq.utils.module", root / "utils" / "module.py"))
        mp.setitem(sys.modules, "awq.utils.utils", utils_stub)
        mp.setitem(sys.modules, "awq.utils.packing_utils", packing_utils)
        # AutoAWQ's naive CPU path even when another test imported the real package (and its Triton kernels).
        mp.setitem(sys.modules, "awq.modules.triton.gemm", None)
        gemm = _load("_autoawq_gemm", root / "modules" / "linear" / "gemm.py")
    return types.SimpleNamespace(packing=packing_utils, gemm=gemm)


# ---- hand-computed vectors -------------------------------------------------------------------------------


def test_pack_hand_vectors() -> None:
    # Nibble i of a word holds column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i], written high nibble first.
    rows = torch.tensor([list(range(8)), list(range(8, 16)), [0] * 7 + [8], [0, 1] + [0] * 6])
    words = pack_int4(rows)
    assert words.dtype == torch.int32 and words.shape == (4, 1)
    assert words[:, 0].tolist() == [0x75316420, 0xFDB9ECA8 - 2**32, -(2**31), 1 << 16]


def test_pack_two_words_per_row() -> None:
    rows = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0]])
    assert pack_int4(rows).tolist() == [[1, 15 << 12]]


def test_unpack_hand_vectors() -> None:
    words = torch.tensor([[0x75316420, -1], [-(2**31), 0x00000009]], dtype=torch.int32)
    assert unpack_int4(words).tolist() == [
        list(range(8)) + [15] * 8,
        [0] * 7 + [8] + [9] + [0] * 7,
    ]


def test_unpack_matches_spec_shift_table() -> None:
    words = torch.randint(
        -(2**31), 2**31, (5, 3), dtype=torch.int64, generator=torch.Generator().manual_seed(0)
    )
    expected = [
        [((int(w) & 0xFFFFFFFF) >> SPEC_SHIFTS[j]) & 0xF for w in row for j in range(8)] for row in words
    ]
    assert unpack_int4(words.to(torch.int32)).tolist() == expected


# ---- round trips ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_unpack_of_pack_is_identity(rows: int, words: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 15), min_size=rows * words * 8, max_size=rows * words * 8))
    v = torch.tensor(values, dtype=torch.uint8).view(rows, words * 8)
    packed = pack_int4(v)
    assert packed.shape == (rows, words)
    assert torch.equal(unpack_int4(packed), v)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=12))
def test_pack_of_unpack_is_identity(words: list[int]) -> None:
    w = torch.tensor(words, dtype=torch.int32).view(1, -1)
    assert torch.equal(pack_int4(unpack_int4(w)), w)


# ---- group quantization -----------------------------------------------------------------------------------


def test_quantize_groups_hand_vector() -> None:
    # Both groups span 3.75, so scale = 3.75 / 15 = 0.25 exactly (also in fp16).
    group_a = [-1.0, 2.75, 0.125, 0.375, -0.6, 1.2, 2.0, 0.0]  # zero = -round(-1 / 0.25) = 4
    group_b = [2.0, 5.75, 3.0, 4.0, 2.5, 5.0, 2.25, 3.5]  # zero = -round(8) = -8, clamped to 0
    w = torch.tensor([group_a + group_b])
    q, scales, zeros = quantize_groups(w, 8)
    # round() is half-to-even as in AutoAWQ: 0.125 / 0.25 = 0.5 -> 0 and 0.375 / 0.25 = 1.5 -> 2.
    assert q.tolist() == [[0, 15, 4, 6, 2, 9, 12, 4] + [8, 15, 12, 15, 10, 15, 9, 14]]
    assert scales.tolist() == [[0.25, 0.25]] and zeros.tolist() == [[4, 0]]
    assert q.dtype == zeros.dtype == torch.uint8 and scales.dtype == torch.float32
    expected = [-1.0, 2.75, 0.0, 0.5, -0.5, 1.25, 2.0, 0.0] + [2.0, 3.75, 3.0, 3.75, 2.5, 3.75, 2.25, 3.5]
    assert fake_quantize(w, 8).tolist() == [expected]


def test_scales_are_fp16_rounded_and_codes_follow_them() -> None:
    w = torch.tensor([[0.0, 1.0, 0.3, 0.7]])  # range 1 -> scale 1/15, not representable in fp16
    _, scales, zeros = quantize_groups(w, 4)
    assert scales.item() == torch.tensor(1 / 15).half().item() != torch.tensor(1 / 15).item()
    assert zeros.item() == 0
    w16 = fake_quantize(w.half(), 4)
    assert w16.dtype == torch.float16
    assert torch.equal(w16, fake_quantize(w, 4).half())


def test_quantization_error_bounded_by_half_step() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=g) * 0.02 + torch.randn(16, 1, generator=g) * 0.01
    _, scales, zeros = quantize_groups(w, 64)
    step = scales.repeat_interleave(64, dim=1)  # (N, K)
    err = (fake_quantize(w, 64) - w).abs()
    # Half a step, plus the drift of the fp16-rounded scale (relative error <= 2**-11) over <= 16 steps.
    assert torch.all(err <= step * (0.5 + 16 * 2**-11))
    assert (err / step).max() > 0.45  # the bound is tight, not vacuous
    assert torch.all(zeros <= 15) and torch.all(err.amax(1) > 0)


def test_pack_linear_dequantizes_to_fake_quantized_weight() -> None:
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    for g in (32, 64, 128):
        t = pack_linear(w, g)
        assert (
            t["qweight"].shape == (128, 3)
            and t["qzeros"].shape == (128 // g, 3)
            and t["scales"].shape == (128 // g, 24)
        )
        assert t["qweight"].dtype == t["qzeros"].dtype == torch.int32 and t["scales"].dtype == torch.float16
        assert torch.equal(dequantize(t["qweight"], t["qzeros"], t["scales"], g).t(), fake_quantize(w, g))


def test_pack_linear_with_given_params_reproduces_codes() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q, scales, zeros = quantize_groups(w, 32)
    again = pack_linear(fake_quantize(w, 32), 32, scales=scales, zeros=zeros)
    assert torch.equal(unpack_int4(again["qweight"]).t(), q)
    assert torch.equal(again["qweight"], pack_linear(w, 32)["qweight"])


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pack_int4(torch.tensor([[1.0] * 8])), "integer"),
        (lambda: pack_int4(torch.ones(2, 6, dtype=torch.int32)), "divisible by 8"),
        (lambda: pack_int4(torch.full((1, 8), 16)), r"range \(16, 16\)"),
        (lambda: unpack_int4(torch.ones(2, 2, dtype=torch.int64)), "int32"),
        (lambda: quantize_groups(torch.randn(8, 96), 64), "does not divide the input size 96"),
        (lambda: pack_linear(torch.randn(12, 64), 32), "divisible by 8, found 12"),
        (lambda: pack_linear(torch.full((8, 64), float("nan")), 32), "NaN"),
        (lambda: pack_linear(torch.randn(8, 64), 32, bias=torch.ones(9)), r"bias must have shape \(8,\)"),
        (lambda: pack_linear(torch.randn(8, 64), 32, scales=torch.ones(8, 2)), "both"),
        (
            lambda: validate_packed(*_packed(qweight=torch.zeros(64, 1, dtype=torch.int64))),
            "int32, found torch.int64",
        ),
        (
            lambda: validate_packed(*_packed(scales=torch.zeros(2, 16, dtype=torch.float16))),
            r"scales \(2, 16\)",
        ),
        (lambda: validate_packed(*_packed(qzeros=torch.zeros(1, 1, dtype=torch.int32))), r"qzeros \(1, 1\)"),
        (lambda: dequantize(*_packed()[:3], 48), "group size 48 does not divide the input size 64"),
    ],
)
def test_errors_name_what_was_found(call, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        call()


def _packed(**override: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    t = pack_linear(torch.randn(8, 64), 32)
    t.update(override)
    return t["qweight"], t["qzeros"], t["scales"], 32


# ---- AutoAWQ 0.2.9 as independent oracle ------------------------------------------------------------------


def _autoawq_from_linear(autoawq, w: torch.Tensor, bias: torch.Tensor, group_size: int, dtype: torch.dtype):
    """AutoAWQ's own flow: pseudo-quantized weights in the model dtype, scales/zeros passed as [K/G, N]."""
    _, scales, zeros = quantize_groups(w, group_size)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(w, group_size))
        linear.bias.copy_(bias)
    return autoawq.gemm.WQLinear_GEMM.from_linear(
        linear,
        4,
        group_size,
        scales=scales.t().contiguous().to(dtype),
        zeros=zeros.t().contiguous().to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_autoawq_from_linear_matches_our_packing(autoawq, group_size: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(group_size)
    w = torch.randn(32, 256, generator=g) * 0.05 + torch.rand(32, 1, generator=g) * 0.02
    bias = torch.randn(32, generator=g)
    theirs = _autoawq_from_linear(autoawq, w, bias, group_size, dtype)
    ours = pack_linear(w, group_size, bias=bias)
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(theirs, name), ours[name]), name
    # Each side's dequantization of the other's tensors, bit for bit (AutoAWQ dequantizes in fp16).
    t_args = (theirs.qweight, theirs.qzeros, theirs.scales)
    o_args = (ours["qweight"], ours["qzeros"], ours["scales"])
    assert torch.equal(
        dequantize(*t_args, group_size, dtype=torch.float16),
        autoawq.packing.dequantize_gemm(*t_args, 4, group_size),
    )
    assert torch.equal(
        autoawq.packing.dequantize_gemm(*o_args, 4, group_size),
        dequantize(*o_args, group_size, dtype=torch.float16),
    )


def test_autoawq_unpack_of_ours_equals_ours(autoawq) -> None:
    t = pack_linear(torch.randn(64, 128, generator=torch.Generator().manual_seed(5)), 64)
    iw, iz = autoawq.packing.unpack_awq(t["qweight"], t["qzeros"], 4)
    iw, iz = autoawq.packing.reverse_awq_order(iw, iz, 4)
    assert torch.equal(iw & 0xF, unpack_int4(t["qweight"]).to(torch.int8))
    assert torch.equal(iz & 0xF, unpack_int4(t["qzeros"]).to(torch.int8))


def test_autoawq_state_dict_loads_into_awq_linear(autoawq) -> None:
    g = torch.Generator().manual_seed(6)
    w, bias = torch.randn(64, 128, generator=g) * 0.1, torch.randn(64, generator=g)
    theirs = _autoawq_from_linear(autoawq, w, bias, 64, torch.float16)
    ours = AWQLinear(128, 64, 64, bias=True, device="meta")
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    x = torch.randn(3, 5, 128, generator=g).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AutoAWQ warns that it uses its naive CPU path
        expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-3, atol=1e-3)
