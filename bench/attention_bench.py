"""Paged attention kernels on the GPU (issue 12): correctness at real shapes, then timings against the copy
bandwidth and the engine's gather + SDPA path, all in one run; JSON + Markdown under --out, table printed last.

    python bench/attention_bench.py --out DIR [--sweep] [--budget SECONDS] [--smoke]

--smoke runs every section on tiny shapes through Triton's CPU interpreter (TRITON_INTERPRET=1): it checks the
script, not the kernels' speed.

Decode: Qwen-7B heads (32, head_dim 128, MHA), block size 16, fp16 and int8 K/V. Each timing is the median replay
of a CUDA graph over `copies` pool layers (so L2 never holds the K/V), divided by the copies. --sweep times block
sizes, warps, stages, split counts, tensor cores for MHA and a block-major pool layout, and uses the best.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_checks import (  # noqa: E402
    BLOCK_SIZE,
    HEAD_DIM,
    Sizes,
    attention_checks,
    graph_check,
    random_pool,
    random_tables,
    rotary_checks,
)

from qwen_awq.kernels.paged_attention import (  # noqa: E402
    FP16_DEFAULT,
    INT8_DEFAULT,
    DecodeConfig,
    default_config,
    paged_decode_attention_triton,
)
from qwen_awq.kernels.paged_attention_cuda import CudaDecodeConfig, paged_decode_int8_cuda  # noqa: E402
from qwen_awq.kernels.paged_prefill import PrefillConfig, paged_prefill_attention_triton  # noqa: E402
from qwen_awq.kernels.paged_reference import (  # noqa: E402
    PagedKV,
    dequantize,
    gather_slots,
    rotary_kv_write_reference,
)
from qwen_awq.kernels.rotary_kv import rotary_kv_write_triton  # noqa: E402
from qwen_awq.models.attention import sdpa  # noqa: E402
from qwen_awq.models.layers import logn_scale, rotary_cos_sin  # noqa: E402

DECODE_SHAPES = [(64, 1024), (1, 256), (1, 2048), (1, 8192), (128, 768)]
PREFILL_SHAPES = [(128, 512, 0), (16, 512, 1536)]  # (chunks, chunk tokens, cached prefix)
ROTARY_TOKENS = (64, 8192)
SMOKE = {"decode": [(5, 40), (1, 20)], "prefill": [(3, 16, 0), (2, 8, 24)], "rotary": (4, 16)}
COPY_TARGET = 512 << 20  # bytes of K/V per timed graph: several times the H200's 60 MB L2
START = time.time()


def guarded(fn, *args):
    """fn(*args), or a failed check that records the exception (the run goes on to time what works)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        return {"ok": False, "error": repr(exc)[:400]}


def bench_ms(fn) -> float:
    if not torch.cuda.is_available():  # --smoke: one call through the interpreter
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def timed(fns: list) -> float:
    """Median ms per call: fns (one per pool copy) run back to back in one CUDA graph."""
    if not torch.cuda.is_available():
        return sum(bench_ms(f) for f in fns) / len(fns)
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    ms = bench_ms(graph.replay)
    del graph
    return ms / len(fns)


