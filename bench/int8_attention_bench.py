"""int8-KV paged decode attention against fp16-KV in one run (issue 12's row): the NVRTC int8 kernel's candidates,
the Triton int8 kernel and the Triton fp16 kernel at Qwen-7B's heads, timed as attention_bench.py times them.

    python3 bench/int8_attention_bench.py --out DIR [--shapes 64x1024 128x768 1x2048 1x8192]

Per shape: ms, GB/s on the bytes read (codes + (scale, zero) pairs, or fp16 values) and % of the copy bandwidth
measured in the same run; the int8 rows' speed over fp16 KV. The first shape times every CUDA candidate, the others
the fastest of them; each CUDA row's output is checked against the Triton int8 kernel's on the same pool.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_bench import DecodeSetup, copy_bandwidth, gbps  # noqa: E402

from qwen_awq.kernels.paged_attention import FP16_DEFAULT, INT8_DEFAULT, paged_decode_attention_triton  # noqa: E402
from qwen_awq.kernels.paged_attention_cuda import CudaDecodeConfig, paged_decode_int8_cuda  # noqa: E402

HEADS = 32  # Qwen-7B: 32 heads of 128, no GQA
# (unroll, warps, prefetch, min_blocks): the fastest of the 2026-12-04 sweeps
# (bench/results/int8_attention_H200_2026-12-04.md), their neighbours, and register caps that trade a few spills
# for more resident warps.
CANDIDATES = [CudaDecodeConfig(unroll=u, warps=w, prefetch=pf, min_blocks=mb) for u, w, pf, mb in (
    (8, 1, True, 1), (8, 1, True, 9), (8, 1, True, 10), (8, 2, True, 1), (8, 2, True, 5), (4, 1, True, 1),
    (4, 1, True, 16), (4, 2, False, 1), (8, 2, False, 1), (16, 1, False, 1), (16, 1, False, 9))]


def agreement(setup: DecodeSetup, cfg: CudaDecodeConfig) -> float:
    """Max |cuda - triton| / max |triton| on the first pool copy (both int8 kernels, same codes)."""
    kv = setup.kvs[0]
    ref = paged_decode_attention_triton(setup.q, kv, setup.tables, setup.lens, 0.088, INT8_DEFAULT).float()
    out = paged_decode_int8_cuda(setup.q, kv, setup.tables, setup.lens, 0.088, cfg).float()
    return float((out - ref).abs().max() / ref.abs().max())


def shape_rows(batch: int, ctx: int, cfgs: list[CudaDecodeConfig], copy: float, gen: torch.Generator) -> list[dict]:
    """The Triton fp16 and int8 kernels, then each CUDA candidate, on one shape; speeds relative to fp16 KV."""
    rows = []
    for int8, kernels in ((False, [("triton fp16", FP16_DEFAULT)]),
                          (True, [("triton int8", INT8_DEFAULT), *(("cuda int8", c) for c in cfgs)])):
        setup = DecodeSetup(batch, ctx, int8, gen, HEADS)
        for name, cfg in kernels:
            ms = setup.kernel(cfg)
            row = {"batch": batch, "ctx": ctx, "kernel": name, "int8": int8, "config": repr(cfg), "ms": ms,
                   "gbps": gbps(setup.bytes, ms), "pct_copy": 100 * gbps(setup.bytes, ms) / copy}
            if isinstance(cfg, CudaDecodeConfig):
                row["max_rel_diff_vs_triton_int8"] = agreement(setup, cfg)
            rows.append(row)
        del setup
    for r in rows:
        r["speed_vs_fp16"] = rows[0]["ms"] / r["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["64x1024", "128x768", "1x2048", "1x8192"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": datetime.date.today().isoformat(), "command": "python3 " + " ".join(sys.argv)},
           "copy_gbps": copy_bandwidth("cuda"), "rows": []}
    cfgs = CANDIDATES
    for i, shape in enumerate(args.shapes):
        batch, ctx = map(int, shape.split("x"))
        rows = shape_rows(batch, ctx, cfgs, res["copy_gbps"], gen)
        res["rows"] += rows
        if i == 0:  # later shapes: the three fastest candidates and the default
            ranked = sorted((r for r in rows if r["kernel"] == "cuda int8"), key=lambda r: r["ms"])
            best = [c for r in ranked[:3] for c in CANDIDATES if repr(c) == r["config"]]
            cfgs = list(dict.fromkeys(best + [CudaDecodeConfig()]))
            split_rows = shape_rows(batch, ctx, [replace(best[0], splits=n) for n in (2, 4)], res["copy_gbps"], gen)
            res["rows"] += split_rows[2:]  # the CUDA rows; fp16 and Triton int8 were timed again
        (args.out / "int8_attention.json").write_text(json.dumps(res, indent=1))
    print(f"{res['env']['device']}, copy {res['copy_gbps']:.0f} GB/s; {res['env']['command']}")
    print("| batch x ctx | kernel | config | us | GB/s | % copy | vs fp16 KV | max rel diff vs Triton int8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["rows"]:
        diff = r.get("max_rel_diff_vs_triton_int8")
        print(f"| {r['batch']}x{r['ctx']} | {r['kernel']} | {r['config']} | {1e3 * r['ms']:.1f} | {r['gbps']:.0f} | "
              f"{r['pct_copy']:.1f} | {r['speed_vs_fp16']:.2f}x | {'-' if diff is None else f'{diff:.2e}'} |")


if __name__ == "__main__":
    main()
