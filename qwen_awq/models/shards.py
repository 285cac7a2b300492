"""Write model folders the way Hugging Face lays them out: sharded safetensors plus their index, built in a
temporary sibling folder that the caller moves into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 << 30  # 2 GiB per safetensors shard keeps RAM bounded for 7B-class files
METADATA = {"format": "pt"}  # as transformers' save_pretrained writes


def write_sharded(named_tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus model.safetensors.index.json.

    Greedy, in the given order: a new shard starts when the next tensor would pass max_bytes; only the shard
    being filled is held in memory.
    """
    shard: dict[str, torch.Tensor] = {}
    size, saved = 0, []
    for name, tensor in named_tensors:
        if shard and size + tensor.nbytes > max_bytes:
            saved.append(_save_shard(shard, folder, len(saved)))
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    if not saved:
        save_file(shard, str(folder / WEIGHTS_FILE), metadata=METADATA)
        return
    saved.append(_save_shard(shard, folder, len(saved)))
    _write_index(folder, saved)


def _save_shard(shard: dict[str, torch.Tensor], folder: Path, index: int) -> tuple[Path, dict[str, int]]:
    """Save under a provisional name (the shard count is not known yet); return it with tensor sizes."""
    path = folder / f"shard-{index}.safetensors"
    save_file(shard, str(path), metadata=METADATA)
    return path, {name: t.nbytes for name, t in shard.items()}


def _write_index(folder: Path, saved: list[tuple[Path, dict[str, int]]]) -> None:
    """Rename shards to HF's model-0000i-of-0000n.safetensors and write the index that maps names to them."""
    weight_map: dict[str, str] = {}
    for i, (path, sizes) in enumerate(saved, start=1):
        final = f"model-{i:05d}-of-{len(saved):05d}.safetensors"
        os.replace(path, folder / final)
        weight_map |= dict.fromkeys(sizes, final)
    total = sum(n for _, sizes in saved for n in sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def build_atomically(dst: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dst` to fill and then move onto `dst` (with os.replace, which is
    atomic: readers see no folder or a whole one). Whatever is left of it at exit, on failure too, is removed.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should read like any other
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone once moved into place
