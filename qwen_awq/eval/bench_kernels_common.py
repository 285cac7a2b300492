"""What the W4A16 kernel benchmark (bench_kernels.py) and its tile sweep (bench_kernels_sweep.py) share: the
Qwen-7B shapes, the byte count of an ideal kernel, random repacked layers, the rotated-weights CUDA-graph timer and
the relative-error check, and the candidate loop of bench/gemv_candidates.py and bench/mma_cuda_candidates.py."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwen_awq.eval.peers import copy_bandwidth
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.quant.packing import dequantize_repacked, repack_awq

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Qwen-7B (K, N): qkv, o, gate_up, down
GROUP = 128  # spec: awq.md, the checkpoint default
ROTATE_BYTES = 512 * 2**20  # weights swept per replay: ~8x the H200's 60 MB L2
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # max |y - ref| / max |ref|, as the unit tests use
Grid = Callable[[int], list[tuple[str, object, Callable]]]  # M -> [(kind, config, call(x, w))]


def copies_for(nbytes: int) -> int:
    return max(4, min(64, math.ceil(ROTATE_BYTES / nbytes)))


def w4_bytes(k: int, n: int, m: int) -> int:
    """Bytes an ideal W4 g128 kernel moves: int4 weights, fp16 scales, 4-bit zeros, fp16 x and y."""
    return k * n // 2 + (k // GROUP) * n * 5 // 2 + 2 * m * (k + n)


def random_layer(k: int, n: int, gen: torch.Generator) -> tuple[tuple, kern.W4Weight]:
    """Random AutoAWQ tensors on the GPU (full-range words) and their repack."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=gen).cuda()
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32, generator=gen).cuda()
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.02 + 0.002).half().cuda()  # (K/G, N)
    qt, sz = repack_awq(qweight, qzeros, scales, GROUP)
    return (qweight, qzeros, scales), kern.W4Weight(qt, sz, GROUP, torch.float16, kern.new_locks("cuda"))


def time_rotated(call: Callable, x: torch.Tensor, weights: list, rep_ms: int = 30) -> float:
    """Median microseconds of call(x, w), from one CUDA graph that calls it once per weight copy."""
    from triton.testing import do_bench

    for w in weights[:2]:  # compile and warm up outside the capture
        call(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(x, w)
    ms = do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    del graph
    return 1e3 * ms / len(weights)


def check(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor) -> float:
    """Relative error of y against the float32 product with the exactly dequantized weight (N, K)."""
    ref = x.float() @ ref_w.t()
    return float((y.float() - ref).abs().max() / ref.abs().max())


def timed_candidate(call: Callable, x: torch.Tensor, layers: list, ref_w: torch.Tensor, rep_ms: int = 25) -> dict:
    """{"err", "us"} of call(x, w): checked against the exactly dequantized reference first, timed only when
    within tolerance; a candidate that fails to compile or launch gives {"error"} instead of stopping a sweep."""
    entry: dict = {}
    try:
        entry["err"] = check(call(x, layers[0]), x, ref_w)
        if entry["err"] <= TOLERANCE[torch.float16]:
            entry["us"] = time_rotated(call, x, layers, rep_ms=rep_ms)
    except Exception as err:  # shared memory, registers, a Triton version's limits: a result, not a crash
        entry["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return entry


def rotated_layers(k: int, n: int, gen: torch.Generator) -> tuple[list, torch.Tensor]:
    """Enough random repacked (K -> N) layers that L2 never holds them all (time_rotated), and the first one's
    exactly dequantized fp16 weight (N, K) for check."""
    layers = [random_layer(k, n, gen)[1] for _ in range(copies_for(w4_bytes(k, n, 1)))]
    return layers, dequantize_repacked(layers[0].qweight_t, layers[0].scale_zero, GROUP, torch.float16)



def dense_copies(k: int, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random fp16 weights (N, K), enough copies for time_rotated: the cuBLAS peer of a W4A16 time."""
    return [torch.randn(n, k, generator=gen).half().cuda() for _ in range(copies_for(2 * n * k))]


def candidate_rows(k: int, n: int, ms: list[int], gen: torch.Generator, deadline: float, grid: Grid) -> list[dict]:
    """Per M, for one (K, N): fp16 cuBLAS, the dispatcher's current choice and every (kind, config, call) of
    grid(M), each checked against the exact reference and timed (timed_candidate); printed per M as it ends."""
    layers, ref_w = rotated_layers(k, n, gen)
    dense = dense_copies(k, n, gen)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).half().cuda()
        row = {"K": k, "N": n, "M": m, "floor_bytes": w4_bytes(k, n, m),
               "cublas_fp16_us": time_rotated(lambda x_, w: F.linear(x_, w), x, dense, rep_ms=25),
               "current_us": time_rotated(kern.w4a16_triton, x, layers, rep_ms=25), "candidates": []}
        for kind, cfg, call in grid(m):
            if time.time() > deadline:
                break
            row["candidates"].append({"kind": kind, "config": dataclasses.asdict(cfg),
                                      **timed_candidate(call, x, layers, ref_w)})
        rows.append(row)
        best = min((e for e in row["candidates"] if "us" in e), key=lambda e: e["us"], default=None)
        failed = [e.get("error", e.get("err")) for e in row["candidates"]][:2]
        print(f"== K={k} N={n} M={m}: cuBLAS {row['cublas_fp16_us']:.1f} current {row['current_us']:.1f} "
              + (f"best {best['us']:.1f} {best['kind']} {best['config']}" if best else f"none passed: {failed}"),
              flush=True)
    return rows


def candidate_totals(rows: list[dict], bw: float) -> None:
    """Per M: the current choice, cuBLAS and the floor over the shapes, then each candidate's total (the table's
    "any" rule)."""
    for m in sorted({r["M"] for r in rows}):
        at_m = [r for r in rows if r["M"] == m]
        floor, cublas = sum(r["floor_bytes"] for r in at_m) / bw * 1e6, sum(r["cublas_fp16_us"] for r in at_m)
        print(f"M={m}: current {sum(r['current_us'] for r in at_m):.1f} us, cuBLAS {cublas:.1f}, floor {floor:.1f} "
              f"({len(at_m)} shapes summed)")
        for i, e in enumerate(at_m[0]["candidates"]):
            ts = [r["candidates"][i].get("us") for r in at_m if i < len(r["candidates"])]
            if len(ts) == len(at_m) and None not in ts:
                print(f"   {sum(ts):7.1f} us ({100 * floor / sum(ts):.0f}% of copy, {cublas / sum(ts):.2f}x cuBLAS)"
                      f"  {e['kind']} {e['config']}")


def run_candidates(out: str, ms: list[int], budget: float, grid: Grid) -> None:
    """candidate_rows over Qwen-7B's shapes, the JSON rewritten to `out` after each shape, then the totals."""
    gen, deadline, bw = torch.Generator().manual_seed(5), time.time() + budget, copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_Bps": bw, "rows": []}
    for k, n in SHAPES:
        result["rows"] += candidate_rows(k, n, ms, gen, deadline, grid)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    candidate_totals(result["rows"], bw)


def candidates_main(doc: str, ms: str, budget: float, grid: Grid) -> None:
    """The command line of a candidate script (bench/gemv_candidates.py, bench/mma_cuda_candidates.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ms", default=ms, help=f"comma-separated row counts (default {ms})")
    p.add_argument("--budget", type=float, default=budget, help="seconds; later candidates are skipped past it")
    args = p.parse_args()
    run_candidates(args.out, [int(v) for v in args.ms.split(",")], args.budget, grid)
