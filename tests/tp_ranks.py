"""Per-rank bodies of the tensor-parallel tests, importable by the processes torch.multiprocessing spawns."""
from __future__ import annotations

from pathlib import Path

import torch

from qwen_awq.models.loader import load_model
from qwen_awq.parallel.state import destroy_group, init_group


def shard_logits(rank: int, world: int, port: int, folder: str, ids: torch.Tensor, out: str) -> None:
    """Load rank `rank`'s shard, run the dense forward on `ids`, save the logits and the shard's sizes."""
    torch.set_num_threads(1)
    state = init_group(rank, world, port, torch.device("cpu"))
    try:
        model = load_model(folder, dtype="float32", device="cpu", parallel=state)
        with torch.inference_mode():
            logits = model(ids)
        numel = sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t is not None)
        torch.save({"logits": logits, "numel": numel, "kv_heads": model.cfg.num_kv_heads},
                   Path(out) / f"rank{rank}.pt")
    finally:
        destroy_group(state)
