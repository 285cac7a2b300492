"""`qwen-awq bench quantize`: the AWQ quantizer at a real model's scale (issue 10 item 5). Writes a random bf16
folder of the model's shapes (--layers N: only N blocks of the same widths) and a random-word calibration file,
runs `qwen-awq quantize` in this process with --samples x --seqlen calibration tokens, and reports wall time, peak
GPU memory against one block's weights + its activations + 2 GB, and the time per stage (load, calibration, each
block's search / clip / pack, export). With --layers below the model's depth, also the full run extrapolated from
the per-block time (labelled as such). Speed does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError
from qwen_awq.eval import peers
from qwen_awq.eval.bench_report import GB, StageTimer, add_output_args, environment, md_table, write_outputs

HEADROOM = 2 * GB  # issue 10: peak under one block's weights + its activations + 2 GB
TOP_STAGES = ("load model", "calibration tokens", "blocks", "export")


def calibration_file(path: Path, samples: int, seqlen: int, seed: int) -> Path:
    """Blank-line separated documents of random words, each well under seqlen tokens (a word is 1-2 Qwen
    tokens), enough of them for samples x seqlen tokens."""
    from qwen_awq.eval.http_client import WORDS

    rng, words = random.Random(seed), max(1, seqlen // 3)
    docs = math.ceil(samples * seqlen / words * 1.1) + 1
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(docs)) + "\n")
    return path


def stage_targets() -> dict[str, tuple[Any, str]]:
    import qwen_awq.quant.awq as awq
    import qwen_awq.quant.quantize as quantize

    return {"load model": (quantize, "load_model"), "calibration tokens": (quantize, "load_calibration_for"),
            "blocks": (awq, "awq_block"), "block: record inputs": (awq, "record_block"),
            "block: scale search": (awq, "search_scale"), "block: clip search": (awq, "clip_block"),
            "block: pack": (awq, "quantize_linears"), "export": (quantize, "export_awq")}


def param_count(name: str, layers: int | None) -> int:
    import torch

    from qwen_awq.eval.synthetic import synthetic_config
    from qwen_awq.models.decoder import Decoder

    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(synthetic_config(name, None, layers)).parameters())


def memory_bound(cfg: Any, samples: int, seqlen: int) -> dict[str, int]:
    """One block's fp16 weights, its input and output hidden states and the recorded inputs of its Linears."""
    d, tokens = cfg.hidden_size, samples * seqlen
    block = (d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * cfg.intermediate_size) * 2
    acts = tokens * 2 * (2 * d + d + cfg.q_size + d + cfg.intermediate_size)  # x, out; qkv, o, gate_up, down in
    return {"block_weights_bytes": block, "activations_bytes": acts, "bound_bytes": block + acts + int(HEADROOM)}


def extrapolate(result: dict[str, Any], name: str, layers: int, full_layers: int) -> dict[str, Any]:
    """The full model's time from this subset: blocks x per-block mean; load and export scaled by parameters."""
    totals, per_block = result["stages_s"], result["per_block_s"]
    scale = param_count(name, None) / param_count(name, layers)
    other = result["wall_s"] - sum(totals.get(s, 0.0) for s in TOP_STAGES)
    est = (sum(per_block) / len(per_block) * full_layers + (totals.get("load model", 0) + totals.get("export", 0))
           * scale + totals.get("calibration tokens", 0) + other)
    return {"label": f"EXTRAPOLATED from {layers} of {full_layers} blocks (not measured)", "full_layers": full_layers,
            "per_block_mean_s": sum(per_block) / len(per_block), "param_scale": scale, "wall_s": est}


def quantize_markdown(r: dict[str, Any]) -> str:
    env, wall = r["env"], r["wall_s"]
    rows = [[k, f"{v:.2f}", f"{100 * v / wall:.0f}%"] for k, v in r["stages_s"].items()]
    mem = r["memory"]
    peak = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / GB:.2f} GB"
    lines = [f"## Quantizer at scale: {r['model']}, {r['layers']} of {r['full_layers']} blocks, "
             f"{r['samples']} x {r['seqlen']} calibration tokens\n",
             f"{env['date']}, {env['device']}. Command: `{env['command']}`. Source folder written in "
             f"{r['write_s']:.1f} s.\n", f"Wall time of `qwen-awq quantize`: **{wall:.1f} s**; peak GPU memory {peak}"
             f" (bound: one block's weights {mem['block_weights_bytes'] / GB:.2f} GB + activations "
             f"{mem['activations_bytes'] / GB:.2f} GB + 2 GB = {mem['bound_bytes'] / GB:.2f} GB: "
             f"{'-' if mem['ok'] is None else 'holds' if mem['ok'] else 'EXCEEDED'}; the peak includes "
             f"{(mem['held_before_bytes'] or 0) / GB:.2f} GB held before the run, the bound is judged without).\n",
             md_table(["stage (block: parts of blocks)", "seconds", "share of wall"], rows),
             f"\nPer block: {', '.join(f'{t:.2f}' for t in r['per_block_s'])} s."]
    if r.get("extrapolated"):
        e = r["extrapolated"]
        lines.append(f"\n{e['label']}: {e['per_block_mean_s']:.2f} s per block x {e['full_layers']}, load and "
                     f"export x {e['param_scale']:.1f} (parameters) -> **~{e['wall_s']:.0f} s** for the full model "
                     "(goal < 600 s).")
    return "\n".join(lines)


