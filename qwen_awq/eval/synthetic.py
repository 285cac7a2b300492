"""Random-weight models of real checkpoint shapes, for speed work (spec: performance.md; speed ignores values).

`build_synthetic` makes Qwen-7B-Chat's exact decoder (fp16 or AWQ W4 g128) directly on the device, without the
disk; `load_synthetic` is the same, ready to run (the format's post-load hooks applied, as the loader does), and
`model_from_args` serves the CLI's `--synthetic` flags (bench, serve). `write_synthetic_folder` writes the model as
a checkpoint folder in the published layout (Qwen v1 names, AutoAWQ GEMM tensors), for cold-start and quantizer
timings. `layers` keeps the widths and cuts the depth (a faithful subset of a run too long for its budget).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qwen_awq.errors import ConfigError
from qwen_awq.models.config import ModelConfig, QuantConfig, load_generation_config
from qwen_awq.models.decoder import Decoder
from qwen_awq.models.family import family_of, load_config
from qwen_awq.models.shards import MAX_SHARD_BYTES, build_atomically, write_sharded
from qwen_awq.quant import export
from qwen_awq.quant.formats import after_load, quant_format

# Qwen/Qwen-7B-Chat's config.json (spec: qwen.md), fp16/bf16 flags resolved at build time.
QWEN_7B = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 4096, "intermediate_size": 22016,
    "kv_channels": 128, "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 8192,
    "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": 151936, "no_bias": True,
    "tie_word_embeddings": False, "bf16": True, "eos_token_id": 151643,
}
# The same layout at toy size (hidden a multiple of the group size), so tests and CPU runs take seconds.
QWEN_TINY = QWEN_7B | {"hidden_size": 128, "intermediate_size": 512, "kv_channels": 32, "num_attention_heads": 4,
                       "num_hidden_layers": 2}
SYNTHETIC = {"qwen-7b": QWEN_7B, "qwen-tiny": QWEN_TINY}
AWQ_G128 = QuantConfig(bits=4, group_size=128)  # TheBloke/Qwen-7B-Chat-AWQ's settings
# Qwen-7B-Chat's generation_config.json (spec: qwen.md "generation_config.json defaults").
QWEN_CHAT_GENERATION = {"do_sample": True, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1,
                        "max_new_tokens": 512, "max_window_size": 6144, "eos_token_id": 151643,
                        "pad_token_id": 151643, "chat_format": "chatml"}


def config_json(name: str, quant: QuantConfig | None, layers: int | None = None) -> dict:
    if name not in SYNTHETIC:
        raise ConfigError(f"unknown synthetic model {name!r}; choose one of {', '.join(SYNTHETIC)}")
    cfg = dict(SYNTHETIC[name])
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise ConfigError(f"--layers must be in 1..{cfg['num_hidden_layers']} for {name}, got {layers}")
        cfg["num_hidden_layers"] = layers
    if quant is not None:  # AutoAWQ exports declare fp16 activations
        cfg |= {"bf16": False, "fp16": True, "quantization_config": quant.to_json()}
    return cfg


def synthetic_config(name: str, quant: QuantConfig | None, layers: int | None = None) -> ModelConfig:
    """The ModelConfig the config reader makes of this model's config.json (it stays the only key reader)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config_json(name, quant, layers)))
        return load_config(d)


def chat_generation_defaults():
    """Qwen-7B-Chat's generation defaults, read by the config reader as the loader reads a folder's."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "generation_config.json").write_text(json.dumps(QWEN_CHAT_GENERATION))
        return load_generation_config(d)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every tensor in place: int32 AWQ words uniformly, scales in a small positive range, the rest N(0, 0.02).

    Norm weights stay near 1 so activations keep a realistic scale through 32 layers.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.int32:
            t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=gen, device=t.device, dtype=torch.int64))
        elif name.endswith("scales"):
            t.uniform_(0.001, 0.01, generator=gen)
        elif name.endswith("norm.weight") or "layernorm" in name:
            t.normal_(1.0, 0.02, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)


def build_synthetic(name: str = "qwen-7b", quant: bool = True, dtype: torch.dtype = torch.float16,
                    device: str | torch.device = "cuda", seed: int = 0, layers: int | None = None) -> Decoder:
    """A random-weight decoder of `name`'s exact shapes, allocated and filled on `device` (no disk, no host copy),
    in the checkpoint's own tensors (AutoAWQ layout): what a folder would hold, before any post-load repack."""
    cfg = synthetic_config(name, AWQ_G128 if quant else None, layers)
    with torch.device(device):
        model = Decoder(cfg, dtype)
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


