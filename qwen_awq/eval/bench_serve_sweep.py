"""`qwen-awq bench serve-sweep`: start `qwen-awq serve` (a synthetic model or a folder) in a subprocess on a free
loopback port, wait for /health, run `bench serve`'s load at each concurrency (OpenAI streaming completions, random
prompts of exact length, EOS ignored), stop the server; write JSON, a Markdown table (vLLM benchmark_serving's
metrics) and a PNG of throughput and p99 latency against concurrency. With --offline (a `bench throughput` JSON of
the same model and lengths), also the ratio of the HTTP output throughput at the highest concurrency to the
offline engine's (issue 12's goal: >= 85%).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError
from qwen_awq.eval.bench_report import environment, exit_on_sigterm, md_table, num
from qwen_awq.ports import free_port

HEALTH_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0
WARMUP_REQUESTS = 4
METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E"))


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    """`qwen-awq serve` for this sweep: batch limit = the highest concurrency, context = input + output."""
    source = (["--synthetic", args.synthetic, "--quant", args.quant, "--seed", str(args.seed)]
              if args.synthetic else ["--model", args.model] if args.model else [])
    if args.tokenizer:
        source += ["--tokenizer", args.tokenizer]
    return [sys.executable, "-m", "qwen_awq.cli", "serve", *source, "--device", args.device, "--dtype", args.dtype,
            "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(args.concurrency)),
            "--max-model-len", str(args.input_len + args.output_len), "--no-prefix-caching", *args.server_arg]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> float:
    """Seconds until GET /health answers 200; ConfigError if the server exits or the timeout passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise ConfigError(f"the server exited with status {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(HEALTH_POLL_S)
    raise ConfigError(f"the server did not answer /health within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> int:
    """Ctrl-C for a clean shutdown, then a kill after STOP_TIMEOUT_S; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def offline_ratio(levels: list[dict[str, Any]], offline_path: str, quant: str) -> dict[str, Any]:
    """HTTP output tok/s at the highest concurrency over the offline engine's, from a `bench throughput` JSON."""
    offline = json.loads(Path(offline_path).read_text())
    want = "awq" if quant == "awq" else "plain"
    rows = [r for r in offline["rows"] if r["system"].startswith("qwen-awq") and r["quant"] == want]
    if not rows:
        raise ConfigError(f"{offline_path} has no qwen-awq row with weights {quant!r}")
    top, s = max(levels, key=lambda lv: lv["concurrency"]), offline["settings"]
    same = (s["input_len"], s["output_len"]) == (top["input_len"], top["output_len"])
    return {"concurrency": top["concurrency"], "http_out_tok_per_s": top["output_throughput"],
            "offline_out_tok_per_s": rows[0]["out_tok_per_s"], "offline_num_prompts": s["num_prompts"],
            "ratio": top["output_throughput"] / rows[0]["out_tok_per_s"], "same_lengths": same}


def sweep_markdown(result: dict[str, Any]) -> str:
    rows = []
    for lv in result["levels"]:
        cells = [str(lv["concurrency"]), f"{lv['completed']}/{lv['completed'] + lv['failed']}",
                 num(lv["request_throughput"], ".2f"), num(lv["output_throughput"])]
        for name, _ in METRICS:
            cells.append(" / ".join(num(lv[f"{k}_{name}_ms"]) for k in ("mean", "median", "p99")))
        rows.append(cells)
    env, s = result["env"], result["settings"]
    lines = [f"## Serving: `qwen-awq serve` over HTTP, {s['input_len']} random prompt + {s['output_len']} output "
             f"tokens, OpenAI streaming\n", f"{env['date']}, {env['device']}. Command: `{env['command']}`; server: "
             f"`{' '.join(result['server_command'][3:])}` (ready in {result['server_ready_s']:.1f} s)\n",
             md_table(["concurrency", "ok", "req/s", "out tok/s"] +
                      [f"{title} ms mean / median / p99" for _, title in METRICS], rows)]
    ratio = result.get("offline")
    if ratio:
        lines.append(f"\nHTTP at concurrency {ratio['concurrency']}: {ratio['http_out_tok_per_s']:.0f} out tok/s = "
                     f"{100 * ratio['ratio']:.1f}% of the offline engine's {ratio['offline_out_tok_per_s']:.0f} "
                     f"({ratio['offline_num_prompts']} prompts at once; goal >= 85%)"
                     + ("" if ratio["same_lengths"] else " (lengths differ: not comparable)"))
    return "\n".join(lines)


def plot(levels: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(c, [lv["output_throughput"] for lv in levels], "o-", label="output tok/s")
    left.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="throughput")
    for name, label in METRICS[:3]:
        right.plot(c, [lv[f"p99_{name}_ms"] for lv in levels], "o-", label=f"p99 {label}")
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="p99 latency")
    for ax in (left, right):
        ax.set_xticks(c, [str(v) for v in c])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def warm_up(args: argparse.Namespace) -> float:
    """A few untimed full-length requests at once, so that first-use work (kernel compilation for prefill and
    mixed steps, allocator growth) does not land in the first level's latencies; seconds taken."""
    from qwen_awq.eval.bench_serve import make_prompts, run_level
    from qwen_awq.eval.http_client import request_json

    start = time.perf_counter()
    model = (await request_json(args.url, "GET", "/v1/models"))["data"][0]["id"]
    n = min(WARMUP_REQUESTS, max(args.concurrency))
    prompts = await make_prompts(args.url, {}, n, args.input_len, args.seed - 1)
    await run_level(args.url, model, {}, prompts, min(4, args.output_len), n)
    return time.perf_counter() - start


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from qwen_awq.eval.bench_serve import bench

    port = free_port()
    command = server_command(args, port)
    out = Path(args.out_dir)
    with open(out / "server.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        (out / "server.pid").write_text(f"{proc.pid}\n")  # for a wrapper script, should this process be killed
        try:
            ready = wait_healthy(proc, f"http://127.0.0.1:{port}", args.startup_timeout)
            args.url = f"http://127.0.0.1:{port}"
            warmup_s = asyncio.run(warm_up(args))
            levels = asyncio.run(bench(args))
        finally:
            status = stop(proc)
    settings = {k: getattr(args, k) for k in ("concurrency", "input_len", "output_len", "num_prompts",
                                              "prompts_per_level", "seed", "synthetic", "quant", "model")}
    return {"env": environment(), "settings": settings, "server_command": command, "server_ready_s": ready,
            "warmup_s": warmup_s, "server_exit_status": status, "levels": levels}


def cmd_serve_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()  # a timeout around the sweep still stops the server
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if args.synthetic and not args.tokenizer:
            raise ConfigError("--synthetic needs --tokenizer (the server takes text prompts)")
        result = run_sweep(args)
    if args.offline:
        result["offline"] = offline_ratio(result["levels"], args.offline, result["settings"]["quant"])
    markdown = sweep_markdown(result)
    (out / "serve_sweep.json").write_text(json.dumps(result, indent=1))
    (out / "serve_sweep.md").write_text(markdown + "\n")
    s = result["settings"]
    plot(result["levels"], out / "serve_sweep.png", f"qwen-awq serve, {result['env']['device']}, "
         f"{s['synthetic'] or s['model']} {s['quant']}, {s['input_len']}+{s['output_len']} tokens")
    print(markdown, flush=True)
    return 0 if all(lv["failed"] == 0 for lv in result["levels"]) else 1


def register_serve_sweep(bench_sub: Any) -> None:
    from qwen_awq.cli_args import add_model_args
    from qwen_awq.eval.bench_serve import add_load_args
    from qwen_awq.eval.synthetic import add_synthetic_args

    p = bench_sub.add_parser("serve-sweep", help="start a server, load it at several concurrencies, plot",
                             description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_synthetic_args(p)
    add_load_args(p, concurrency=[1, 16, 64, 128], input_len=512, output_len=256, seed=False)
    p.add_argument("--out-dir", required=True, help="folder for serve_sweep.json/.md/.png and server.log")
    p.add_argument("--offline", default=None, help="a `bench throughput --json-out` file to compare with")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds the server may take to start")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more `qwen-awq serve` argument, e.g. --server-arg=--enforce-eager (repeat for several)")
    p.add_argument("--from-json", default=None, help="redo the table and plot from a serve_sweep.json, run nothing")
    p.set_defaults(func=cmd_serve_sweep, api_key=None)
