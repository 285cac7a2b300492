"""Paged attention and rotary + KV-write Triton kernels vs float64 re-derivations and the plain-PyTorch reference:
compiled on the GPU under QWEN_AWQ_TEST_DEVICE=cuda, else run by Triton's CPU interpreter in a subprocess
(TRITON_INTERPRET is read when a kernel is decorated): `python tests/test_paged_attention.py` prints JSON.

Pools are random, block tables shuffled with holes, lengths ragged and not multiples of the block size; every slot
that no sequence reaches (and the table's padding block) holds NaN, so a read past a length poisons the output.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from assets import DEVICE
from interpret import run_interpreted

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.paged_attention import DecodeConfig, paged_decode_attention
from qwen_awq.kernels.paged_prefill import PrefillConfig, paged_prefill_attention
from qwen_awq.kernels.paged_reference import PagedKV, quantize, rotary_kv_write_reference
from qwen_awq.kernels.rotary_kv import rotary_kv_write
from qwen_awq.models.layers import logn_scale, rotary_cos_sin

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Max |out - ref| / max |ref| against float64: one output rounding plus fp16 weights in the tensor-core products.
# The interpreter rounds to bf16 by truncation (the GPU rounds to nearest), hence bf16's wider bound.
TOLERANCE = {"fp16": 3e-3, "bf16": 2e-2}
DECODE_LENS = (1, 5, 17, 33, 8, 12)
PREFILL = ((5, 5), (30, 12), (17, 1), (3, 3), (40, 7))  # (context after the step, chunk length)
THETA, SEQ_LENGTH = 10000.0, 64  # a short trained length so that LogN scales the test's positions


@dataclass(frozen=True)
class Case:
    kind: str  # decode | prefill | rotary
    heads: int
    kv_heads: int
    dtype: str = "fp16"
    int8: bool = False
    block_size: int = 4
    block: int = 16  # block_n of decode/prefill
    splits: int | None = None
    use_dot: bool = False
    layout: str = "slot"  # slot: (slots, Hkv, D) as KVPool stores it | block: (blocks, Hkv, block_size, D)
    shared: bool = False  # rotary int8: one range per (sequence, head) over the chunk
    head_dim: int = 32
    prefetch: bool = True
    two_pass: bool = False
    offset: bool = False

    @property
    def id(self) -> str:
        kv = "int8" if self.int8 else self.dtype
        return (f"{self.kind}-h{self.heads}kv{self.kv_heads}-d{self.head_dim}-{self.dtype}-{kv}-bs{self.block_size}"
                f"-n{self.block}-s{self.splits}-dot{self.use_dot}-pf{self.prefetch}-2p{self.two_pass}-off{self.offset}-{self.layout}-shared{self.shared}")


CASES = [
    Case("decode", 4, 4),
    Case("decode", 8, 2, splits=3),
    Case("decode", 4, 4, "bf16", splits=2, block_size=8, prefetch=False),
    Case("decode", 4, 4, int8=True, block_size=8, prefetch=False),
    Case("decode", 4, 4, int8=True, splits=3, use_dot=True),
    Case("decode", 4, 4, splits=2, use_dot=True, block=32),
    Case("decode", 8, 2, "bf16", int8=True, splits=4, block_size=16),
    Case("decode", 6, 2, layout="block", splits=2, block_size=8, head_dim=64),
    Case("decode", 4, 4, int8=True, layout="block", block_size=32, splits=2),
    Case("decode", 4, 4, int8=True, two_pass=True, splits=3),
    Case("decode", 4, 4, "bf16", int8=True, two_pass=True, block_size=8, block=32),
    Case("decode", 4, 4, int8=True, offset=True, splits=3),
    Case("decode", 8, 2, "bf16", int8=True, offset=True, splits=2, block_size=16, block=32),
    Case("decode", 4, 4, int8=True, offset=True, layout="block", block_size=8, head_dim=64),
    Case("prefill", 4, 4),
    Case("prefill", 6, 2, block_size=8, block=32),
    Case("prefill", 4, 2, "bf16", int8=True),
    Case("prefill", 4, 4, int8=True, layout="block", block_size=8, head_dim=64),
    Case("rotary", 4, 4),
    Case("rotary", 6, 2, "bf16"),
    Case("rotary", 4, 4, int8=True),
    Case("rotary", 12, 4, int8=True, shared=True),
    Case("rotary", 4, 2, "bf16", int8=True, shared=True),
    Case("rotary", 4, 2, layout="block", block_size=8),
]


def _pool(case: Case, gen: torch.Generator, num_slots: int) -> PagedKV:
    """Random slot-major pool: values N(0, 1), or codes 0..255 with scale in [0.01, 0.05], zero in [100, 150]."""
    shape = (num_slots, case.kv_heads, case.head_dim)
    if not case.int8:
        return PagedKV(*(torch.randn(shape, generator=gen).to(DTYPES[case.dtype]) for _ in range(2)),
                       case.block_size)
    codes = [torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) for _ in range(2)]
    sz = [torch.stack([torch.rand(shape[:2], generator=gen) * 0.04 + 0.01,
                       torch.rand(shape[:2], generator=gen) * 50 + 100], -1) for _ in range(2)]
    return PagedKV(codes[0], codes[1], case.block_size, sz[0], sz[1])


def _tables(ctx: list[int], bs: int, gen: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """Shuffled, non-contiguous block ids (every third block unused), padded with a poisoned block.
    Returns (tables (B, W), num_blocks, the padding block)."""
    need = [-(-n // bs) for n in ctx]
    num_blocks = 3 * sum(need) // 2 + 2
    ids = torch.randperm(num_blocks, generator=gen)
    pad, free = int(ids[0]), ids[1:][torch.arange(num_blocks - 1) % 3 != 2]
    assert len(free) >= sum(need)
    width = max(need) + 2
    tables = torch.full((len(ctx), width), pad, dtype=torch.long)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = free[start:start + n]
        start += n
    return tables, num_blocks, pad


def _dense(kv: PagedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 keys and values per slot (Qwen's dequantization: scale * (code - zero))."""
    if not kv.int8:
        return kv.k.double(), kv.v.double()
    return tuple(sz[..., :1].double() * (c.double() - sz[..., 1:].double()) for c, sz in
                 ((kv.k, kv.k_sz), (kv.v, kv.v_sz)))


