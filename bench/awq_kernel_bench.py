"""GPU benchmark of the AWQ W4A16 kernels against fp16 cuBLAS and the byte floor (spec: performance.md).

Run on a CUDA machine: python bench/awq_kernel_bench.py --out bench/results/awq_kernel_<card>.json [--sweep]
Each timing is one CUDA graph replay over several weight copies (so L2 cannot hold them) / the copy count.
Columns: ours (awq_matmul's choice), each path forced, fp16 cuBLAS, the byte floor, ours / floor, fp16 / ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from qwen_awq.kernels import awq_gemm as kern
from qwen_awq.kernels.reference import awq_matmul_reference

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Qwen-7B (K, N): qkv, o, gate_up, down
MS = [1, 16, 64, 256]
GROUP = 128  # spec: awq.md, the checkpoint default
ROTATE_BYTES = 512 * 2**20  # weights swept per replay: ~10x an H100/H200 L2 (50 MiB)
MAX_COPIES = 64
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # max |y - ref| / max |ref|, as in the unit tests
Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # qweight, qzeros, scales


def random_packed(k: int, n: int, group: int, gen: torch.Generator) -> Packed:
    """Random AWQ GEMM tensors on the GPU: full-range int32 words, fp16 scales in 0.002..0.022."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen)  # (K, N/8)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.002).half()  # (K/G, N)
    return qweight.cuda(), qzeros.cuda(), scales.cuda()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


PATHS = {
    "dispatch": kern.awq_matmul,
    "gemv": kern.awq_gemv_triton,
    "gemm": kern.awq_gemm_triton,
    "dequant_mm": kern.awq_dequant_matmul,
}


def check_correctness() -> None:
    """Every path and the dispatcher vs the reference (fp16, bf16, bias or not); exit on a mismatch."""
    gen = torch.Generator().manual_seed(0)
    for k, n, group in ((512, 1024, 128), (384, 1000, 64), (256, 264, 32)):
        packed = random_packed(k, n, group, gen)
        for dtype in (torch.float16, torch.bfloat16):
            for m in (1, 3, 16, 33, 64, 300):
                x = torch.randn(m, k, generator=gen).to(dtype).cuda()  # (M, K)
                bias = torch.randn(n, generator=gen).half().cuda()  # (N,)
                for b, (name, fn) in itertools.product((None, bias), PATHS.items()):
                    err = _rel_err(fn(x, *packed, group, b), awq_matmul_reference(x, *packed, group, b))
                    if not err <= TOLERANCE[dtype]:
                        case = f"{name} k={k} n={n} g={group} m={m} {dtype} bias={b is not None}"
                        sys.exit(f"MISMATCH {case}: relative error {err:.3g}")
    check_graph_capture(packed, group)
    print("correctness: all paths match the reference (fp16, bf16, bias, M in 1..300); graph replay OK")


def check_graph_capture(packed: Packed, group: int) -> None:
    """Capture awq_matmul in a CUDA graph, feed new x, and compare the replay with an eager call."""
    k = packed[0].shape[0]
    for m in (1, 16, 64, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)  # (M, K), the graph's static input
        kern.awq_matmul(x, *packed, group)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = kern.awq_matmul(x, *packed, group)
        x.copy_(torch.randn_like(x))
        graph.replay()
        # A replay that kept reading the captured x would err by O(1).
        if not _rel_err(y, kern.awq_matmul(x, *packed, group)) <= TOLERANCE[x.dtype]:
            sys.exit(f"MISMATCH: CUDA graph replay differs from eager at m={m}")