def copy_bandwidth(device: str) -> float:
    x = torch.empty(1 << (30 if device == "cuda" else 20), dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    return 2 * x.numel() / bench_ms(lambda: y.copy_(x)) / 1e6  # GB/s, bytes read + written


def kv_bytes(tokens: int, heads: int, int8: bool) -> int:
    per = HEAD_DIM * (1 if int8 else 2) + (2 * 4 if int8 else 0)  # codes or values, (scale, zero) fp32
    return tokens * heads * 2 * per  # K and V


class DecodeSetup:
    """Pool copies, tables and queries for `batch` sequences of `ctx` cached tokens."""

    def __init__(self, batch: int, ctx: int, int8: bool, gen: torch.Generator, heads: int,
                 layout: str = "slot") -> None:
        self.batch, self.ctx, self.int8 = batch, ctx, int8
        self.bytes = kv_bytes(batch * ctx, heads, int8)
        self.copies = max(1, min(32, -(-COPY_TARGET // self.bytes)))
        if gen.device.type != "cuda":
            self.copies = 1
        self.tables, slots = random_tables([ctx] * batch, gen)
        self.kvs = random_pool(slots, heads, torch.float16, int8, gen, self.copies)
        if layout == "block":
            self.kvs = [_block_major(kv) for kv in self.kvs]
        self.q = torch.randn(batch, heads, HEAD_DIM, device=gen.device, generator=gen, dtype=torch.float16)
        self.lens = torch.full((batch,), ctx, device=gen.device)

    def kernel(self, cfg: DecodeConfig | CudaDecodeConfig) -> float:
        if isinstance(cfg, CudaDecodeConfig):  # the NVRTC int8 kernel (the engine's int8 path where it compiles)
            return timed([lambda kv=kv: paged_decode_int8_cuda(self.q, kv, self.tables, self.lens, 0.088, cfg)
                          for kv in self.kvs])
        return timed([lambda kv=kv: paged_decode_attention_triton(self.q, kv, self.tables, self.lens, 0.088, cfg)
                      for kv in self.kvs])

    def gather(self) -> float:
        """The engine's former decode path: gather the table's slots, dequantize, SDPA with a length mask."""
        slots = gather_slots(self.tables, BLOCK_SIZE)  # (B, L)
        mask = (torch.arange(slots.shape[1], device=slots.device) < self.lens[:, None])[:, None, None]  # (B,1,1,L)

        def run(kv: PagedKV) -> torch.Tensor:
            keys, values = kv.k[slots], kv.v[slots]
            if kv.int8:
                keys, values = dequantize(keys, kv.k_sz[slots], torch.float16), dequantize(values, kv.v_sz[slots],
                                                                                           torch.float16)
            return sdpa(self.q[:, None], keys, values, 0.088, mask, causal=False)

        return timed([lambda kv=kv: run(kv) for kv in self.kvs])


def _block_major(kv: PagedKV) -> PagedKV:
    def move(x):
        return None if x is None else x.view(-1, BLOCK_SIZE, *x.shape[1:]).transpose(1, 2).contiguous()

    return PagedKV(move(kv.k), move(kv.v), BLOCK_SIZE, move(kv.k_sz), move(kv.v_sz))


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def left(budget: float) -> float:
    return budget - (time.time() - START)


# Candidates of the second H200 run; the first run's full grid (block_n 32-128, 2-8 warps, 1-4 stages, splits,
# tensor vs CUDA cores, prefetch) is in bench/results/paged_attention_H200_sweep1.json.
# int8 as fp16 1024 + code on tensor cores (DecodeConfig.offset), named for the coordinator's runs.
_OFF = DecodeConfig(offset=True)
INT8_OFFSET = {"offset": _OFF, "offset-n128s2": replace(_OFF, block_n=128, num_stages=2),
               "offset-n32": replace(_OFF, block_n=32), "offset-w8": replace(_OFF, num_warps=8),
               "offset-s2": replace(_OFF, num_stages=2), "offset-plain": replace(_OFF, asm=False)}
CANDIDATES = {
    False: [FP16_DEFAULT, replace(FP16_DEFAULT, block_n=128, num_stages=2)],
    True: [INT8_DEFAULT, replace(INT8_DEFAULT, asm=False), replace(INT8_DEFAULT, num_warps=4),
           replace(INT8_DEFAULT, block_n=64, num_warps=4), replace(INT8_DEFAULT, num_warps=4, prefetch=True),
           replace(INT8_DEFAULT, two_pass=True), replace(INT8_DEFAULT, two_pass=True, num_warps=4),
           replace(INT8_DEFAULT, two_pass=True, block_n=64, num_warps=4), *INT8_OFFSET.values()],
}


def sweep_decode(setup: DecodeSetup, budget: float) -> tuple[DecodeConfig, list[dict]]:
    """The candidates at auto splits, then split counts for the best; the fastest wins. A config that fails to
    compile or run is recorded, not fatal."""
    rows = []

    def run(cfg: DecodeConfig) -> None:
        if left(budget) > 70:  # leave time for prefill and rotary
            try:
                rows.append({**asdict(cfg), "ms": setup.kernel(cfg)})
            except Exception as exc:  # noqa: BLE001 - a failed variant is a result
                rows.append({**asdict(cfg), "ms": float("inf"), "error": repr(exc)[:400]})

    for cfg in CANDIDATES[setup.int8]:
        run(cfg)
    ok = [r for r in rows if r["ms"] < float("inf")]
    if not ok:
        return default_config(setup.int8), rows
    best = DecodeConfig(**{k: v for k, v in min(ok, key=lambda r: r["ms"]).items() if k not in ("ms", "error")})
    for splits in (2, 4):
        run(replace(best, splits=splits))
    fastest = min((r for r in rows if r["ms"] < float("inf")), key=lambda r: r["ms"])
    return DecodeConfig(**{k: v for k, v in fastest.items() if k not in ("ms", "error")}), rows


def decode_table(cfgs: dict[bool, DecodeConfig], copy: float, gen: torch.Generator, sizes: Sizes,
                 budget: float) -> list[dict]:
    rows = []
    for batch, ctx in DECODE_SHAPES if sizes.device == "cuda" else SMOKE["decode"]:
        for int8 in (False, True):
            if left(budget) < 45:
                break
            setup = DecodeSetup(batch, ctx, int8, gen, sizes.heads)
            cfg, error = cfgs[int8], None
            try:
                ms = setup.kernel(cfg)
            except Exception as exc:  # noqa: BLE001 - e.g. inline PTX refused: time the plain conversion
                if not isinstance(cfg, DecodeConfig):
                    raise
                cfg, error = replace(cfg, asm=False), repr(exc)[:400]
                ms = setup.kernel(cfg)
            split_ms = {}
            if batch == 1:  # few sequences: the split count matters most
                for splits in (8, 16, 32, 64):
                    split_ms[splits] = setup.kernel(replace(cfg, splits=splits))
            gather = setup.gather() if batch * ctx <= 128 * 768 else None
            rows.append({"batch": batch, "ctx": ctx, "kv": "int8" if int8 else "fp16", "kv_mb": setup.bytes / 1e6,
                         "ms": ms, "gbps": gbps(setup.bytes, ms), "pct_copy": 100 * gbps(setup.bytes, ms) / copy,
                         "gather_ms": gather, "vs_gather": gather / ms if gather else None, "split_ms": split_ms,
                         "error": error})
            del setup
    return rows


def prefill_rows(shape: tuple[int, int, int], int8: bool, cfgs: list[PrefillConfig], gen: torch.Generator,
                 heads: int) -> list[dict]:
    """Chunks of `chunk` new tokens after `prefix` cached ones: kernel configs, the gather path, contiguous SDPA."""
    (batch, chunk, prefix), dev = shape, gen.device
    ctx = prefix + chunk
    tables, slots = random_tables([ctx] * batch, gen)
    kv = random_pool(slots, heads, torch.float16, int8, gen)[0]
    q = torch.randn(batch * chunk, heads, HEAD_DIM, device=dev, generator=gen, dtype=torch.float16)
    lens = torch.full((batch,), ctx, device=dev)
    cu = torch.arange(batch + 1, device=dev) * chunk
    flops = 4 * batch * heads * HEAD_DIM * (chunk * prefix + chunk * (chunk + 1) / 2)
    rows = []
    for cfg in cfgs:
        ms = bench_ms(lambda cfg=cfg: paged_prefill_attention_triton(q, kv, tables, cu, lens, chunk, 0.088, cfg))
        rows.append({"path": "kernel", **asdict(cfg), "ms": ms, "tflops": flops / ms / 1e9})
    slots_bt = gather_slots(tables, BLOCK_SIZE)
    qpos = prefix + torch.arange(chunk, device=dev)
    mask = (torch.arange(slots_bt.shape[1], device=dev)[None, :] <= qpos[:, None])[None, None]  # (1, 1, S, L)

    def gather() -> torch.Tensor:
        keys, values = kv.k[slots_bt], kv.v[slots_bt]
        if kv.int8:
            keys, values = dequantize(keys, kv.k_sz[slots_bt], q.dtype), dequantize(values, kv.v_sz[slots_bt],
                                                                                     q.dtype)
        return sdpa(q.view(batch, chunk, heads, HEAD_DIM), keys, values, 0.088, mask, causal=False)

    ms = bench_ms(gather)
    rows.append({"path": "gather+sdpa", "ms": ms, "tflops": flops / ms / 1e9})
    if prefix == 0 and not int8:  # the contiguous peer: flash SDPA on (B, H, S, D)
        qc, kc, vc = (torch.randn(batch, heads, chunk, HEAD_DIM, device=dev, dtype=torch.float16, generator=gen)
                      for _ in range(3))
        ms = bench_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True))
        rows.append({"path": "sdpa-contiguous", "ms": ms, "tflops": flops / ms / 1e9})
    for r in rows:
        r.update(batch=batch, chunk=chunk, prefix=prefix, kv="int8" if int8 else "fp16")
    return rows


def rotary_row(tokens: int, int8: bool, gen: torch.Generator, heads: int) -> dict:
    """Fused rotary + KV write vs the reference's ~10-20 small kernels, each in a CUDA graph."""
    dev = gen.device
    qkv = torch.randn(tokens, 3 * heads * HEAD_DIM, device=dev, generator=gen, dtype=torch.float16)
    pos = torch.randint(0, 8192, (tokens,), device=dev, generator=gen)
    cos, sin = rotary_cos_sin(pos, torch.ones(tokens, device=dev), HEAD_DIM, 10000.0)
    logn = logn_scale(pos, 8192)
    slots = torch.randperm(2 * tokens, device=dev, generator=gen)[:tokens]
    kv = random_pool(2 * tokens, heads, torch.float16, int8, gen)[0]
    args = (qkv, cos, sin, logn, slots, kv, heads)
    ours = timed([lambda: rotary_kv_write_triton(*args)])
    ref = timed([lambda: rotary_kv_write_reference(*args)])
    nbytes = tokens * heads * HEAD_DIM * 2 * (3 + 1) + kv_bytes(tokens, heads, int8)  # qkv in, q out, K/V out
    return {"tokens": tokens, "kv": "int8" if int8 else "fp16", "ms": ours, "ref_ms": ref, "speedup": ref / ours,
            "gbps": gbps(nbytes, ours)}


def prefill_section(sweep: bool, gen: torch.Generator, sizes: Sizes, budget: float
                    ) -> tuple[PrefillConfig, list[dict]]:
    cfgs = [PrefillConfig()]
    if sweep and left(budget) > 90:
        cfgs = [PrefillConfig(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3)]
    first, chunked = PREFILL_SHAPES if sizes.device == "cuda" else SMOKE["prefill"]
    rows = prefill_rows(first, False, cfgs, gen, sizes.heads)
    best_row = min((r for r in rows if r["path"] == "kernel"), key=lambda r: r["ms"])
    best = PrefillConfig(best_row["block_m"], best_row["block_n"], best_row["num_warps"], best_row["num_stages"])
    if left(budget) > 40:
        rows += prefill_rows(first, True, [best], gen, sizes.heads)
        rows += prefill_rows(chunked, False, [best], gen, sizes.heads)  # a chunk after a cached prefix
    return best, rows


def decode_lines(rows: list[dict], cfg: dict) -> list[str]:
    lines = [f"\nDecode attention, configs fp16 {cfg['fp16']}, int8 {cfg['int8']}:\n"]
    lines.append("| batch x ctx | KV | K/V MB | kernel us | GB/s | % copy | gather+SDPA us | speedup "
                 "| splits 8/16/32/64 us |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        gather = f"{r['gather_ms'] * 1e3:.1f} | {r['vs_gather']:.1f}x" if r["gather_ms"] else "- | -"
        splits = "/".join(f"{v * 1e3:.1f}" for v in r["split_ms"].values()) or "-"
        lines.append(f"| {r['batch']} x {r['ctx']} | {r['kv']} | {r['kv_mb']:.1f} | {r['ms'] * 1e3:.1f} | "
                     f"{r['gbps']:.0f} | {r['pct_copy']:.1f} | {gather} | {splits} |")
    fp16 = {(r["batch"], r["ctx"]): r["ms"] for r in rows if r["kv"] == "fp16"}
    ratios = [f"{b}x{c}: {fp16[b, c] / r['ms']:.2f}x" for r in rows if r["kv"] == "int8"
              for b, c in [(r["batch"], r["ctx"])] if (b, c) in fp16]
    lines.append(f"\nint8 KV speed over fp16 KV: {', '.join(ratios)}")
    return lines


def sweep_lines(res: dict) -> list[str]:
    """The five fastest decode configs per KV dtype at the headline shape, and the block-major layout."""
    if "sweep" not in res:
        return []
    lines, copy = ["\nDecode sweep at the headline shape (auto splits unless named):\n"], res["copy_gbps"]
    for kv in ("fp16", "int8"):
        rows, nbytes = sorted(res["sweep"].get(kv, []), key=lambda r: r["ms"]), res["sweep"].get(f"{kv}_bytes", 1)
        for r in rows[:6]:
            lines.append(f"- {kv}: block_n {r['block_n']}, warps {r['num_warps']}, stages {r['num_stages']}, "
                         f"splits {r['splits']}, dot {r['use_dot']}, prefetch {r['prefetch']}, "
                         f"two_pass {r['two_pass']}, offset {r.get('offset')}, asm {r['asm']}: {r['ms'] * 1e3:.1f} us, "
                         f"{100 * gbps(nbytes, r['ms']) / copy:.1f}% of copy")
        if rows:
            lines.append(f"- {kv}: slowest of {len(rows)}: {rows[-1]['ms'] * 1e3:.1f} us")
    for kv, ms in res["sweep"].get("block_major_ms", {}).items():
        pct = 100 * gbps(res["sweep"][f"{kv}_bytes"], ms) / copy
        lines.append(f"- block-major pool (blocks, heads, 16, 128), {kv}, best config: {ms * 1e3:.1f} us, {pct:.1f}%")
    return lines


def markdown(res: dict) -> str:
    env, lines = res["env"], []
    lines.append(f"{env['date']}, {env['device']}, torch {env['torch']}, triton {env['triton']}; "
                 f"copy bandwidth {res['copy_gbps']:.0f} GB/s (read + write). Command: `{env['command']}`")
    groups = [res.get(g, {}) for g in ("checks", "rotary_checks", "graph_checks")]
    ok = all("error" not in g and all(c["ok"] for c in g.values()) for g in groups)
    lines.append(f"\nCorrectness at real shapes: {'all passed' if ok else 'FAILURES (see JSON)'}; worst kernel "
                 f"error vs float64 {max(c['kernel'] for c in res['checks'].values()):.2e} "
                 f"(gather path {max(c.get('gather', 0) for c in res['checks'].values()):.2e}).")
    for key in ("decode", "decode_tuned"):
        if key in res:
            lines += decode_lines(res[key], res[key + "_config"] if key == "decode_tuned" else res["decode_config"])
    lines += sweep_lines(res)
    lines.append(f"\nPrefill (config {res['prefill_config']}):\n")
    lines.append("| batch x chunk (prefix) | KV | path | ms | TFLOP/s |")
    lines.append("| --- | --- | --- | --- | --- |")
    best = res["prefill_config"]
    for r in res["prefill"]:
        if r["path"] == "kernel" and any(r.get(k) != v for k, v in best.items()):
            continue
        lines.append(f"| {r['batch']} x {r['chunk']} ({r['prefix']}) | {r['kv']} | {r['path']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.0f} |")
    if res.get("rotary"):
        lines.append("\nFused rotary + KV write (CUDA graph each):\n")
        lines.append("| tokens | KV | kernel us | GB/s | reference us | speedup |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for r in res["rotary"]:
            lines.append(f"| {r['tokens']} | {r['kv']} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} | "
                         f"{r['ref_ms'] * 1e3:.1f} | {r['speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def sweep_section(res: dict, gen: torch.Generator, sizes: Sizes, budget: float) -> dict[bool, DecodeConfig]:
    """Decode tile/split sweep at the headline shape per KV dtype, then the block-major layout with the best."""
    batch, ctx = DECODE_SHAPES[0] if sizes.device == "cuda" else SMOKE["decode"][0]
    cfgs, res["sweep"] = {}, {}
    for int8 in (False, True):
        setup = DecodeSetup(batch, ctx, int8, gen, sizes.heads)
        cfgs[int8], res["sweep"]["int8" if int8 else "fp16"] = sweep_decode(setup, budget)
        res["sweep"][f"{'int8' if int8 else 'fp16'}_bytes"] = setup.bytes
        del setup
    if left(budget) > 80:
        res["sweep"]["block_major_ms"] = {
            kv: DecodeSetup(batch, ctx, kv == "int8", gen, sizes.heads, layout="block").kernel(cfgs[kv == "int8"])
            for kv in ("fp16", "int8")}
    return cfgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--budget", type=float, default=280.0, help="seconds: optional parts stop before this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.smoke() if args.smoke else Sizes()
    gen = torch.Generator(device=sizes.device).manual_seed(0)
    name = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (Triton interpreter)"
    res: dict = {"env": {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                         "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv)}}

    def save(section: str) -> None:
        print(f"[{time.time() - START:6.1f}s] {section}", flush=True)
        (args.out / "paged_attention.json").write_text(json.dumps(res, indent=1, default=str))

    res["copy_gbps"] = copy_bandwidth(sizes.device)
    res["checks"] = attention_checks(gen, sizes)  # each case guarded inside
    res["graph_checks"] = {f"int8={i}-{name}": guarded(graph_check, i, gen, sizes, cfg) for i in (False, True)
                           for name, cfg in (("default", None), ("cudacore", DecodeConfig(use_dot=False)),
                                             ("twopass", replace(INT8_DEFAULT, two_pass=True)),
                                             ("offset", INT8_OFFSET["offset"]))}
    save("checks")
    res["rotary_checks"] = guarded(rotary_checks, gen, sizes)
    save("rotary checks")
    cfgs = {False: FP16_DEFAULT, True: INT8_DEFAULT}
    res["decode_config"] = {"fp16": asdict(cfgs[False]), "int8": asdict(cfgs[True])}
    res["decode"] = decode_table(cfgs, res["copy_gbps"], gen, sizes, args.budget)
    save("decode table (default configs)")
    if args.sweep:
        tuned = sweep_section(res, gen, sizes, args.budget)
        save("decode sweep")
    # prefill: the first run's 16-config sweep chose PrefillConfig's defaults (paged_attention_H200_sweep1.json)
    best, res["prefill"] = prefill_section(False, gen, sizes, args.budget)
    res["prefill_config"] = asdict(best)
    save("prefill")
    if left(args.budget) > 30:
        tokens = ROTARY_TOKENS if sizes.device == "cuda" else SMOKE["rotary"]
        res["rotary"] = [rotary_row(t, int8, gen, sizes.heads) for t in tokens for int8 in (False, True)]
        save("rotary timing")
    if args.sweep and tuned != cfgs and left(args.budget) > 60:
        res["decode_tuned_config"] = {"fp16": asdict(tuned[False]), "int8": asdict(tuned[True])}
        res["decode_tuned"] = decode_table(tuned, res["copy_gbps"], gen, sizes, args.budget)
        save("decode table (tuned configs)")
    (args.out / "paged_attention.md").write_text(markdown(res))
    save("done")
    print(markdown(res))


if __name__ == "__main__":
    main()
