"""Gather bench/gpu_final.sh's section results into the few files that come back from the GPU machine.

    python3 bench/gpu_final_collect.py --work WORK --out OUT [--print]

OUT/results.json: {"sections": [...], "<section>": its JSON, ...}; OUT/summary.md: the key figures against the
issues' goals, the sections' times, then every section's own Markdown; OUT/serve_sweep.png. Runs after every
section (so a later hang still leaves the earlier results) and reads partial JSON too.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

FILES = {  # section -> (JSON, Markdown) under WORK
    "copy": ("copy.json", None), "decode": ("decode.json", "decode.md"),
    "throughput": ("throughput.json", "throughput.md"), "throughput8": ("throughput8.json", "throughput8.md"),
    "attention": ("attention/paged_attention.json", "attention/paged_attention.md"),
    "kernels": ("kernels.json", "kernels.md"), "serve": ("serve/serve_sweep.json", "serve/serve_sweep.md"),
    "coldstart": ("cold_start.json", "cold_start.md"), "quantize": ("quantize.json", "quantize.md"),
    "profile8k": ("profile8k.json", "profile8k.md"), "steps": ("steps/step_profile.json", None),
    "gemvsweep": ("gemv_candidates.json", None), "mmatiles": ("mma_tiles.json", None),
}


def read_sections(work: Path) -> list[dict[str, Any]]:
    path, rows = work / "sections.tsv", []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, took, est, limit = line.split("\t")
        status = "ok" if rc == "0" else "skipped" if rc == "skipped" else "TIMEOUT" if rc in ("124", "137") \
            else f"failed (rc {rc})"
        rows.append({"section": name, "status": status, "seconds": int(took), "estimate_s": int(est),
                     "limit_s": int(limit)})
    return rows


def load(work: Path) -> tuple[dict[str, Any], list[str]]:
    results: dict[str, Any] = {"sections": read_sections(work)}
    markdown = []
    for name, (js, md) in FILES.items():
        if (work / js).is_file():
            results[name] = json.loads((work / js).read_text())
        if md and (work / md).is_file():
            markdown.append((work / md).read_text())
    for name in ("gemvsweep", "mmatiles"):  # kernel experiments: what they printed
        if (work / f"{name}.out").is_file():
            markdown.append(f"## {name}\n\n```\n{(work / f'{name}.out').read_text()[-6000:]}\n```")
    printed = work / "steps.out"  # bench/gpu_step_profile.py: its printed per-step summary and kernel tables
    if printed.is_file():
        markdown.append(f"## Decode steps by phase and kernel (bench/gpu_step_profile.py)\n\n```\n"
                        f"{printed.read_text()[-12000:]}\n```")
    for name, script in (("engine", "gpu_engine_check.py"), ("fastpath", "gpu_fastpath_check.py")):
        fast = work / f"{name}.json"  # bench/<script> --out: its JSON; its table is what it printed
        if fast.is_file():
            try:
                results[name] = json.loads(fast.read_text())
            except ValueError:
                results[name] = {"unreadable": fast.read_text()[:20000]}
        printed = work / f"{name}.out"
        if printed.is_file():
            tail = "\n".join(printed.read_text().splitlines()[-60:])
            markdown.insert(0, f"## GPU check bench/{script} (its output)\n\n```\n{tail}\n```")
    return results, markdown


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _row(rows: list | None, **match: Any) -> dict | None:
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def key_figures(r: dict[str, Any]) -> list[list[str]]:
    """(figure, measured, goal) from whatever sections finished."""
    dec, thr, srv = r.get("decode", {}), r.get("throughput", {}), r.get("serve", {})
    awq1, fp1 = _row(dec.get("rows"), quant="awq", batch=1), _row(dec.get("rows"), quant="plain", batch=1)
    awq32, fp32 = _row(dec.get("rows"), quant="awq", batch=32), _row(dec.get("rows"), quant="plain", batch=32)
    p_awq, p_fp = _row(dec.get("profile"), quant="awq", new_tokens=2048), _row(dec.get("profile"), quant="plain",
                                                                               new_tokens=2048)
    drop = _get(p_awq, "tok_per_s") and _get(awq1, "tok_per_s") and p_awq["tok_per_s"] / awq1["tok_per_s"]
    floor_drop = (_get(p_awq, "floor_tok_per_s") and _get(awq1, "floor_tok_per_s")
                  and p_awq["floor_tok_per_s"] / awq1["floor_tok_per_s"])
    mem, top = dec.get("memory_check") or {}, max(srv.get("levels") or [{}], key=lambda lv: lv.get("concurrency", 0))
    t_awq = _row(thr.get("rows"), quant="awq")
    cold, warm = _get(r, "coldstart", "child", "total_s"), _get(r, "coldstart", "child_warm", "total_s")
    q, m1 = r.get("quantize", {}), [x for x in _get(r, "kernels", "rows") or [] if x.get("M") == 1]
    layer = {k: sum(x.get(k) or 0 for x in m1) for k in ("ours", "cublas_fp16", "floor_us")} if m1 else {}
    att = _row(_get(r, "attention", "decode"), batch=64, ctx=1024, kv="fp16")
    return [
        ["copy bandwidth (GB/s)", _f(_get(r, "copy", "copy_bytes_per_s") and r["copy"]["copy_bytes_per_s"] / 1e9,
                                     ".0f"), ""],
        ["AWQ b1 256 tok/s (vs int4 peer; % floor)", f"{_f(_get(awq1, 'tok_per_s'), '.1f')} "
         f"({_f(_get(awq1, 'vs_int4_peer'), '.2f')}x; {_f(_get(awq1, 'pct_floor'), '.0f')}%)", ">= 1.5x peer"],
        ["fp16 b1 256 tok/s (% floor)", f"{_f(_get(fp1, 'tok_per_s'), '.1f')} ({_f(_get(fp1, 'pct_floor'), '.0f')}%)",
         ">= 75% of floor"],
        ["AWQ / fp16 at batch 32", _f(_get(awq32, "vs_our_plain"), ".2f") + "x"
         f" ({_f(_get(awq32, 'tok_per_s'), '.0f')} vs {_f(_get(fp32, 'tok_per_s'), '.0f')})", ">= 1.5x"],
        ["profile b1 2048 tokens: AWQ / fp16 tok/s", f"{_f(_get(p_awq, 'tok_per_s'), '.1f')} / "
         f"{_f(_get(p_fp, 'tok_per_s'), '.1f')}", ""],
        ["AWQ b1 2048 vs 256 tok/s (the floors' ratio)", f"{_f(drop, '.3f')} ({_f(floor_drop, '.3f')})",
         "drop <= the KV bytes'"],
        ["peak memory AWQ b1 2048 <= weights + KV + 0.5 GB", f"{mem.get('ok')} (margin "
         f"{_f(mem.get('margin_bytes') and mem['margin_bytes'] / 1e9, '.2f')} GB)", "True"],
        ["offline 128 x (512+256) AWQ out tok/s (vs HF; % floor)", f"{_f(_get(t_awq, 'out_tok_per_s'), '.0f')} "
         f"({_f(_get(t_awq, 'vs_hf'), '.1f')}x; {_f(_get(t_awq, 'pct_floor'), '.0f')}%)", ">= 5000 and >= 12x HF"],
        ["HTTP c=128 out tok/s / offline; p99 ITL ms", f"{_f(top.get('output_throughput'), '.0f')} / "
         f"{_f(_get(srv, 'offline', 'ratio') and srv['offline']['ratio'] * 100, '.0f')}%; "
         f"{_f(top.get('p99_itl_ms'), '.1f')}", ">= 85%"],
        ["W4A16 linears of one layer at M = 1, us (fp16 cuBLAS; floor)", f"{_f(layer.get('ours'), '.1f')} "
         f"({_f(layer.get('cublas_fp16'), '.1f')}; {_f(layer.get('floor_us'), '.1f')}; {len(m1)} of 4 shapes)",
         ">= 3x faster than cuBLAS"],
        ["paged decode attention 64 x 1024 fp16 (% copy)", _f(_get(att, "pct_copy"), ".1f"), ">= 70%"],
        ["cold start 7B AWQ -> first token (s; empty / warm kernel cache)", f"{_f(cold, '.1f')} / "
         f"{_f(warm, '.1f')}", "< 60"],
        ["quantize 7B (s; measured subset / extrapolated)", f"{_f(q.get('wall_s'), '.0f')} / "
         f"{_f(_get(q, 'extrapolated', 'wall_s'), '.0f')}", "< 600"],
    ]


def summary(results: dict[str, Any], markdown: list[str]) -> str:
    figures = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in key_figures(results))
    sections = "\n".join(f"| {s['section']} | {s['status']} | {s['seconds']} | {s['estimate_s']} | {s['limit_s']} |"
                         for s in results["sections"])
    return (f"# GPU final run\n\n| figure | measured | goal |\n| --- | --- | --- |\n{figures}\n\n"
            f"| section | status | seconds | estimate | limit |\n| --- | --- | --- | --- | --- |\n{sections}\n\n"
            + "\n\n".join(markdown))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--print", action="store_true", help="print the key figures and the sections' table")
    args = p.parse_args()
    results, markdown = load(args.work)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = summary(results, markdown)
    (args.out / "summary.md").write_text(text)
    png = args.work / "serve" / "serve_sweep.png"
    if png.is_file():
        shutil.copyfile(png, args.out / "serve_sweep.png")
    if args.print:
        print(text.split("\n\n", 3)[1] + "\n\n" + text.split("\n\n", 3)[2])


if __name__ == "__main__":
    main()