def time_rotated(
    call: Callable[..., torch.Tensor], x: torch.Tensor, copies: list, rep_ms: int = 200
) -> float:
    """Median microseconds of call(x, weights), from a CUDA graph that calls once per weight copy."""
    for c in copies:  # compile and warm up outside the capture
        call(x, c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            call(x, c)
    ms = do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median")
    del graph
    return 1e3 * ms / len(copies)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written (spec: performance.md)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def n_copies(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def w4_bytes(k: int, n: int, m: int) -> int:
    """Bytes an ideal W4 kernel moves: packed weights, zeros, scales, fp16 x and y."""
    return k * n // 2 + (k // GROUP) * (n // 2 + 2 * n) + 2 * m * (k + n)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "awq_matmul": lambda x, p: kern.awq_matmul(x, *p, GROUP),
    "gemv": lambda x, p: kern.awq_gemv_triton(x, *p, GROUP),
    "gemm_fused": lambda x, p: kern.awq_gemm_triton(x, *p, GROUP),
    "dequant_cublas": lambda x, p: kern.awq_dequant_matmul(x, *p, GROUP),
    "cublas_fp16": lambda x, w: torch.matmul(x, w),  # the peer: fp16 weights (K, N), same values
}
GEMV_BENCH_MAX_M = 16  # the GEMV rereads the weights per x row; timing it further says nothing new


def bench_shape(k: int, n: int, bw: float, gen: torch.Generator) -> list[dict]:
    """All methods at every M for one (K, N): microseconds, achieved GB/s and the floor."""
    w4 = [random_packed(k, n, GROUP, gen) for _ in range(n_copies(w4_bytes(k, n, 1)))]
    fp16 = [kern.dequantize_triton(*p, GROUP, torch.float16) for p in w4[: n_copies(2 * k * n)]]  # (K, N)
    rows = []
    for m in MS:
        x = torch.randn(m, k, generator=gen).half().cuda()  # (M, K)
        row: dict = {"K": k, "N": n, "M": m}
        for name, call in METHODS.items():
            if name == "gemv" and m > GEMV_BENCH_MAX_M:
                continue
            fp = name == "cublas_fp16"
            nbytes = 2 * (k * n + m * (k + n)) if fp else w4_bytes(k, n, m)
            us = time_rotated(call, x, fp16 if fp else w4)
            row[name] = {"us": us, "GBps": nbytes / (us * 1e-6) / 1e9, "floor_us": nbytes / (bw * 1e3)}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    cells = [f"{row['K']:>6} {row['N']:>6} {row['M']:>4}"]
    for name in ("awq_matmul", "gemv", "gemm_fused", "dequant_cublas", "cublas_fp16"):
        cells.append(f"{row[name]['us']:>9.1f}" if name in row else f"{'-':>9}")
    ours, fp16 = row["awq_matmul"], row["cublas_fp16"]
    cells.append(f"{ours['floor_us']:>8.1f} {ours['us'] / ours['floor_us']:>7.2f}x")
    cells.append(f"{fp16['us'] / ours['us']:>7.2f}x")
    return " ".join(cells)


HEADER = (
    f"{'K':>6} {'N':>6} {'M':>4} {'ours_us':>9} {'gemv':>9} {'fused':>9} {'deq+cb':>9} {'fp16_cb':>9}"
    f" {'floor_us':>8} {'ours/fl':>8} {'speedup':>8}"
)


GEMV_SWEEP = [(1, 64, 64, 2, 3), (1, 64, 128, 4, 3), (1, 128, 32, 4, 3), (1, 128, 64, 4, 3), (1, 128, 128, 4, 3),
              (1, 128, 128, 8, 3), (1, 256, 32, 4, 3), (1, 256, 64, 8, 3), (1, 256, 128, 8, 3),
              (1, 512, 64, 8, 3)]  # (block_m, block_n, block_k, warps, stages)
GEMM_SWEEP = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (64, 64, 128, 4, 4), (64, 256, 64, 8, 3)]
SPLITS = (None, 1, 2, 4, 8, 16)  # None: the split-K heuristic


def _call_config(fn: Callable, cfg: kern.TileConfig, split: int | None, x: torch.Tensor, p) -> torch.Tensor:
    return fn(x, *p, GROUP, config=cfg, split_k=split)


def sweep_one(k: int, n: int, m: int, w4: list[Packed], bw: float, gen: torch.Generator) -> dict:
    """Time every tile config and split-K count at one (K, N, M); return all timings and the best."""
    fn, table = (kern.awq_gemv_triton, GEMV_SWEEP) if m == 1 else (kern.awq_gemm_triton, GEMM_SWEEP)
    x = torch.randn(m, k, generator=gen).half().cuda()  # (M, K)
    timed = []
    for cfg in (kern.TileConfig(*t) for t in table if t[0] <= max(16, m)):
        for split in SPLITS:
            us = time_rotated(partial(_call_config, fn, cfg, split), x, w4, rep_ms=50)
            timed.append({"config": dataclasses.asdict(cfg), "split_k": split, "us": us})
    best = min(timed, key=lambda t: t["us"])
    floor = w4_bytes(k, n, m) / (bw * 1e3)
    print(f"sweep K={k} N={n} M={m}: best {best} ({best['us'] / floor:.2f}x floor)", flush=True)
    return {"K": k, "N": n, "M": m, "floor_us": floor, "best": best, "all": timed}


def sweep_configs(bw: float, gen: torch.Generator) -> list[dict]:
    """Tile configs and split-K counts for the GEMV (M=1) and the fused kernel (M=16, 64), per shape."""
    results = []
    for k, n in SHAPES:
        w4 = [random_packed(k, n, GROUP, gen) for _ in range(n_copies(w4_bytes(k, n, 1)))]
        results += [sweep_one(k, n, m, w4, bw, gen) for m in (1, 16, 64)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="path of the JSON results file")
    parser.add_argument("--sweep", action="store_true", help="also time tile configs and split-K counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    check_correctness()
    gen = torch.Generator().manual_seed(1)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    title = f"{device}: copy bandwidth {bw:.0f} GB/s (read + write); group size {GROUP}; times in us"
    print(title, HEADER, sep="\n")
    rows = [row for k, n in SHAPES for row in bench_shape(k, n, bw, gen)]
    table = "\n".join([HEADER, *map(format_row, rows)])
    Path(args.out).with_suffix(".md").write_text(f"`{' '.join(sys.argv)}`\n\n{title}\n\n```\n{table}\n```\n")
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv), "copy_GBps": bw, "group_size": GROUP, "rows": rows,
              "thresholds": {"GEMV_MAX_M": kern.GEMV_MAX_M, "DEQUANT_MIN_M": kern.DEQUANT_MIN_M}}
    if args.sweep:
        result["sweep"] = sweep_configs(bw, gen)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} and its .md table")


if __name__ == "__main__":
    main()
