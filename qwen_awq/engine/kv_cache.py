"""The paged KV pool and the engine's attention backend over it: rotary + LogN + KV write in one kernel, then paged
decode attention (all-decode steps) or chunked-prefill attention (any chunk longer than one token), read straight
from the block tables. The kernels' dispatchers run Triton on CUDA (and under TRITON_INTERPRET=1), else their
plain-PyTorch references (kernels/paged_reference.py), so the engine has one code path everywhere.

The pool holds (layers, num_blocks, block_size, kv_heads, head_dim) keys and values, in the model dtype or, as an
option, int8 with Qwen's per-chunk asymmetric scheme (use_cache_quantization): each (sequence, head) of a written
chunk gets scale = (max - min) / 255 and zero = -min / scale; values dequantize as scale * (q - zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_awq.errors import ConfigError
from qwen_awq.kernels.paged_attention import paged_decode_attention
from qwen_awq.kernels.paged_prefill import paged_prefill_attention
from qwen_awq.kernels.paged_reference import PagedKV
from qwen_awq.kernels.rotary_kv import rotary_kv_write
from qwen_awq.models.config import ModelConfig


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
    block_tables: torch.Tensor  # (B, max_blocks) long; columns past a sequence's blocks are never read
    context_lens: torch.Tensor  # (B,) long: tokens in the cache after this step
    cu_seqlens: torch.Tensor  # (B + 1,) long: sequence b's chunk is tokens cu_seqlens[b]:cu_seqlens[b + 1]
    token_seq: torch.Tensor  # (T,) long: which sequence each token belongs to
    max_query_len: int  # host int: 1 makes the step a decode step (the graph-capturable path)


class PagedAttention:
    """The attention backend for one engine step over the pool (see the module docstring)."""

    def __init__(self, pool: KVPool, meta: PagedMetadata) -> None:
        self.pool, self.meta = pool, meta

    def attend_qkv(self, layer: int, qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   logn: torch.Tensor | None, scale: float) -> torch.Tensor:
        """qkv (T, H + 2 Hkv, D) -> (T, H, D); this step's K/V are in the pool before attention reads it."""
        m, kv = self.meta, PagedKV.from_pool(self.pool, layer)
        # int8: Qwen quantizes each written chunk with one range per (sequence, head); a one-token chunk's range is
        # its own, which the kernel's per-token path computes without the range-reduction pass
        chunked = kv.int8 and m.max_query_len > 1
        q = rotary_kv_write(qkv.flatten(1), cos, sin, logn, m.slot_mapping, kv, num_heads,
                            m.token_seq if chunked else None, m.context_lens.shape[0])  # (T, H, D)
        if m.max_query_len == 1:
            return paged_decode_attention(q, kv, m.block_tables, m.context_lens, scale)
        return paged_prefill_attention(q, kv, m.block_tables, m.cu_seqlens, m.context_lens, m.max_query_len, scale)
