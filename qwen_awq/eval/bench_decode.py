"""`qwen-awq bench decode`: decode tok/s of our engine (CUDA graphs on a GPU) against the same-run peers and the
byte floor, one table; the model card's profile table (1-token context, 2048 / 8192 new tokens: tok/s and peak
memory, fp16 vs AWQ); and the peak-memory check (AWQ, batch 1, 2048 new tokens <= weights + KV used + 0.5 GB).

Every run: a 1-token prompt per sequence, exactly N new tokens (EOS ignored, greedy), median of --runs after a
warm-up, the KV cache sized to the run (eval/bench_engine.sized_engine), peak memory reset per row. Peers (--peers): the
gpt-fast-style torch-int4 decoder compiled with CUDA graphs (eval/peers.StaticPeer; on a CPU the dense one,
eager) and HF transformers' eager `generate` (fp16 on a GPU, fp32 on a CPU), in the same process.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.eval import peers
from qwen_awq.eval.bench_engine import free_device_memory, kv_bytes_for, run_requests, sized_engine, weights_label
from qwen_awq.eval.bench_report import GB, add_output_args, checkpoint, environment, write_outputs
from qwen_awq.eval.bench_tables import decode_markdown
from qwen_awq.eval.synthetic import add_parallel_args, add_synthetic_args, model_from_args

WARMUP_TOKENS = 8  # one short run per engine first: lazy inits and allocator growth are not timed
MEMORY_SLACK = 0.5 * GB  # issue 10: peak <= weights + KV actually used + 0.5 GB
FIRST_ID = 100  # prompt token of row i is FIRST_ID + i: distinct sequences, ids valid in every vocabulary


def weight_bytes_held(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors as they sit in memory (after any repack), each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def engine_decode(model: Any, tokenizer: Any, batch: int, new_tokens: int, runs: int) -> dict[str, Any]:
    """One row: our engine at `batch` sequences of 1 + new_tokens tokens."""
    device = model.device
    peers.reset_peak(device)
    engine = sized_engine(model, tokenizer, batch, 1 + new_tokens)
    prompts = [[FIRST_ID + i] for i in range(batch)]
    warm = SamplingParams(temperature=0.0, max_tokens=min(WARMUP_TOKENS, new_tokens), ignore_eos=True)
    run_requests(engine, prompts, warm)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    timed = [run_requests(engine, prompts, params) for _ in range(runs)]
    timed.sort(key=lambda r: r["seconds"])
    median = timed[len(timed) // 2]
    if any(r["tokens"] != batch * new_tokens for r in timed):
        raise RuntimeError(f"asked for {batch} x {new_tokens} tokens, got {[r['tokens'] for r in timed]}")
    graphs = engine.runner.graphs
    dtype = str(model.dtype).removeprefix("torch.")
    row = {"system": "qwen-awq", "quant": "awq" if model.cfg.quant else "plain", "batch": batch,
           "new_tokens": new_tokens, "runs": runs, "median_s": median["seconds"], "tokens": median["tokens"],
           "tok_per_s": median["tokens"] / median["seconds"], "peak_gpu_bytes": peers.peak_bytes(device),
           "kv_pool_bytes": kv_bytes_for(model, batch, 1 + new_tokens), "cuda_graphs": graphs is not None,
           "dtype": dtype, "weights": weights_label(model)}
    del engine, graphs
    free_device_memory()
    return row


def memory_check(row: dict[str, Any], weights: int, block_size: int, per_block: int) -> dict[str, Any]:
    """Peak of a batch-1 row against weights + the KV blocks its sequence held + 0.5 GB. The sequence caches
    new_tokens tokens (its 1-token prompt and all but the last sampled token)."""
    kv_used = -(-row["new_tokens"] // block_size) * per_block
    bound = weights + kv_used + MEMORY_SLACK
    peak = row["peak_gpu_bytes"]
    return {"quant": row["quant"], "batch": row["batch"], "new_tokens": row["new_tokens"], "weights_bytes": weights,
            "kv_used_bytes": kv_used, "slack_bytes": MEMORY_SLACK, "bound_bytes": bound, "peak_gpu_bytes": peak,
            "margin_bytes": None if peak is None else bound - peak, "ok": None if peak is None else peak <= bound}


def our_rows(args: argparse.Namespace, quant: str | None) -> tuple[list[dict], list[dict], dict | None, Any]:
    """Main rows, profile rows and the memory check of one model; returns its config for the peers."""
    from qwen_awq.engine.kv_cache import bytes_per_block
    from qwen_awq.engine.llm_engine import EngineConfig

    model, tokenizer = model_from_args(args, quant)
    rows = [engine_decode(model, tokenizer, b, n, args.runs) for n in args.tokens for b in args.batch]
    for r in rows:
        print(f"  {r['quant']} batch {r['batch']} x {r['new_tokens']}: {r['tok_per_s']:.1f} tok/s", flush=True)
    profile = [engine_decode(model, tokenizer, 1, n, args.profile_runs) for n in args.profile or ()]
    for r in profile:
        print(f"  {r['quant']} profile {r['new_tokens']}: {r['tok_per_s']:.1f} tok/s", flush=True)
    check = None
    batch1 = [r for r in profile + rows if r["batch"] == 1 and r["quant"] == "awq"]
    if batch1:
        target = next((r for r in batch1 if r["new_tokens"] == 2048), max(batch1, key=lambda r: r["new_tokens"]))
        block = EngineConfig.block_size
        check = memory_check(target, weight_bytes_held(model), block,
                             bytes_per_block(model.cfg, block, model.dtype, False))
    cfg = model.cfg
    del model
    free_device_memory()
    return rows, profile, check, cfg


def int4_peer_row(cfg: Any, batch: int, new_tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # tinygemm runs bf16
    linear = peers.int4_linear(device, args.seed) if cuda else peers.dense_linear(dtype, device)
    peer = peers.StaticPeer(cfg, linear, batch, new_tokens, dtype, device)
    r = peers.time_peer(peer, batch, new_tokens, args.runs, compile=cuda)
    del peer
    free_device_memory()
    return r | {"peer": "int4", "system": "int4 peer (tinygemm, compiled)" if cuda else "dense peer (eager, CPU)",
                "quant": "int4" if cuda else "plain", "weights": "int4 g128, bfloat16" if cuda else "float32",
                "tok_per_s": r["out_tok_per_s"]}


def hf_peer_rows(cfg: Any, grid: list[tuple[int, int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hf = peers.hf_model(cfg, device, dtype, 1 + max(args.tokens))
    rows = [peers.hf_time(hf, b, 1, n, seed=args.seed) for n, b in grid]
    del hf
    free_device_memory()
    return [r | {"peer": "hf", "system": "HF transformers eager generate", "quant": "plain",
                 "weights": str(dtype).removeprefix("torch."), "tok_per_s": r["out_tok_per_s"]} for r in rows]


def peer_rows(args: argparse.Namespace, cfg: Any, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The int4 peer (dense and eager on a CPU) and HF eager generate, at every (tokens, peer batch). A peer that
    fails is recorded in result["peer_errors"] and the others still run (our rows are the main result)."""
    plain = dataclasses.replace(cfg, quant=None)
    grid = [(n, b) for n in args.tokens for b in args.batch if b in (args.peer_batch or args.batch)]
    rows: list[dict[str, Any]] = []
    jobs = [("int4", lambda n=n, b=b: [int4_peer_row(plain, b, n, args)]) for n, b in grid if "int4" in args.peers]
    if "hf" in args.peers:
        jobs.append(("hf", lambda: hf_peer_rows(plain, grid, args)))
    for name, job in jobs:
        try:
            rows += job()
        except Exception as e:  # an OOM or a compile failure of a peer must not lose our rows
            result.setdefault("peer_errors", []).append(f"{name}: {type(e).__name__}: {e}"[:2000])
            free_device_memory()
        checkpoint(result | {"peers": rows}, args.json_out)
    for r in rows:
        if r["tokens"] != r["batch"] * r["new_tokens"]:
            raise RuntimeError(f"{r['system']} made {r['tokens']} tokens, not {r['batch']} x {r['new_tokens']}")
    return rows


