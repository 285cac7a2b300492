"""Correctness of the paged attention kernels at real shapes (Qwen-7B MHA, Llama-style GQA) on the GPU.

Oracles: the gather reference run in float64 (attention) and the plain-PyTorch rotary write (bit-exact); a CUDA
graph captured once must replay exactly for other lengths and tables. Used by bench/attention_bench.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_awq.kernels.paged_attention import DecodeConfig, paged_decode_attention_triton
from qwen_awq.kernels.paged_prefill import paged_prefill_attention_triton
from qwen_awq.kernels.paged_reference import PagedKV, paged_attention_reference, rotary_kv_write_reference
from qwen_awq.kernels.rotary_kv import rotary_kv_write_triton
from qwen_awq.models.layers import logn_scale, rotary_cos_sin

HEAD_DIM, BLOCK_SIZE, THETA, SEQ_LENGTH = 128, 16, 10000.0, 8192  # Qwen-7B (spec: qwen.md), the engine's blocks
# max |out - ref| / max |ref| against float64 (fp16: one output rounding and fp16 tensor-core operands)
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Sizes:
    """Shapes of the checks and timings: the real ones on CUDA, tiny ones for a CPU smoke run of the script."""

    device: str = "cuda"
    heads: int = 32
    kv_heads_gqa: int = 8
    batch: int = 64
    max_ctx: int = 1024
    prefill: tuple = ((512, 512), (1536, 512), (77, 77), (2048, 1), (300, 45), (1030, 1030))
    rotary: tuple = ((64, 64), (1500, 3))  # (tokens, sequences)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls("cpu", 4, 2, 5, 40, ((20, 20), (37, 5), (9, 1)), ((4, 4), (10, 3)))


def random_pool(num_slots: int, kv_heads: int, dtype: torch.dtype, int8: bool, gen: torch.Generator,
                copies: int = 1) -> list[PagedKV]:
    """`copies` layers of a random pool (slots, kv_heads, 128): N(0, 1) values, or codes with (scale, zero)."""
    shape, dev = (copies, num_slots, kv_heads, HEAD_DIM), gen.device
    if not int8:
        k, v = (torch.randn(shape, device=dev, generator=gen, dtype=dtype) for _ in range(2))
        return [PagedKV(k[i], v[i], BLOCK_SIZE) for i in range(copies)]
    k, v = (torch.randint(0, 256, shape, device=dev, generator=gen, dtype=torch.uint8) for _ in range(2))
    sz = []
    for _ in range(2):
        scale = torch.rand(shape[:3], device=dev, generator=gen) * 0.04 + 0.01
        sz.append(torch.stack([scale, torch.rand(shape[:3], device=dev, generator=gen) * 50 + 100], -1))
    return [PagedKV(k[i], v[i], BLOCK_SIZE, sz[0][i], sz[1][i]) for i in range(copies)]


def random_tables(ctx: list[int], gen: torch.Generator, spare: float = 1.25) -> tuple[torch.Tensor, int]:
    """Shuffled distinct block ids ((B, W) int32, W the longest need), from a pool `spare` times the need."""
    need = [-(-n // BLOCK_SIZE) for n in ctx]
    num_blocks = int(sum(need) * spare) + 1
    ids = torch.randperm(num_blocks, device=gen.device, generator=gen)
    tables = torch.zeros((len(ctx), max(need)), dtype=torch.int32, device=gen.device)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[start:start + n]
        start += n
    return tables, num_blocks * BLOCK_SIZE


def _as64(kv: PagedKV) -> PagedKV:
    return kv if kv.int8 else PagedKV(kv.k.double(), kv.v.double(), kv.block_size)


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def _attention_errors(*args) -> dict:
    """_attention_case, or a failed case that records the exception."""
    try:
        return _attention_case(*args)
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        return {"kernel": float("inf"), "tol": 0.0, "ok": False, "error": repr(exc)[:400]}


def _attention_case(kind: str, heads: int, kv_heads: int, dtype: torch.dtype, int8: bool,
                    ctx: list[int], qlens: list[int], gen: torch.Generator, cfg: DecodeConfig | None = None) -> dict:
    tables, slots = random_tables(ctx, gen)
    kv = random_pool(slots, kv_heads, dtype, int8, gen)[0]
    dev = gen.device
    q = torch.randn(sum(qlens), heads, HEAD_DIM, device=dev, generator=gen, dtype=dtype)
    lens = torch.tensor(ctx, device=dev)
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], device=dev)
    scale = HEAD_DIM ** -0.5 * 1.7  # sharper than 1/sqrt(D): weights far from uniform
    ref = paged_attention_reference(q.double(), _as64(kv), tables, cu, lens, max(qlens), scale)
    if kind == "decode":
        out = paged_decode_attention_triton(q, kv, tables, lens, scale, cfg)
    else:
        out = paged_prefill_attention_triton(q, kv, tables, cu, lens, max(qlens), scale)
    gather = paged_attention_reference(q, kv, tables, cu, lens, max(qlens), scale)
    tol = TOLERANCE[dtype]
    return {"kernel": _err(out, ref), "gather": _err(gather, ref), "tol": tol, "ok": _err(out, ref) <= tol}


def attention_checks(gen: torch.Generator, sizes: Sizes) -> dict:
    n, top = sizes.batch, sizes.max_ctx
    ragged = torch.randint(1, top + 1, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    decode_ctx = ([top, 1, 17, top - 24] + ragged)[:n]  # the longest, the shortest, and random lengths
    pctx, pq = (list(x) for x in zip(*sizes.prefill, strict=True))
    cases = {}
    for heads, kv_heads in ((sizes.heads, sizes.heads), (sizes.heads, sizes.kv_heads_gqa)):
        for dtype, int8 in ((torch.float16, False), (torch.bfloat16, False), (torch.float16, True)):
            name = f"h{heads}kv{kv_heads}-{'int8' if int8 else str(dtype)[6:]}"
            cases[f"decode-{n}x{top}-{name}"] = _attention_errors("decode", heads, kv_heads, dtype, int8,
                                                                  decode_ctx, [1] * n, gen)
            cases[f"prefill-{name}"] = _attention_errors("prefill", heads, kv_heads, dtype, int8, pctx, pq, gen)
    variants = [("cudacore", False, DecodeConfig(use_dot=False)), ("cudacore", True, DecodeConfig(use_dot=False)),
                ("tensorcore", True, DecodeConfig(use_dot=True)), ("twopass", True, DecodeConfig(
                    use_dot=False, two_pass=True, block_n=32, num_warps=8, num_stages=1)),
                ("plain-u8", True, DecodeConfig(use_dot=False, asm=False, block_n=32, num_warps=8, num_stages=1)),
                ("offset", True, DecodeConfig(offset=True)),
                ("offset-plain", True, DecodeConfig(offset=True, asm=False))]
    for name, int8, cfg in variants:  # the MHA kernels besides each storage's default
        cases[f"decode-{n}x{top}-{name}-{'int8' if int8 else 'fp16'}"] = _attention_errors(
            "decode", sizes.heads, sizes.heads, torch.float16, int8, decode_ctx, [1] * n, gen, cfg)
    for splits in (2, 8):  # forced splits on the headline shape
        tables, slots = random_tables(decode_ctx, gen)
        kv = random_pool(slots, sizes.heads, torch.float16, False, gen)[0]
        q = torch.randn(n, sizes.heads, HEAD_DIM, device=gen.device, generator=gen, dtype=torch.float16)
        lens, cu = torch.tensor(decode_ctx, device=gen.device), torch.arange(n + 1, device=gen.device)
        ref = paged_attention_reference(q.double(), _as64(kv), tables, cu, lens, 1, 0.1)
        err = _err(paged_decode_attention_triton(q, kv, tables, lens, 0.1, DecodeConfig(splits=splits)), ref)
        cases[f"decode-splits{splits}"] = {"kernel": err, "tol": 3e-3, "ok": err <= 3e-3}
    return cases


def graph_check(int8: bool, gen: torch.Generator, sizes: Sizes, config: DecodeConfig | None = None) -> dict:
    """Capture decode at (batch, max_ctx / 16 blocks) once; replay after new lengths and tables are copied in."""
    n, top, dev = sizes.batch, sizes.max_ctx, gen.device
    tables, slots = random_tables([top] * n, gen, spare=1.5)
    kv = random_pool(slots, sizes.heads, torch.float16, int8, gen)[0]
    q = torch.randn(n, sizes.heads, HEAD_DIM, device=dev, generator=gen, dtype=torch.float16)
    lens = torch.randint(1, top + 1, (n,), device=dev, generator=gen)

    def step() -> torch.Tensor:
        return paged_decode_attention_triton(q, kv, tables, lens, 0.1, config)

    if dev.type != "cuda":
        return {"replay_vs_eager_max_abs": 0.0, "ok": bool(step().isfinite().all())}
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    worst = 0.0
    for _ in range(3):
        lens.copy_(torch.randint(1, top + 1, (n,), device=dev, generator=gen))
        tables.copy_(torch.randperm(slots // BLOCK_SIZE, device=dev, generator=gen)[:tables.numel()].view_as(tables))
        q.copy_(torch.randn(q.shape, device=dev, generator=gen, dtype=q.dtype))
        graph.replay()
        worst = max(worst, float((out.float() - step().float()).abs().max()))
    return {"replay_vs_eager_max_abs": worst, "ok": worst == 0.0}


def rotary_checks(gen: torch.Generator, sizes: Sizes) -> dict:
    """Fused rotary + KV write vs the reference on the GPU: q, pool values and (scale, zero) bit-exact.
    (Under the CPU interpreter bf16 rounds by truncation: mismatches there are expected.)"""
    cases, h, g, dev = {}, sizes.heads, sizes.kv_heads_gqa, gen.device
    variants = [(h, h, torch.float16, False, False), (h, h, torch.bfloat16, False, False),
                (h, g, torch.float16, False, False), (h, h, torch.float16, True, False),
                (h, h, torch.float16, True, True), (h, g, torch.bfloat16, True, True)]
    for heads, kv_heads, dtype, int8, shared in variants:
        for t, seqs in sizes.rotary:
            chunk_seq = torch.arange(t, device=dev) * seqs // t  # sorted: contiguous chunks
            qkv = torch.randn(t, (heads + 2 * kv_heads) * HEAD_DIM, device=dev, generator=gen).to(dtype) * 3
            positions = torch.randint(0, 32768, (t,), device=dev, generator=gen)
            alpha = torch.tensor([1.0, 3.0, 7.0], device=dev)[torch.randint(0, 3, (t,), device=dev, generator=gen)]
            cos, sin = rotary_cos_sin(positions, alpha, HEAD_DIM, THETA)
            logn = logn_scale(positions, SEQ_LENGTH)
            slots = torch.randperm(2 * t, device=dev, generator=gen)[:t]
            want = random_pool(2 * t, kv_heads, dtype, int8, gen)[0]
            got = PagedKV(want.k.clone(), want.v.clone(), BLOCK_SIZE,
                          *(None if x is None else x.clone() for x in (want.k_sz, want.v_sz)))
            seq, n = (chunk_seq, seqs) if shared else (None, 0)
            q_ref = rotary_kv_write_reference(qkv, cos, sin, logn, slots, want, heads, seq, n)
            q = rotary_kv_write_triton(qkv, cos, sin, logn, slots, got, heads, seq, n)
            pairs = [(q, q_ref), (got.k, want.k), (got.v, want.v)]
            if int8:
                pairs += [(got.k_sz, want.k_sz), (got.v_sz, want.v_sz)]
            diffs = [int((a != b).sum()) for a, b in pairs]
            name = f"h{heads}kv{kv_heads}-{str(dtype)[6:]}-{'int8' if int8 else 'kv'}-shared{shared}-t{t}"
            cases[name] = {"mismatched_elements": diffs, "ok": sum(diffs) == 0}
    return cases
