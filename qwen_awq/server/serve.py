"""`qwen-awq serve`: load a model, start the engine and the HTTP server (loopback by default), print URLs."""
from __future__ import annotations

import argparse
import sys

from qwen_awq.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is an explicit choice (--host 0.0.0.0)
DEFAULT_PORT = 8000  # vLLM's default port


def register_serve(subparsers) -> None:
    from qwen_awq.cli_args import add_config_args, add_model_args, parse_bytes
    from qwen_awq.engine.llm_engine import EngineConfig

    p = subparsers.add_parser("serve", help="serve the model over HTTP (OpenAI, TGI and vLLM APIs, web chat)",
                              description="Serve the model: OpenAI-compatible /v1 API, TGI and vLLM routes, "
                              "Prometheus /metrics and a web chat page at /.")
    add_model_args(p)
    from qwen_awq.eval.synthetic import add_synthetic_args  # --synthetic: random weights, for the benchmarks

    add_synthetic_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health and the page")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients send (default: the folder name)")
    add_config_args(p.add_argument_group("engine"), EngineConfig)
    from qwen_awq.parallel.state import ParallelConfig

    add_config_args(p.add_argument_group("parallelism"), ParallelConfig)
    p.add_argument("--max-body-bytes", type=parse_bytes, default=None,
                   help="largest request body (default: 64 bytes per context token, at least 1MiB)")
    p.add_argument("--no-special-tokens-in-prompts", action="store_true",
                   help="encode special-token text in raw prompts (/v1/completions, TGI, vLLM /generate, "
                   "/tokenize) as plain text; chat message contents are always plain text")
    p.set_defaults(func=cmd_serve)


def engine_config(args: argparse.Namespace):
    from qwen_awq.cli_args import config_kwargs
    from qwen_awq.engine.llm_engine import EngineConfig

    return EngineConfig(**config_kwargs(EngineConfig, args))


def served_name(args: argparse.Namespace) -> str:
    from pathlib import Path

    if args.served_model_name:
        return args.served_model_name
    if getattr(args, "synthetic", None):
        return f"{args.synthetic}-{args.quant}-synthetic"
    if not args.model:
        return "SmolLM2-135M-Instruct"  # the bundled default model
    path = Path(args.model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name  # a folder name may contain dots (Qwen-1.8B)


def urls(host: str, port: int) -> tuple[str, str]:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    return f"{base}/", f"{base}/v1"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qwen_awq.server.app import create_app

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    config = engine_config(args)
    engine = serving_engine(args, config)
    print(engine.engine.kv_report, file=sys.stderr)
    app = create_app(engine, served_name(args), api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     special_tokens_in_prompts=not args.no_special_tokens_in_prompts)
    page, api = urls(args.host, args.port)
    print(f"Web chat: {page}\nAPI:      {api} (OpenAI), {page} (TGI), {page}generate (vLLM)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serving_engine(args: argparse.Namespace, config):
    """The AsyncEngine the routes use: one engine (tensor-parallel under --tensor-parallel-size N), or N
    replicas behind a router under --data-parallel-size N (parallel/data_parallel.py)."""
    from qwen_awq.cli_args import parallel_config
    from qwen_awq.engine.async_engine import AsyncEngine
    from qwen_awq.errors import ParallelError
    from qwen_awq.eval.synthetic import model_from_args
    from qwen_awq.parallel.data_parallel import data_parallel_engine
    from qwen_awq.parallel.launch import engine_for

    parallel = parallel_config(args)
    if parallel.data_parallel_size > 1:
        if parallel.tensor_parallel_size > 1:
            raise ParallelError("--data-parallel-size with --tensor-parallel-size > 1 is not supported yet: "
                                "run one server per group of GPUs behind a load balancer")
        return data_parallel_engine(args, config, parallel.data_parallel_size)
    model, tokenizer = model_from_args(args, need_tokenizer=True)
    return AsyncEngine(engine_for(model, tokenizer, config))
