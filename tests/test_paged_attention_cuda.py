"""The NVRTC int8 paged decode kernel (kernels/paged_attention_cuda.py) against the float64 oracle of
test_paged_attention on the GPU (QWEN_AWQ_TEST_DEVICE=cuda): shuffled tables with holes, ragged lengths, NaN past
every length, slot- and block-major pools, fp16/bf16, splits, head sizes 32..128, the real Qwen-7B shape, a CUDA
graph replayed on new lengths; on the CPU the dispatcher never takes it (the reference runs)."""

from __future__ import annotations

import pytest
import torch
from assets import DEVICE
from test_paged_attention import DTYPES, TOLERANCE, Case, _block_major, _oracle, _poison, _pool, _tables

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.paged_attention_cuda import CudaDecodeConfig, cuda_int8_supported, paged_decode_int8_cuda
from qwen_awq.kernels.paged_reference import PagedKV

GPU = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="NVRTC kernels need a GPU (QWEN_AWQ_TEST_DEVICE=cuda)")
LENS = [1, 5, 17, 33, 8, 12, 70, 130]
CASES = [  # (heads, head_dim, dtype, block_size, layout, lens, CudaDecodeConfig fields)
    (4, 32, "fp16", 4, "slot", LENS, {}),
    (4, 64, "bf16", 8, "slot", LENS, {"unroll": 2, "warps": 2}),
    (3, 128, "fp16", 16, "slot", LENS, {"splits": 3}),
    (2, 128, "bf16", 16, "block", LENS, {"splits": 5, "unroll": 8}),
    (4, 64, "fp16", 32, "block", LENS, {"unroll": 1, "warps": 8}),
    (4, 128, "fp16", 16, "slot", LENS, {"unroll": 2, "warps": 1, "prefetch": True}),
    (3, 32, "bf16", 8, "slot", LENS, {"unroll": 4, "warps": 2, "prefetch": True, "splits": 2}),
    (4, 32, "fp16", 8, "slot", LENS, {"unroll": 8, "warps": 1, "prefetch": True}),  # 4 (scale, zero) per lane
    (3, 64, "bf16", 8, "block", LENS, {"unroll": 16, "warps": 2, "splits": 3}),
    (4, 128, "fp16", 16, "slot", LENS, {"unroll": 8, "warps": 1, "prefetch": True, "min_blocks": 10}),  # spills
    (32, 128, "fp16", 16, "slot", [1024] * 3 + [700, 1], {"unroll": 8, "warps": 1, "prefetch": True}),
    (32, 128, "fp16", 16, "slot", [1024] * 3 + [700, 1], {}),  # Qwen-7B's heads
    (32, 128, "fp16", 16, "slot", [2048], {}),  # one sequence: auto splits
]


def _inputs(case: tuple, seed: int, device: str, poison: bool = True) -> tuple:
    heads, head_dim, dtype, block_size, layout, lens, _ = case
    gen = torch.Generator().manual_seed(seed)
    spec = Case("decode", heads, heads, dtype, int8=True, block_size=block_size, head_dim=head_dim)
    tables, num_blocks, _ = _tables(lens, block_size, gen)
    kv = _pool(spec, gen, num_blocks * block_size)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(DTYPES[dtype])
    scale = head_dim ** -0.5 * 1.7  # sharper than 1/sqrt(D): softmax weights far from uniform
    expected = _oracle(q, kv, tables, lens, [1] * len(lens), scale)
    if poison:
        _poison(kv, tables, lens)
    kv = _block_major(kv) if layout == "block" else kv
    kv = PagedKV(kv.k.to(device), kv.v.to(device), block_size, kv.k_sz.to(device), kv.v_sz.to(device))
    return q.to(device), kv, tables.to(device), torch.tensor(lens, device=device), scale, expected


@GPU
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}-d{c[1]}-{c[2]}-bs{c[3]}-{c[4]}-{len(c[5])}seq-{c[6]}")
def test_cuda_int8_decode_matches_float64(case: tuple) -> None:
    q, kv, tables, lens, scale, expected = _inputs(case, sum(case[5]) + case[1], DEVICE)
    assert cuda_int8_supported(q, kv, tables, lens)
    out = paged_decode_int8_cuda(q, kv, tables, lens, scale, CudaDecodeConfig(**case[6]))
    assert out is not None and out.dtype == q.dtype and out.shape == q.shape
    err = float((out.double().cpu() - expected).abs().max() / expected.abs().max())
    assert err <= TOLERANCE[case[2]], f"error {err:.3g}"


@GPU
def test_cuda_int8_decode_graph_replays_new_lengths() -> None:
    """Captured once at one set of lengths, replayed on other lengths and tables: equal to eager calls."""
    case = (8, 128, "fp16", 16, "slot", [300, 40, 129, 1], {})
    q, kv, tables, lens, scale, _ = _inputs(case, 5, DEVICE, poison=False)  # flipped tables read any slot
    tables, lens = tables.int(), lens.int()  # int32 indices, as bench/attention_checks builds them
    out = paged_decode_int8_cuda(q, kv, tables, lens, scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_int8_cuda(q, kv, tables, lens, scale)
    for new_lens in ([1, 2, 3, 4], [300, 300, 17, 250]):
        lens.copy_(torch.tensor(new_lens, device=DEVICE))
        tables.copy_(tables.flip(0))
        graph.replay()
        assert torch.equal(out, paged_decode_int8_cuda(q, kv, tables, lens, scale))


def test_cpu_tensors_never_take_the_cuda_kernel() -> None:
    q, kv, tables, lens, _, _ = _inputs(CASES[0], 1, "cpu")
    assert not cuda_int8_supported(q, kv, tables, lens)
    for bad in (dict(unroll=3), dict(warps=0), dict(waves=0), dict(splits=65), dict(min_blocks=0)):
        with pytest.raises(ConfigError):
            CudaDecodeConfig(**bad)