def _poison(kv: PagedKV, tables: torch.Tensor, ctx: list[int]) -> None:
    """NaN in every slot past each sequence's length (in the table or not)."""
    bs = kv.block_size
    used = torch.zeros(kv.k.shape[0], dtype=torch.bool)
    for b, n in enumerate(ctx):
        used[[int(tables[b, p // bs]) * bs + p % bs for p in range(n)]] = True
    for x in (kv.k_sz, kv.v_sz) if kv.int8 else (kv.k, kv.v):
        x[~used] = float("nan")


def _block_major(kv: PagedKV) -> PagedKV:
    def move(x):
        return None if x is None else x.view(-1, kv.block_size, *x.shape[1:]).transpose(1, 2).contiguous()

    return PagedKV(move(kv.k), move(kv.v), kv.block_size, move(kv.k_sz), move(kv.v_sz))


def _oracle(q: torch.Tensor, kv: PagedKV, tables: torch.Tensor, ctx: list[int], qlens: list[int], scale: float
            ) -> torch.Tensor:
    """Float64 attention per sequence over the slots p -> table[p // bs] * bs + p % bs, p < its length."""
    keys, values = _dense(kv)
    group, bs, outs, row = q.shape[1] // kv.num_kv_heads, kv.block_size, [], 0
    for b, (n_ctx, n_q) in enumerate(zip(ctx, qlens, strict=True)):
        slots = [int(tables[b, p // bs]) * bs + p % bs for p in range(n_ctx)]
        k = keys[slots].repeat_interleave(group, 1)  # (L, H, D)
        v = values[slots].repeat_interleave(group, 1)
        s = torch.einsum("nhd,lhd->hnl", q[row:row + n_q].double(), k) * scale
        qpos = torch.arange(n_ctx - n_q, n_ctx)
        s = s.masked_fill(torch.arange(n_ctx)[None, None, :] > qpos[None, :, None], float("-inf"))
        outs.append(torch.einsum("hnl,lhd->nhd", s.softmax(-1), v))
        row += n_q
    return torch.cat(outs)


def _attention_case(kern: dict, case: Case, gen: torch.Generator, device: str, poison: bool = True) -> float:
    if case.kind == "decode":
        ctx, qlens = list(DECODE_LENS), [1] * len(DECODE_LENS)
    else:
        ctx, qlens = map(list, zip(*PREFILL, strict=True))
    tables, num_blocks, _ = _tables(ctx, case.block_size, gen)
    kv = _pool(case, gen, num_blocks * case.block_size)
    q = torch.randn(sum(qlens), case.heads, case.head_dim, generator=gen).to(DTYPES[case.dtype])
    scale = case.head_dim ** -0.5 * 1.7  # sharper than 1/sqrt(D): softmax weights far from uniform
    expected = _oracle(q, kv, tables, ctx, qlens, scale)
    if poison:
        _poison(kv, tables, ctx)
    kv = _block_major(kv) if case.layout == "block" else kv
    kv = PagedKV(*(None if x is None else x.to(device) for x in (kv.k, kv.v)), kv.block_size,
                 *(None if x is None else x.to(device) for x in (kv.k_sz, kv.v_sz)))
    tables, lens = tables.to(device), torch.tensor(ctx, device=device)
    if case.kind == "decode":
        cfg = DecodeConfig(block_n=case.block, splits=case.splits, use_dot=case.use_dot, prefetch=case.prefetch,
                           two_pass=case.two_pass, offset=case.offset)
        out = kern["decode"](q.to(device), kv, tables, lens, scale, cfg)
    else:
        cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], device=device)
        cfg = PrefillConfig(block_m=16, block_n=case.block)
        out = kern["prefill"](q.to(device), kv, tables, cu, lens, max(qlens), scale, cfg)
    if out.dtype != q.dtype or out.shape != q.shape:
        return math.inf
    return float((out.double().cpu() - expected).abs().max() / expected.abs().max())


def _rotary_inputs(case: Case, gen: torch.Generator) -> tuple:
    chunk_seq = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 3])  # four chunks of 3, 1, 5 and 1 tokens
    t, width = len(chunk_seq), (case.heads + 2 * case.kv_heads) * case.head_dim
    qkv = (torch.randn(t, width, generator=gen) * 3).to(DTYPES[case.dtype])
    positions = torch.randint(0, 200, (t,), generator=gen)
    alpha = torch.tensor([1.0, 3.0, 7.0])[torch.randint(0, 3, (t,), generator=gen)]
    slots = torch.randperm(3 * t, generator=gen)[:t]
    return qkv, positions, alpha, slots, chunk_seq


def _rotation64(x: torch.Tensor, positions: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Float64 NeoX rotation of x (T, heads, D) with Qwen's NTK base theta * alpha^(D/(D-2))."""
    d = x.shape[-1]
    base = THETA * alpha.double() ** (d / (d - 2))
    angle = positions.double()[:, None] / base[:, None] ** (torch.arange(0, d, 2).double() / d)  # (T, D/2)
    x1, x2 = x.double().chunk(2, -1)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _rotary_case(kern: dict, case: Case, gen: torch.Generator, device: str) -> float:
    """Max error of q, the pool's k and v (dequantized) vs the reference; 0 means bit-exact. Also checks the
    rotation of q against float64 (errors above 0.1 return inf)."""
    qkv, positions, alpha, slots, chunk_seq = _rotary_inputs(case, gen)
    cos, sin = rotary_cos_sin(positions, alpha, case.head_dim, THETA)
    logn = logn_scale(positions, SEQ_LENGTH)
    num_slots = -(-3 * len(slots) // case.block_size) * case.block_size
    want = _pool(case, gen, num_slots)
    got = PagedKV(*(None if x is None else x.clone() for x in (want.k, want.v)), case.block_size,
                  *(None if x is None else x.clone() for x in (want.k_sz, want.v_sz)))
    seq, n = (chunk_seq, 4) if case.shared else (None, 0)
    q_ref = rotary_kv_write_reference(qkv, cos, sin, logn, slots, want, case.heads, seq, n)
    kv = _block_major(got) if case.layout == "block" else got
    kv = PagedKV(*(None if x is None else x.to(device) for x in (kv.k, kv.v)), kv.block_size,
                 *(None if x is None else x.to(device) for x in (kv.k_sz, kv.v_sz)))
    dev_seq = None if seq is None else seq.to(device)
    q = kern["rotary"](qkv.to(device), cos.to(device), sin.to(device), logn.to(device), slots.to(device), kv,
                       case.heads, dev_seq, n).cpu()
    back = _block_major_inverse(kv) if case.layout == "block" else kv
    errors = [float((q.double() - q_ref.double()).abs().max() / q_ref.double().abs().max())]
    for a, b in zip(_dense(want), _dense(back), strict=True):
        errors.append(float((a - b).abs().max() / a.abs().max()))
    q64 = _rotation64(qkv.view(len(slots), -1, case.head_dim)[:, :case.heads], positions, alpha)
    q64 = q64 * logn.double()[:, None, None]
    rotation_err = float((q.double() - q64).abs().max() / q64.abs().max())
    return max(errors) if rotation_err < TOLERANCE[case.dtype] * 2 else math.inf


def _block_major_inverse(kv: PagedKV) -> PagedKV:
    def back(x):
        return None if x is None else x.cpu().transpose(1, 2).reshape(-1, *x.shape[1:2], *x.shape[3:])

    return PagedKV(back(kv.k), back(kv.v), kv.block_size, back(kv.k_sz), back(kv.v_sz))


def _tolerance(case: Case, device: str) -> float:
    if case.kind != "rotary":
        return TOLERANCE[case.dtype]
    exact = case.dtype == "fp16" or device.startswith("cuda")  # the interpreter truncates to bf16
    return 0.0 if exact else TOLERANCE[case.dtype]


def _run_case(kern: dict, case: Case, seed: int, device: str = "cpu") -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    run = _rotary_case if case.kind == "rotary" else _attention_case
    return run(kern, case, gen, device), _tolerance(case, device)


def _kernels() -> dict:
    from qwen_awq.kernels import paged_attention, paged_prefill, rotary_kv

    return {"decode": paged_attention.paged_decode_attention_triton,
            "prefill": paged_prefill.paged_prefill_attention_triton, "rotary": rotary_kv.rotary_kv_write_triton}


def _main() -> None:
    import triton

    if not triton.knobs.runtime.interpret:
        raise SystemExit("run with TRITON_INTERPRET=1")
    print(json.dumps({case.id: _run_case(_kernels(), case, seed) for seed, case in enumerate(CASES)}))


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, list[float]]:
    """Per case (error, tolerance): on the GPU when QWEN_AWQ_TEST_DEVICE=cuda, else in the interpreter."""
    if DEVICE.startswith("cuda"):
        return {case.id: list(_run_case(_kernels(), case, seed, DEVICE)) for seed, case in enumerate(CASES)}
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_kernel_matches_reference(kernel_errors: dict[str, list[float]], case: Case) -> None:
    err, tol = kernel_errors[case.id]
    assert err <= tol, f"{case.id}: error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "rotary" and c.layout == "slot"], ids=lambda c: c.id)
def test_cpu_dispatch_takes_reference(case: Case) -> None:
    """On CPU tensors the dispatchers run the gather reference, which must match float64 too."""
    kern = {"decode": paged_decode_attention, "prefill": paged_prefill_attention}
    gen = torch.Generator().manual_seed(7)
    err = _attention_case(kern, case, gen, "cpu", poison=False)  # the reference gathers whole blocks (NaN too)
    assert err <= TOLERANCE[case.dtype]


def test_reference_quantize_shares_one_range_per_chunk() -> None:
    """Qwen's per-written-chunk scheme, re-derived: each (chunk, head) maps its own min..max onto codes 0..255
    (the min to code 0, the max to 255); per-token groups are one-token chunks."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 3, 64, generator=gen).half()
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for group, n in ((seq, 3), (torch.arange(9), 9)):
        codes, sz = quantize(x, group, n)
        for g in range(n):
            part, c = x[group == g].double(), codes[group == g].int()
            lo, hi = part.amin(dim=(0, 2)), part.amax(dim=(0, 2))  # (Hkv,)
            assert torch.allclose(sz[group == g][..., 0].double(), ((hi - lo) / 255)[None].expand(len(part), -1),
                                  rtol=1e-6, atol=0)
            assert (c.amin(dim=(0, 2)) == 0).all() and (c.amax(dim=(0, 2)) == 255).all()


@pytest.mark.parametrize("int8", [False, True])
def test_cpu_rotary_write_matches_float64(int8: bool) -> None:
    """On the CPU rotary_kv_write is the reference: rotated, LogN-scaled q and rotated k in the slots named."""
    case = Case("rotary", 4, 2, int8=int8)
    gen = torch.Generator().manual_seed(11)
    qkv, positions, alpha, slots, _ = _rotary_inputs(case, gen)
    cos, sin = rotary_cos_sin(positions, alpha, case.head_dim, THETA)
    logn = logn_scale(positions, SEQ_LENGTH)
    kv = _pool(case, gen, 3 * len(slots))
    q = rotary_kv_write(qkv, cos, sin, logn, slots, kv, case.heads)
    heads = qkv.view(len(slots), -1, case.head_dim)
    q64 = _rotation64(heads[:, :4], positions, alpha) * logn.double()[:, None, None]
    k64 = _rotation64(heads[:, 4:6], positions, alpha)
    k = _dense(kv)[0][slots]
    assert float((q.double() - q64).abs().max() / q64.abs().max()) <= TOLERANCE["fp16"]
    assert float((k - k64).abs().max() / k64.abs().max()) <= (2 / 255 if int8 else TOLERANCE["fp16"])


def test_configs_reject_bad_shapes() -> None:
    for bad in (dict(block_n=48), dict(block_n=8), dict(num_warps=3), dict(splits=0), dict(splits=65)):
        with pytest.raises(ConfigError):
            DecodeConfig(**bad)
    for bad in (dict(block_m=8), dict(block_n=24), dict(num_stages=0)):
        with pytest.raises(ConfigError):
            PrefillConfig(**bad)


if __name__ == "__main__":
    _main()
