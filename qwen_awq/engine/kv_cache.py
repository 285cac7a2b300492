"""The paged KV pool and its plain-PyTorch paged attention (the reference and CPU path).

The pool holds (layers, num_blocks, block_size, kv_heads, head_dim) keys and values, in the model dtype or, as an
option, int8 with Qwen's per-chunk asymmetric scheme (use_cache_quantization): each (sequence, head) of a written
chunk gets scale = (max - min) / 255 and zero = -min / scale; values dequantize as scale * (q - zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_awq.errors import ConfigError
from qwen_awq.models.attention import sdpa
from qwen_awq.models.config import ModelConfig

INT8_LEVELS = 255  # uint8 codes 0..255 (Qwen's quantize_cache_v uses qmin 0, qmax 255)


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, int8: bool) -> int:
    per_value = 1 if int8 else torch.tensor([], dtype=dtype).element_size()
    values = cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * per_value
    scales = cfg.num_layers * 2 * block_size * cfg.num_kv_heads * 2 * 4 if int8 else 0  # fp32 scale + zero
    return values + scales


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, int8: bool = False) -> None:
        if num_blocks < 1:
            raise ConfigError("the KV cache budget is too small for a single block; raise --kv-cache-memory")
        self.num_blocks, self.block_size, self.dtype, self.int8 = num_blocks, block_size, dtype, int8
        shape = (cfg.num_layers, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)  # slots flattened
        store = torch.uint8 if int8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        if int8:  # (layers, slots, kv_heads, 2): scale and zero per slot and head
            self.k_sz = torch.zeros((*shape[:3], 2), dtype=torch.float32, device=device)
            self.v_sz = torch.zeros((*shape[:3], 2), dtype=torch.float32, device=device)


@dataclass
class PagedMetadata:
    """Per-step tensors of the flattened batch: B sequences, T tokens, each sequence's chunk is contiguous."""

    slot_mapping: torch.Tensor  # (T,) long: where each new token's K/V goes
    block_tables: torch.Tensor  # (B, max_blocks) long, padded with block 0
    context_lens: torch.Tensor  # (B,) long: tokens in the cache after this step
    query_lens: torch.Tensor  # (B,) long: new tokens this step
    token_seq: torch.Tensor  # (T,) long: which sequence each token belongs to
    token_col: torch.Tensor  # (T,) long: index of each token within its sequence's chunk
    max_query_len: int


def quantize_chunk(x: torch.Tensor, token_seq: torch.Tensor, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, Hkv, D) -> uint8 codes (T, Hkv, D) and per-token (scale, zero) (T, Hkv, 2) shared by its chunk."""
    xf = x.float()
    idx = token_seq[:, None].expand(-1, x.shape[1])  # (T, Hkv)
    init = xf.new_full((num_seqs, x.shape[1]), float("inf"))
    lo = init.scatter_reduce(0, idx, xf.amin(-1), "amin")  # (B, Hkv)
    hi = (-init).scatter_reduce(0, idx, xf.amax(-1), "amax")
    scale = ((hi - lo) / INT8_LEVELS).clamp_min(1e-8)
    zero = -lo / scale
    sz = torch.stack([scale, zero], dim=-1)[token_seq]  # (T, Hkv, 2)
    codes = torch.round(xf / sz[..., :1] + sz[..., 1:]).clamp(0, INT8_LEVELS).to(torch.uint8)
    return codes, sz


def dequantize(codes: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (sz[..., :1] * (codes.float() - sz[..., 1:])).to(dtype)


class PagedAttention:
    """The attention backend for one engine step: writes new K/V into the pool, attends over each block table."""

    def __init__(self, pool: KVPool, meta: PagedMetadata) -> None:
        self.pool, self.meta = pool, meta
        self._slots: torch.Tensor | None = None  # (B, L) gather slots, the same for every layer
        self._mask: torch.Tensor | None = None  # (B, 1, max_q, L) causal + length mask, likewise

    def _layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Computed on the first layer and reused by the others (fewer kernels per decode step)."""
        if self._slots is None:
            m, bs = self.meta, self.pool.block_size
            self._slots = (m.block_tables[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)
            cols = torch.arange(m.max_query_len, device=device)
            qpos = (m.context_lens - m.query_lens)[:, None] + cols[None, :]  # (B, max_q) absolute positions
            kpos = torch.arange(self._slots.shape[1], device=device)
            mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < m.context_lens[:, None, None])
            self._mask = mask[:, None]
        return self._slots, self._mask

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pool, slots = self.pool, self.meta.slot_mapping
        if pool.int8:
            b = self.meta.context_lens.shape[0]
            for cache, sz_cache, x in ((pool.k, pool.k_sz, k), (pool.v, pool.v_sz, v)):
                codes, sz = quantize_chunk(x, self.meta.token_seq, b)
                cache[layer].index_copy_(0, slots, codes)
                sz_cache[layer].index_copy_(0, slots, sz)
        else:
            pool.k[layer].index_copy_(0, slots, k.to(pool.dtype))
            pool.v[layer].index_copy_(0, slots, v.to(pool.dtype))

    def _gather(self, layer: int, cache: torch.Tensor, sz: torch.Tensor | None, dtype: torch.dtype,
                slots: torch.Tensor) -> torch.Tensor:
        """(B, max_blocks * block_size, Hkv, D) keys or values of every sequence, in block-table order."""
        x = cache[layer][slots]
        return dequantize(x, sz[layer][slots], dtype) if sz is not None else x.to(dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        m, pool = self.meta, self.pool
        self._write(layer, k, v)
        slots, mask = self._layout(q.device)
        keys = self._gather(layer, pool.k, pool.k_sz if pool.int8 else None, q.dtype, slots)  # (B, L, Hkv, D)
        values = self._gather(layer, pool.v, pool.v_sz if pool.int8 else None, q.dtype, slots)
        qp = q.new_zeros((keys.shape[0], m.max_query_len, *q.shape[1:]))  # (B, max_q, H, D)
        qp[m.token_seq, m.token_col] = q
        out = sdpa(qp, keys, values, scale, mask, causal=False)  # (B, max_q, H, D)
        return out[m.token_seq, m.token_col]