def prepare(model: Decoder) -> Decoder:
    """What the loader does once the weights are in (models/loader.load_model): the weight format's post-load
    hooks (AWQ: repack for the kernels on a GPU, dequantize once on the CPU). The one place where an in-memory model
    becomes ready to run; a further inference-preparation step belongs here too."""
    after_load(model, quant_format(model.cfg.quant), model.device)
    return model


def load_synthetic(name: str = "qwen-7b", quant: bool = True, dtype: str | torch.dtype = "auto",
                   device: str | torch.device = "auto", seed: int = 0, layers: int | None = None) -> Decoder:
    """`build_synthetic` with the loader's device and dtype rules, prepared to run, with Qwen-Chat's defaults.

    dtype "auto" on a GPU is fp16 for the plain model too (the loader would pick the checkpoint's bf16): the
    benchmarks' "fp16" rows and HF's fp16 peer then run the same dtype."""
    from qwen_awq.models.loader import resolve_device, resolve_dtype

    dev = resolve_device(device)
    if dtype == "auto" and dev.type == "cuda":
        dtype = torch.float16
    torch_dtype = resolve_dtype(dtype, synthetic_config(name, AWQ_G128 if quant else None, layers), dev)
    model = prepare(build_synthetic(name, quant, torch_dtype, dev, seed, layers))
    model.generation_config = chat_generation_defaults().under(family_of(model.cfg).chat_fallbacks)
    return model


def tokenizer_from(path: str | Path):
    """A qwen.tiktoken file, or any model folder with a tokenizer (tokenizer/load_tokenizer's rules)."""
    from qwen_awq.tokenizer import QwenTokenizer, load_tokenizer

    path = Path(path)
    if path.is_file():
        return QwenTokenizer(path)
    if path.is_dir():
        return load_tokenizer(path)
    raise ConfigError(f"--tokenizer {path} does not exist: pass a qwen.tiktoken file or a model folder")


