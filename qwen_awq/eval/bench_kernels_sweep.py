"""Tile sweep of the W4A16 kernels (`bench_kernels --sweep`) and a resource report of the compiled kernels.

Every candidate is first checked against the exactly dequantized reference at the real shape; the fastest valid
one per (shape, M bucket) goes into the table that qwen_awq/kernels/w4a16_tuned.py holds per card.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import tempfile
from functools import partial

import torch

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16 as kern

Gc, Mc = kern.GemvConfig, kern.MmaConfig
# First H200 sweep (bench/results/awq_kernel_H200_w4a16_sweep1.md): at M <= 16 every kernel was bound by bytes in
# flight per SM, not by instructions; the best GEMV held no split-K and few warps per SM. These candidates spread
# a program's K range over all its warps (lanes > 32) so each loop step loads 16-32 KB: registers (ptxas, Triton
# 3.6, sm_90) 162-168 -> 3 programs of 4 warps per SM; block_m > 1 unpacks each weight once for several x rows.
# Rows-first tiles (issue 10): the (lanes, rows, ...) tiles above put 8 threads on the rows at block_n = 8, so each
# thread held 8 lanes' x (256 fp32); (rows, lanes, ...) gives one lane per thread. Offline ptxas (Triton 3.9,
# sm_90, bench/kernel_asm.py): regs 128 / 168 / 127 / 128 (8 warps) / 141, no spills, vs 255 + 472 bytes of
# stack for the tuned (lanes, rows) config on the same compiler; progs_per_sm follows from 64K regs per SM.
RF = dict(rows_first=True, early=True)
RF_M1 = [Gc(block_n=8, prefetch=True, progs_per_sm=4, **RF),
         Gc(block_n=8, prefetch=2, progs_per_sm=3, **RF),
         Gc(block_n=4, prefetch=2, progs_per_sm=4, **RF),
         Gc(block_n=16, prefetch=True, num_warps=8, progs_per_sm=2, **RF),
         Gc(block_n=8, prefetch=True, progs_per_sm=3, xvec=True, **RF)]
GEMV_GRID = {
    1: [Gc(block_n=16, lanes=128, chunks=1, prefetch=False, progs_per_sm=3),
        Gc(block_n=8, lanes=128, chunks=2, prefetch=False, progs_per_sm=3),
        Gc(block_n=8, lanes=128, chunks=1, prefetch=True, progs_per_sm=3),
        Gc(block_n=16, lanes=256, chunks=1, prefetch=False, num_warps=8, progs_per_sm=1),
        Gc(block_n=16, lanes=128, chunks=1, prefetch=False, progs_per_sm=6),
        Gc(block_n=4, chunks=4, progs_per_sm=2),  # the first sweep's best
        *RF_M1],
    2: [Gc(block_n=16, lanes=128, chunks=1, prefetch=False, progs_per_sm=2, block_m=2),
        Gc(block_n=8, lanes=128, chunks=1, prefetch=False, progs_per_sm=3, block_m=2),
        Gc(block_n=8, prefetch=False, rows_first=True, progs_per_sm=3, block_m=2),
        Gc(block_n=4, prefetch=True, early=True, rows_first=True, progs_per_sm=3, block_m=2)],
    4: [Gc(block_n=8, lanes=128, chunks=1, prefetch=False, progs_per_sm=2, block_m=4),
        Gc(block_n=4, lanes=128, chunks=1, prefetch=False, progs_per_sm=3, block_m=4)],
}
# The NVRTC GEMV (w4a16_cuda.py): a warp's rows x 16-byte chunks per row in flight per lane; registers (nvcc 13.0
# -Xptxas -v, sm_90, M = 1): rows 1 / unroll 4: 72, 2 / 4: 96, 2 / 2: 80, 4 / 2: 120, 1 / 8: 96.
Cc = kern.CudaGemvConfig
CUDA_GRID = {
    1: [Cc(rows=1, unroll=4), Cc(rows=2, unroll=4), Cc(rows=2, unroll=2), Cc(rows=4, unroll=2), Cc(rows=1, unroll=8),
        Cc(rows=2, unroll=4, warps=8), Cc(rows=1, unroll=4, warps=2)],
    2: [Cc(rows=1, unroll=4), Cc(rows=2, unroll=2), Cc(rows=1, unroll=2)],
    4: [Cc(rows=1, unroll=2), Cc(rows=1, unroll=4), Cc(rows=2, unroll=1)],
}
M16 = dict(block_n=64, num_warps=4)  # the first sweep's best tile at M = 1..64
MMA_GRID = {
    1: [Mc(**M16), Mc(**M16, num_stages=4, waves=5), Mc(**M16, scale_w=True, waves=5)],
    16: [Mc(**M16), Mc(**M16, num_stages=4, waves=5), Mc(**M16, scale_w=True, waves=5),
         Mc(**M16, num_stages=5, waves=8), Mc(block_n=128, num_warps=8, waves=2)],
    32: [Mc(block_m=32, **M16), Mc(block_m=32, **M16, scale_w=True), Mc(block_m=32, block_n=128)],
    64: [Mc(block_m=64, **M16), Mc(block_m=64, **M16, scale_w=True),
         Mc(block_m=64, block_n=128, num_warps=8, scale_w=True)],
    128: [Mc(block_m=128, **M16, waves=2), Mc(block_m=128, block_n=128, num_warps=8, scale_w=True, waves=2),
          Mc(block_m=64, **M16, scale_w=True, waves=2)],
    256: [Mc(block_m=128, block_n=128, num_warps=8, scale_w=True, waves=2),
          Mc(block_m=128, **M16, scale_w=True, waves=2)],
}
DENSE_MIN_SWEPT = 32
SWEPT_MS = (1, 2, 4, 16, 32, 64, 128, 256, 512)


def candidates(m: int) -> list[tuple[str, object]]:
    """(kind, config) pairs worth timing at M = m (bucket tops; the 16-row MMA tiles cover M = 1..16)."""
    out: list[tuple[str, object]] = [("gemv", c) for c in GEMV_GRID.get(m, [])]
    out += [("cuda", c) for c in CUDA_GRID.get(m, [])]
    out += [("mma", c) for c in MMA_GRID.get(m, [])]
    if m >= DENSE_MIN_SWEPT:
        out.append(("dense", None))
    return out


def _call(kind: str, cfg, x: torch.Tensor, w: kern.W4Weight) -> torch.Tensor:
    if kind == "gemv":
        return kern.w4a16_gemv(x, w, config=cfg)
    if kind == "mma":
        return kern.w4a16_mma(x, w, config=cfg)
    if kind == "cuda":
        return kern.w4a16_nvrtc_only(x, w, config=cfg)
    return kern.w4a16_dense(x, w)


def _sweep_shape(k: int, n: int, gen: torch.Generator) -> list[dict]:
    layers, ref_w = bk.rotated_layers(k, n, gen)
    results = []
    for m in SWEPT_MS:
        x = torch.randn(m, k, generator=gen).half().cuda()  # (M, K)
        for kind, cfg in candidates(m):
            entry = {"K": k, "N": n, "M": m, "kind": kind, "config": dataclasses.asdict(cfg) if cfg else None,
                     **bk.timed_candidate(partial(_call, kind, cfg), x, layers, ref_w)}
            results.append(entry)
            print(f"sweep K={k} N={n} M={m} {kind} {entry.get('config')}: {entry.get('us', entry)}", flush=True)
    return results


BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # the table's M keys (m_bucket: next power of two)


def _pool(results: list[dict], bucket: int) -> dict[str, dict]:
    """Timed choices for an M bucket, keyed by repr((kind, config)): those swept at M = bucket, and below 16 the
    16-row MMA tiles timed at M = 16 (the same tiles and grid as at M = 2..15)."""
    pool = {}
    for r in results:
        if "us" in r and (r["M"] == bucket or (bucket < 16 and r["M"] == 16 and r["kind"] == "mma")):
            key = repr((r["kind"], r["config"]))
            if key not in pool or r["us"] < pool[key]["us"]:
                pool[key] = r
    return pool


def tuned_table(results: list[dict]) -> dict:
    """{(K, N): {bucket: (kind, params)}}, plus "any": per bucket the choice with the least total over shapes."""
    table: dict = {"any": {}}
    for bucket in BUCKETS:
        per_shape = {(k, n): _pool([r for r in results if (r["K"], r["N"]) == (k, n)], bucket) for k, n in bk.SHAPES}
        for shape, pool in per_shape.items():
            if pool:
                best = min(pool.values(), key=lambda r: r["us"])
                table.setdefault(shape, {})[bucket] = (best["kind"], best["config"])
        common = set.intersection(*(set(pool) for pool in per_shape.values()))
        if common:
            key = min(common, key=lambda c: sum(pool[c]["us"] for pool in per_shape.values()))
            r = next(iter(per_shape.values()))[key]
            table["any"][bucket] = (r["kind"], r["config"])
    return table


def sweep(bw: float, gen: torch.Generator) -> dict:
    """Time every candidate at every shape; install the winners for this card, so that the table that follows
    in the same run measures the dispatcher with them."""
    results = [r for k, n in bk.SHAPES for r in _sweep_shape(k, n, gen)]
    table = tuned_table(results)
    print("TUNED table for qwen_awq/kernels/w4a16_tuned.py:", repr(table), sep="\n", flush=True)
    kern.TUNED[torch.cuda.get_device_name()] = {"table": table}
    kern.choose.cache_clear()
    return {"results": results, "table": {repr(key): val for key, val in table.items()}, "copy_GBps": bw}


def _tool(name: str) -> str:
    import triton

    local = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return local if os.path.exists(local) else name


def sass_report(cubin: bytes) -> dict:
    """Registers, stack bytes and per-loop opcode counts of a cubin (cuobjdump ships with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "loops": loop_histograms(sass), "sass": sass}


