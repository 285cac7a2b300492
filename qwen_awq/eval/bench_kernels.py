"""`qwen-awq bench kernels`: the W4A16 linear layer against its peers and its byte floor, per Qwen-7B shape and M.

    python3 -m qwen_awq.eval.bench_kernels --out bench/results/awq_kernel_<card>.json [--sweep] [--asm]

Columns per (K, N, M), microseconds: ours (the dispatcher), each of our kernels forced, the previous AWQ-layout
kernels (awq_gemm.awq_matmul), fp16 cuBLAS, torch's int4 tinygemm (bf16), the byte floor (int4 + fp16 scales and
zeros + x + y over the copy bandwidth measured in the same run). Each time is the median of CUDA-graph replays
that call the layer once per weight copy, with enough copies (>= 4) that L2 cannot hold them. --sweep times tile
configs (each checked against the reference at the real shape first) and prints the table for w4a16_tuned.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen_awq.eval.bench_kernels_common import (
    GROUP,
    SHAPES,
    check,
    copies_for,
    random_layer,
    time_rotated,
    w4_bytes,
)
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.awq_gemm import awq_matmul
from qwen_awq.quant.packing import dequantize_repacked

MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 4096]
GEMV_MAX_M, MMA_MAX_M = 4, 512  # beyond these the kernel rereads weights or loses to dense; not timed


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written (spec: performance.md)."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def tinygemm_weights(k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's int4 tinygemm operands (random; speed only): packed weight and (K/G, N, 2) bf16 scales/zeros."""
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen).cuda()  # (N, K/2)
        packed = torch._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(k // GROUP, n, 2, generator=gen) * 0.02).to(torch.bfloat16).cuda()
        return packed, sz
    except (RuntimeError, AttributeError) as err:  # op missing or signature changed in this torch
        print(f"tinygemm unavailable: {err}", file=sys.stderr)
        return None


METHODS: dict[str, tuple[str, Callable]] = {  # name -> (weights it takes, call(x, w))
    "ours": ("w4", lambda x, w: kern.w4a16_triton(x, w)),
    "gemv": ("w4", lambda x, w: kern.w4a16_gemv(x, w)),
    "mma": ("w4", lambda x, w: kern.w4a16_mma(x, w)),
    "dense": ("w4", lambda x, w: kern.w4a16_dense(x, w)),
    "awq_legacy": ("awq", lambda x, w: awq_matmul(x, *w, GROUP)),
    "cublas_fp16": ("fp16", lambda x, w: F.linear(x, w)),
    "tinygemm_bf16": ("tiny", lambda x, w: torch._weight_int4pack_mm(x, w[0], GROUP, w[1])),
}


def _applies(name: str, m: int) -> bool:
    return not ((name == "gemv" and m > GEMV_MAX_M) or (name == "mma" and m > MMA_MAX_M))


def bench_shape(k: int, n: int, bw: float, gen: torch.Generator, ms: list[int]) -> list[dict]:
    """Every method at every M for one (K, N): microseconds and the floor; each of ours checked first."""
    layers = [random_layer(k, n, gen) for _ in range(copies_for(w4_bytes(k, n, 1)))]
    ref_w = dequantize_repacked(layers[0][1].qweight_t, layers[0][1].scale_zero, GROUP, torch.float16)
    weights = {"w4": [lay[1] for lay in layers], "awq": [lay[0] for lay in layers]}
    weights["fp16"] = [ref_w.half() for _ in range(copies_for(2 * k * n))]  # (N, K), distinct copies
    tiny = [tinygemm_weights(k, n, gen) for _ in range(copies_for(k * n // 2))]
    weights["tiny"] = tiny if all(t is not None for t in tiny) else []
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).half().cuda()  # (M, K)
        row: dict = {"K": k, "N": n, "M": m, "floor_us": w4_bytes(k, n, m) / (bw * 1e3)}
        for name, (kind, call) in METHODS.items():
            if not _applies(name, m) or not weights[kind]:
                continue
            xi = x.to(torch.bfloat16) if kind == "tiny" else x
            try:
                if kind == "w4":
                    row[f"{name}_err"] = check(call(x, weights["w4"][0]), x, ref_w)
                row[name] = time_rotated(call, xi, weights[kind])
            except Exception as err:  # a peer missing in this torch, say: record it and go on
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


COLUMNS = ("ours", "gemv", "mma", "dense", "awq_legacy", "cublas_fp16", "tinygemm_bf16")
HEADER = f"{'K':>6} {'N':>6} {'M':>5} " + " ".join(f"{c[:10]:>10}" for c in COLUMNS) + \
    f" {'floor':>7} {'%bw':>5} {'cub/ours':>8} {'tiny/ours':>9}"


def format_row(row: dict) -> str:
    cells = [f"{row['K']:>6} {row['N']:>6} {row['M']:>5}"]
    cells += [f"{row[c]:>10.1f}" if c in row else f"{'-':>10}" for c in COLUMNS]
    ours = row.get("ours", float("nan"))
    cells.append(f"{row['floor_us']:>7.1f} {100 * row['floor_us'] / ours:>5.0f}")
    cells.append(f"{row.get('cublas_fp16', float('nan')) / ours:>8.2f}")
    cells.append(f"{row.get('tinygemm_bf16', float('nan')) / ours:>9.2f}")
    return " ".join(cells)


def markdown(rows: list[dict], title: str, command: str) -> str:
    head = "| K | N | M | " + " | ".join(COLUMNS) + " | floor | % of copy bw | cuBLAS / ours | tinygemm / ours |"
    lines = [f"# {title}", "", f"Command: `{command}`", "", "Microseconds per call.", "", head,
             "|" + " --- |" * (len(COLUMNS) + 7)]
    for r in rows:
        ours = r.get("ours", float("nan"))
        vals = [f"{r[c]:.1f}" if c in r else "-" for c in COLUMNS]
        lines.append(f"| {r['K']} | {r['N']} | {r['M']} | " + " | ".join(vals) + f" | {r['floor_us']:.1f} | "
                     f"{100 * r['floor_us'] / ours:.0f} | {r.get('cublas_fp16', float('nan')) / ours:.2f} | "
                     f"{r.get('tinygemm_bf16', float('nan')) / ours:.2f} |")
    return "\n".join(lines) + "\n"


def time_repeated(call: Callable, reps: int = 20) -> float:
    """Median microseconds of call() from a CUDA graph of reps calls (small, cache-resident work)."""
    from triton.testing import do_bench

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    return 1e3 * do_bench(graph.replay, warmup=10, rep=30, return_mode="median") / reps


def _separate_silu(fn: Callable, gate_up: torch.Tensor, w: kern.W4Weight) -> torch.Tensor:
    from qwen_awq.kernels.reference import silu_mul_reference

    return fn(silu_mul_reference(gate_up), w)


def bench_fusions(gen: torch.Generator, hidden: int = 4096, inter: int = 11008) -> dict:
    """The decode step's fusions against their unfused equivalents: add + RMSNorm (hidden 4096) and the down
    projection with its SiLU(gate) * up prologue (Qwen-7B's 11008 -> 4096)."""
    from qwen_awq.kernels.reference import fused_add_rms_norm_reference, silu_mul_reference
    from qwen_awq.kernels.rms_norm import fused_add_rms_norm

    out: dict = {}
    weight = torch.rand(hidden, generator=gen).half().cuda() + 0.5
    for m in (1, 32):
        x, r = (torch.randn(m, hidden, generator=gen).half().cuda() for _ in range(2))
        for name, fn in (("fused", fused_add_rms_norm), ("torch", fused_add_rms_norm_reference)):
            out[f"add_rms_norm_m{m}_{name}_us"] = time_repeated(partial(fn, x, r, weight, 1e-6))
    w, fn = random_layer(inter, hidden, gen)[1], kern.w4a16_triton  # the dispatcher's choice for each M
    for m in (1, 16, 32, 128):
        gate_up = torch.randn(m, 2 * inter, generator=gen).half().cuda()
        fused = fn(gate_up, w, silu=True)
        split = fn(silu_mul_reference(gate_up), w)
        out[f"silu_down_m{m}_max_rel_diff"] = float((fused - split).abs().max() / split.abs().max())
        out[f"silu_down_m{m}_fused_us"] = time_repeated(partial(fn, gate_up, w, silu=True))
        out[f"silu_down_m{m}_separate_us"] = time_repeated(partial(_separate_silu, fn, gate_up, w))
    print("fusions:", json.dumps(out, indent=1), flush=True)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="path of the JSON results (a .md table goes beside it)")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs and print the tuned table")
    parser.add_argument("--asm", action="store_true", help="record registers and spills of compiled kernels")


def register_kernels(bench_sub) -> None:
    """`qwen-awq bench kernels` (the same flags as `python3 -m qwen_awq.eval.bench_kernels`)."""
    k = bench_sub.add_parser("kernels", help="per-shape W4A16 linear table vs cuBLAS, tinygemm and the byte floor",
                             description=__doc__.split("\n\n")[0])
    add_arguments(k)
    k.set_defaults(func=cmd_bench_kernels)


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    run(args, "qwen-awq bench kernels " + " ".join(sys.argv[3:]))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args, "python3 -m qwen_awq.eval.bench_kernels " + " ".join(argv if argv is not None else sys.argv[1:]))


def run(args: argparse.Namespace, command: str) -> None:
    if not torch.cuda.is_available():
        from qwen_awq.errors import ConfigError

        raise ConfigError("bench kernels needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference products stay fp32
    gen, started = torch.Generator().manual_seed(1), time.time()
    bw, device = copy_bandwidth(), torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "command": command, "copy_GBps": bw,
              "group_size": GROUP, "date": time.strftime("%Y-%m-%d")}
    out, title = Path(args.out), f"{device}: copy bandwidth {bw:.0f} GB/s (read + write); group size {GROUP}"
    if args.sweep:
        from qwen_awq.eval.bench_kernels_sweep import sweep

        result["sweep"] = sweep(bw, gen)
        out.write_text(json.dumps(result, indent=1))  # each stage lands on disk before the next starts
    print(title, HEADER, sep="\n", flush=True)
    ms = [int(v) for v in args.ms.split(",")]
    result["rows"] = []
    for k, n in SHAPES:  # each shape lands on disk as it finishes (a time limit keeps what is done)
        result["rows"] += bench_shape(k, n, bw, gen, ms)
        out.write_text(json.dumps(result, indent=1))
    try:
        result["fusions"] = bench_fusions(gen)
    except Exception as err:  # the linear table above is the main result: keep it
        result["fusions"] = {"error": f"{type(err).__name__}: {err}"}
    result["wall_s"] = time.time() - started
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result["rows"], title, command))
    if args.asm:
        from qwen_awq.eval.bench_kernels_sweep import compiled_report

        result["compiled"] = compiled_report()
        out.write_text(json.dumps(result, indent=1))
    print(HEADER, *map(format_row, result["rows"]), sep="\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