def add_ratios(result: dict[str, Any], cfg: Any) -> None:
    """Floors and same-run ratios on every row (keyed by batch and new tokens)."""
    bw = result.get("copy_bytes_per_s")

    def key(r: dict) -> tuple[int, int]:
        return r["batch"], r["new_tokens"]

    int4 = {key(r): r for r in result["peers"] if r["peer"] == "int4"}
    hf = {key(r): r for r in result["peers"] if r["peer"] == "hf"}
    plain = {key(r): r for r in result["rows"] + result["profile"] if r["quant"] == "plain"}
    for r in result["rows"] + result["profile"] + result["peers"]:
        w4 = r["quant"] in ("awq", "int4")
        r["floor_tok_per_s"] = None if bw is None else peers.decode_floor_tok_per_s(
            cfg, w4, r["batch"], 1, r["new_tokens"], bw)
        r["pct_floor"] = None if bw is None else 100 * r["tok_per_s"] / r["floor_tok_per_s"]
        if r["system"] == "qwen-awq":
            for name, table in (("vs_int4_peer", int4), ("vs_hf", hf), ("vs_our_plain", plain)):
                other = table.get(key(r))
                r[name] = r["tok_per_s"] / other["tok_per_s"] if other and other is not r else None


def cmd_bench_decode(args: argparse.Namespace) -> int:
    _check_args(args)
    result: dict[str, Any] = {"env": environment(), "rows": [], "profile": [], "peers": [], "memory_check": None}
    if torch.cuda.is_available():
        result["copy_bytes_per_s"] = peers.copy_bandwidth()
    for quant in (args.quant if args.synthetic else [None]):
        rows, profile, check, cfg = our_rows(args, quant)
        result["rows"] += rows
        result["profile"] += profile
        result["memory_check"] = check or result["memory_check"]
        checkpoint(result, args.json_out)
    if args.peers:
        result["peers"] = peer_rows(args, cfg, result)
    add_ratios(result, cfg)
    write_outputs(result, decode_markdown(result), args.json_out, args.md_out)
    check = result["memory_check"]
    return 1 if check is not None and check["ok"] is False else 0