def loop_histograms(sass: str) -> list[dict]:
    """Opcode counts of each loop body: the instructions between a backward branch's target and the branch."""
    rows = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(3).split(".")[0], m.group(4)))
    loops = []
    for addr, op, rest in rows:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = collections.Counter(o for a, o, _ in rows if start <= a <= addr)
            loops.append({"start": hex(start), "end": hex(addr), "n": sum(body.values()),
                          "ops": dict(body.most_common())})
    return loops


def compiled_report() -> list[dict]:
    """Registers, spills, shared memory and the main loop's instruction mix of every compiled W4A16 kernel."""
    from qwen_awq.kernels.w4a16_gemv import gemv_kernel
    from qwen_awq.kernels.w4a16_mma import dequant_kernel, mma_kernel

    out = []
    for fn in (gemv_kernel, mma_kernel, dequant_kernel):
        try:
            kernels = [c for cache in fn.device_caches.values() for c in cache[0].values()]
        except (AttributeError, IndexError, TypeError) as err:  # Triton's JIT cache layout changed
            out.append({"kernel": fn.__name__, "error": f"{type(err).__name__}: {err}"})
            continue
        for compiled in kernels:
            try:
                out.append(_compiled_entry(fn, compiled))
            except Exception as err:  # internals differ across Triton versions: report, do not fail
                out.append({"kernel": fn.__name__, "error": f"{type(err).__name__}: {err}"})
    return out


def _compiled_entry(fn, compiled) -> dict:
    consts = {fn.arg_names[k[0]]: v for k, v in compiled.src.constants.items()}
    sass = sass_report(compiled.asm["cubin"])
    loop = max(sass["loops"], key=lambda lp: lp["n"], default={"n": 0, "ops": {}})
    return {"kernel": fn.__name__, "constexprs": {k: str(v) for k, v in consts.items()},
            "num_warps": compiled.metadata.num_warps, "n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
            "shared": compiled.metadata.shared, "main_loop_instructions": loop["n"], "main_loop_ops": loop["ops"]}