def run_quantize(src: Path, dst: Path, calib: Path, args: argparse.Namespace, device: str) -> tuple[float, StageTimer]:
    """`qwen-awq quantize ...` in this process (its own parser and command), under the stage timer."""
    from qwen_awq.cli_args import Parser
    from qwen_awq.cli_tools import register_tools

    argv = ["quantize", "--model", str(src), "--output", str(dst), "--calib", str(calib), "--samples",
            str(args.samples), "--seqlen", str(args.seqlen), "--device", device, "--overwrite"]
    parser = Parser(prog="qwen-awq")
    register_tools(parser.add_subparsers(dest="command", required=True))
    command = parser.parse_args(argv + (["--no-clip"] if args.no_clip else []))
    timer = StageTimer()
    with timer.timing(stage_targets()):
        start = time.perf_counter()
        command.func(command)
        wall = time.perf_counter() - start
    return wall, timer


def cmd_bench_quantize(args: argparse.Namespace) -> int:
    import torch

    from qwen_awq.eval.bench_cold_start import qwen_vocab
    from qwen_awq.eval.bench_engine import free_device_memory
    from qwen_awq.eval.synthetic import SYNTHETIC, synthetic_config, write_synthetic_folder

    if args.synthetic is None or args.tokenizer is None:
        raise ConfigError("bench quantize needs --synthetic NAME and --tokenizer (calibration is tokenized)")
    full_layers = SYNTHETIC[args.synthetic]["num_hidden_layers"]
    layers = args.layers or full_layers
    work = Path(args.dir or tempfile.mkdtemp(prefix="qwen-awq-quant-"))
    device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    try:
        start = time.perf_counter()
        src = write_synthetic_folder(work / "src-bf16", args.synthetic, quant=False, seed=args.seed, device=device,
                                     vocab=qwen_vocab(args.tokenizer), layers=layers)
        write_s = time.perf_counter() - start
        free_device_memory()
        calib = calibration_file(work / "calib.txt", args.samples, args.seqlen, args.seed)
        dev = torch.device(device)
        peers.reset_peak(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None  # in the peak, not the run's
        wall, timer = run_quantize(src, work / "awq", calib, args, device)
        peak = peers.peak_bytes(dev)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mem = memory_bound(synthetic_config(args.synthetic, None), args.samples, args.seqlen)
    mem["held_before_bytes"] = before
    mem["ok"] = None if peak is None else peak - before <= mem["bound_bytes"]
    result = {"env": environment(), "model": args.synthetic, "layers": layers, "full_layers": full_layers,
              "samples": args.samples, "seqlen": args.seqlen, "write_s": write_s, "wall_s": wall,
              "peak_gpu_bytes": peak, "memory": mem, "stages_s": timer.totals(),
              "per_block_s": timer.calls.get("blocks", []), "timer_missing": timer.missing}
    if layers < full_layers and result["per_block_s"]:
        result["extrapolated"] = extrapolate(result, args.synthetic, layers, full_layers)
    write_outputs(result, quantize_markdown(result), args.json_out, args.md_out)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register_quantize(bench_sub: Any) -> None:
    from qwen_awq.eval.synthetic import add_synthetic_args

    p = bench_sub.add_parser("quantize", help="time `qwen-awq quantize` on a random model of real shapes",
                             description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="where blocks are searched: cpu, cuda or auto (default: auto)")
    add_synthetic_args(p, quant="none")
    p.add_argument("--layers", type=int, default=None, help="write only this many blocks (same widths)")
    p.add_argument("--samples", type=int, default=128, help="calibration blocks (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration block (default 512)")
    p.add_argument("--no-clip", action="store_true", help="skip the clip search (as quantize --no-clip)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    add_output_args(p)
    p.set_defaults(func=cmd_bench_quantize)
