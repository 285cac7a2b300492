"""Load a model folder: build the decoder on the meta device, then stream safetensors tensors in one at a time.

Peak host memory is the model plus one (fused) tensor, so a 7B bf16 checkpoint never needs twice its size.
No Python file in the folder is ever imported or executed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qwen_awq.errors import CheckpointError, ConfigError
from qwen_awq.models.config import ModelConfig, load_generation_config
from qwen_awq.models.decoder import Decoder
from qwen_awq.models.family import family_of, load_config
from qwen_awq.parallel.sharding import parallelize, shard_config
from qwen_awq.parallel.state import SINGLE, ParallelState
from qwen_awq.quant.formats import PLAIN, after_load, quant_format

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': fp32 on CPU (fast and exact there); on GPU fp16 for AWQ, else the checkpoint's dtype."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        resolved = torch.float16 if cfg.quant else DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if dtype == "auto":
            return torch.float16
        raise ConfigError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use --dtype float16")
    return resolved


class CheckpointReader:
    """Tensor name -> safetensors file, over one file or a sharded set with model.safetensors.index.json."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for path in self._shards():
            for name in self._open(path).keys():
                self.files[name] = path

    def _shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({self.folder / f for f in weight_map.values()})
            for shard in shards:
                if not shard.exists():
                    raise CheckpointError(f"{index} names {shard.name}, which is missing from {self.folder}")
            return shards
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            bins = [p.name for p in self.folder.glob("*.bin")]
            hint = f" (found {', '.join(bins)}: convert them to safetensors)" if bins else ""
            raise CheckpointError(f"no *.safetensors weights in {self.folder}{hint}")
        return shards

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") \
                    from None
        return self._handles[path]

    def slice(self, name: str):
        """safetensors' lazy slice of a tensor: index it to read only that part (tensor-parallel shards)."""
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.folder}")
        return self._open(self.files[name]).get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.folder}")
        try:
            return self._open(self.files[name]).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} (truncated?): {e}") from None


def _load_tensor(reader: CheckpointReader, parts: tuple[str, ...], suffix: str, fuse_dims: dict[str, int]
                 ) -> torch.Tensor:
    tensors = [reader.get(f"{p}.{suffix}") for p in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=fuse_dims[suffix])


def load_weights(model: Decoder, folder: Path, full: ModelConfig | None = None,
                 parallel: ParallelState = SINGLE) -> None:
    """Copy every canonical parameter/buffer of `model` from the checkpoint, checking names and shapes; under
    tensor parallelism (`full`: the whole model's config) only this rank's slice of each tensor is read."""
    from qwen_awq.parallel.shard_loader import read_shard

    reader = CheckpointReader(folder)
    family = family_of(model.cfg)
    modules = family.weights.modules(model.cfg.num_layers)
    fuse_dims = {**PLAIN.fuse_dims, **quant_format(model.cfg.quant).fuse_dims}
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, target in targets.items():
        module, suffix = key.rsplit(".", 1)
        if model.cfg.tie_word_embeddings and module == "lm_head":
            continue
        parts, shard = modules[module], family.shard_of(module) if parallel.parallel else None
        tensor = (_load_tensor(reader, parts, suffix, fuse_dims) if shard is None
                  else read_shard(reader, module, parts, suffix, shard, full or model.cfg, parallel, fuse_dims))
        if tensor.shape != target.shape:
            raise CheckpointError(
                f"{' + '.join(f'{p}.{suffix}' for p in parts)} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)} from config.json"
            )
        with torch.no_grad():
            target.copy_(tensor)


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               model_class: type[Decoder] = Decoder, parallel: ParallelState = SINGLE) -> Decoder:
    """Build the decoder for the folder's config on the meta device, allocate it on `device`, stream weights in.

    `model_class` is Decoder or a subclass (qwen_awq.load passes chat.ChatModel). Under tensor parallelism the
    model is this rank's shard (its cfg has this rank's heads and MLP width) and only its slices are read.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist")
    cfg = load_config(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, cfg, dev)
    with torch.device("meta"):
        model = model_class(shard_config(cfg, parallel), torch_dtype)
        parallelize(model, cfg, parallel)
    model.to_empty(device=dev)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, folder, cfg, parallel)
    after_load(model, quant_format(cfg.quant), dev)
    model.generation_config = load_generation_config(folder).under(family_of(cfg).chat_fallbacks)
    return model.eval().requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