def register_decode(bench_sub: Any) -> None:
    from qwen_awq.cli_args import add_model_args

    d = bench_sub.add_parser("decode", help="decode tok/s vs the same-run peers and the byte floor (1-token prompt)",
                             description=__doc__.split("\n\n")[0])
    add_model_args(d)
    add_synthetic_args(d, quant="many")
    add_parallel_args(d)
    d.add_argument("--tokens", type=int, nargs="+", default=[256], help="new tokens per run (default 256)")
    d.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences decoded together (default 1)")
    d.add_argument("--runs", type=int, default=3, help="timed runs per row; the median is reported (default 3)")
    d.add_argument("--peers", nargs="*", choices=("int4", "hf"), default=None,
                   help="also run the peers: int4 (gpt-fast-style, torch tinygemm, compiled), hf (HF eager "
                   "generate); the bare flag runs both")
    d.add_argument("--peer-batch", type=int, nargs="+", default=None,
                   help="batches at which the peers run (default: every --batch)")
    d.add_argument("--profile", type=int, nargs="*", default=None,
                   help="the model card's profile rows at these new-token counts (bare flag: 2048 8192)")
    d.add_argument("--profile-runs", type=int, default=1, help="timed runs per profile row (default 1)")
    add_output_args(d)
    d.set_defaults(func=cmd_bench_decode)


def _check_args(args: argparse.Namespace) -> None:
    from qwen_awq.errors import ConfigError

    if args.profile == []:
        args.profile = [2048, 8192]
    if args.peers == []:
        args.peers = ["int4", "hf"]
    counts = args.tokens + args.batch + (args.profile or []) + [args.runs, args.profile_runs]
    if min(counts) < 1:
        raise ConfigError("--tokens, --batch, --profile, --runs and --profile-runs must be >= 1")