def add_synthetic_args(p: argparse.ArgumentParser, quant: str = "one") -> None:
    """--synthetic NAME (instead of --model), --tokenizer, --seed, and --quant: one choice, "many" (one pass each)
    or "none" (a command whose weights are fixed)."""
    p.add_argument("--synthetic", choices=tuple(SYNTHETIC), default=None,
                   help="random weights of this model's exact shapes, built on the device (no disk; speed only)")
    if quant != "none":
        many = quant == "many"
        p.add_argument("--quant", choices=("awq", "none"), nargs="+" if many else None,
                       default=["awq"] if many else "awq",
                       help="with --synthetic: AWQ W4 g128 or plain fp16 weights" +
                       (" (several: one pass each; default: awq)" if many else " (default: awq)"))
    p.add_argument("--tokenizer", default=None,
                   help="with --synthetic: a qwen.tiktoken file or a folder with a tokenizer (default: none, ids only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size (the benchmarks: each row's engine runs on N ranks)."""
    from qwen_awq.cli_args import add_config_args
    from qwen_awq.parallel.state import ParallelConfig

    add_config_args(p, ParallelConfig, only=("tensor_parallel_size",))


def model_from_args(args: argparse.Namespace, quant: str | None = None, need_tokenizer: bool = False
                    ) -> tuple[Any, Any]:
    """(model, tokenizer or None) from --synthetic/--quant/--tokenizer, else --model as `qwen_awq.load` reads it;
    under --tensor-parallel-size N, rank 0's shard with its workers started (parallel/launch.py)."""
    from qwen_awq.cli_args import parallel_config

    world = parallel_config(args).tensor_parallel_size
    if world > 1:
        if need_tokenizer and args.synthetic is not None and args.tokenizer is None:
            raise ConfigError("--synthetic needs --tokenizer here (a qwen.tiktoken file or a model folder)")
        tokenizer = tokenizer_from(args.tokenizer) if getattr(args, "tokenizer", None) is not None else None
        return parallel_model_from_args(args, quant, tokenizer, world)
    if args.synthetic is None:
        from qwen_awq.cli_args import load_for_cli

        return load_for_cli(args)
    if need_tokenizer and args.tokenizer is None:
        raise ConfigError("--synthetic needs --tokenizer here (a qwen.tiktoken file or a model folder)")
    tokenizer = tokenizer_from(args.tokenizer) if args.tokenizer is not None else None
    model = load_synthetic(args.synthetic, (quant or args.quant) == "awq", args.dtype, args.device, args.seed)
    return model, tokenizer


def checkpoint_tensors(model: Decoder) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, host tensor) pairs in the family's published names: AutoAWQ's for a quantized model
    (the exporter's own writer), else the plain weights in the model dtype, split back into fused parts."""
    cfg = model.cfg
    if cfg.quant is not None:
        yield from export.checkpoint_tensors(model)
        return
    for canonical, parts in family_of(cfg).weights.modules(cfg.num_layers).items():
        module = model.get_submodule(canonical)
        for suffix, tensor in module.named_parameters(recurse=False):
            sizes = export.split_sizes(cfg, canonical, len(parts)) if len(parts) > 1 else [tensor.shape[0]]
            for part, piece in zip(parts, tensor.detach().split(sizes, dim=0), strict=True):
                yield f"{part}.{suffix}", piece.contiguous().cpu()


def write_synthetic_folder(folder: str | Path, name: str = "qwen-7b", quant: bool = True, seed: int = 0,
                           device: str | torch.device = "cuda", vocab: Path | None = None,
                           layers: int | None = None) -> Path:
    """Write a random model folder (config, generation_config, qwen.tiktoken, sharded safetensors) atomically.

    The whole model is built on `device` first (Qwen-7B: 5.9 GB in AWQ, 15 GB in bf16); tensors then go to the
    host one at a time as the shard writer asks for them, so host memory stays at one shard.
    """
    dst = Path(folder)
    q = AWQ_G128 if quant else None
    dtype = torch.float16 if quant else torch.bfloat16
    model = build_synthetic(name, quant, dtype, device, seed, layers)
    with build_atomically(dst) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_json(name, q, layers), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(QWEN_CHAT_GENERATION, indent=2))
        if q is not None:
            (tmp / "quant_config.json").write_text(json.dumps(
                {"zero_point": True, "q_group_size": q.group_size, "w_bit": q.bits, "version": "GEMM"}))
        if vocab is not None:
            shutil.copyfile(vocab, tmp / "qwen.tiktoken")
        write_sharded(checkpoint_tensors(model), tmp, MAX_SHARD_BYTES)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    return dst


def parallel_model_from_args(args: argparse.Namespace, quant: str | None, tokenizer: Any, world: int
                             ) -> tuple[Any, Any]:
    """eval.synthetic.model_from_args under --tensor-parallel-size: workers load from a folder, so --synthetic
    first writes its random model once into the cache (same name, quant and seed: the same weights)."""
    from qwen_awq.assets import cache_dir
    from qwen_awq.chat import ChatModel
    from qwen_awq.loading import resolve_model_path
    from qwen_awq.models.loader import resolve_device
    from qwen_awq.parallel.launch import start_tensor_parallel
    from qwen_awq.tokenizer import load_tokenizer

    if args.synthetic is None:
        folder = resolve_model_path(args.model)
        model, _ = start_tensor_parallel(folder, args.dtype, args.device, world, ChatModel)
        return model, load_tokenizer(folder)
    awq = (quant or args.quant) == "awq"
    folder = cache_dir() / "synthetic" / f"{args.synthetic}-{'awq' if awq else 'plain'}-seed{args.seed}"
    if not (folder / "config.json").exists():
        write_synthetic_folder(folder, args.synthetic, awq, args.seed, device=resolve_device(args.device))
    model, _ = start_tensor_parallel(folder, args.dtype, args.device, world)
    return model, tokenizer
