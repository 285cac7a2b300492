"""Write a quantized decoder as an AutoAWQ "GEMM" checkpoint folder under the original checkpoint names.

The folder is built in a temporary sibling and renamed into place at the end: a failure leaves nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qwen_awq.errors import CheckpointError, ConfigError
from qwen_awq.models.config import ModelConfig, QuantConfig, read_json
from qwen_awq.models.decoder import Decoder
from qwen_awq.models.family import family_of, load_config
from qwen_awq.models.shards import MAX_SHARD_BYTES, build_atomically, write_sharded
from qwen_awq.quant.formats import AWQ
from qwen_awq.quant.groups import fused_rows
from qwen_awq.quant.packing import PACK_FACTOR

# Files a model folder needs besides its weights: tokenizers (Qwen v1's tiktoken vocabulary or HF files),
# generation defaults, the chat template, licenses, and the remote code transformers loads by auto_map.
COPY_NAMES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja", "chat_template.json",
    "LICENSE", "NOTICE",
})
COPY_SUFFIXES = (".tiktoken", ".py")


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse to write over the source or over an existing non-empty folder (unless overwrite)."""
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"--output {dst} is the source model folder; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"--output {dst} exists and is not a folder; remove it or choose another path")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConfigError(f"--output {dst} exists and is not empty; remove it or pass overwrite")


def split_sizes(cfg: ModelConfig, canonical: str, n_parts: int) -> list[int]:
    """Output sizes of the checkpoint Linears fused into one canonical Linear (Llama q/k/v, gate/up)."""
    name = canonical.split(".", 2)[-1]  # "layers.3.attn.qkv_proj" -> "attn.qkv_proj"
    parts = list(fused_rows(cfg)[name].values())
    if len(parts) != n_parts:
        raise CheckpointError(f"{canonical} fuses {n_parts} checkpoint Linears, expected {len(parts)}")
    return [hi - lo for lo, hi in parts]


def _split(tensor: torch.Tensor, suffix: str, sizes: list[int]) -> list[torch.Tensor]:
    if suffix in ("qweight", "qzeros"):  # packed 8 output columns per int32 word
        if any(size % PACK_FACTOR for size in sizes):
            raise CheckpointError(f"AWQ packing needs fused parts with multiples of 8 outputs, got {sizes}")
        sizes = [size // PACK_FACTOR for size in sizes]
    return list(tensor.split(sizes, dim=AWQ.fuse_dims[suffix]))


def checkpoint_tensors(model: Decoder) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs: AWQ tensors of block Linears, everything else in fp16."""
    cfg = model.cfg
    for canonical, parts in family_of(cfg).weights.modules(cfg.num_layers).items():
        if canonical == "lm_head" and cfg.tie_word_embeddings:
            continue  # tied: the checkpoint holds only the embedding, as transformers saves it
        module = model.get_submodule(canonical)
        if isinstance(module, nn.Linear) and canonical.startswith("layers."):
            raise CheckpointError(f"{canonical} is not quantized; run the AWQ or RTN quantizer first")
        for suffix, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            tensor = tensor.detach().cpu()
            if tensor.dtype.is_floating_point:
                tensor = tensor.half()  # fp16 as AutoAWQ writes (embeddings, norms, scales, bias)
            if len(parts) == 1:
                yield f"{parts[0]}.{suffix}", tensor.contiguous()
                continue
            pieces = _split(tensor, suffix, split_sizes(cfg, canonical, len(parts)))
            for part, piece in zip(parts, pieces, strict=True):
                yield f"{part}.{suffix}", piece.clone()  # own storage: safetensors refuses shared storage


def write_configs(src: Path, folder: Path, group_size: int) -> None:
    """config.json = the source's keys + quantization_config; quant_config.json as AutoAWQ writes it."""
    quant = QuantConfig(group_size=group_size)
    # the non-quantized tensors are written in fp16 and AWQ kernels run fp16 activations: say so, as AutoAWQ
    # does (vLLM refuses an AWQ checkpoint whose dtype resolves to float32), in the family's own keys
    dtype = family_of(load_config(src)).fp16_config
    config = read_json(src / "config.json") | dtype | {"quantization_config": quant.to_json()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    autoawq = {"zero_point": quant.zero_point, "q_group_size": group_size, "w_bit": quant.bits,
               "version": "GEMM"}
    (folder / "quant_config.json").write_text(json.dumps(autoawq, indent=2) + "\n")


def copy_side_files(src: Path, folder: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file() and (path.name in COPY_NAMES or path.suffix in COPY_SUFFIXES):
            shutil.copy2(path, folder / path.name)


def export_awq(model: Decoder, src: Path, dst: Path, group_size: int, max_shard_size: int = MAX_SHARD_BYTES,
               overwrite: bool = False) -> Path:
    """Write the quantized `model` (loaded from `src`) as an AutoAWQ GEMM folder at `dst`; return dst."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    with build_atomically(dst) as tmp:
        write_sharded(checkpoint_tensors(model), tmp, max_shard_size)
        write_configs(src, tmp, group_size)
        copy_side_files(src, tmp)
        _replace(tmp, dst)
    return dst


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished folder into place; an existing one (checked by check_destination) goes only after."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
