"""Oracles for generation tests: a plain greedy loop that recomputes the whole sequence with the dense forward
every step (it shares no step code with the engine: no KV cache, scheduler, runner, sampler or output tracker,
only the decoder's layers), and a contiguous KV cache for checking incremental decoding against transformers."""
from __future__ import annotations

import torch

from qwen_awq.models.attention import DenseAttention, ForwardBatch, RotatingAttention, sdpa


@torch.inference_mode()
def dense_greedy(model, prompt: list[int], steps: int, vocab: int | None = None, stop_ids: frozenset[int] = frozenset(),
                 repetition_penalty: float = 1.0) -> list[int]:
    """Up to `steps` greedy tokens after `prompt`, ending at the first id in stop_ids (which is kept).

    The NTK alpha is fixed by the prompt's length for the whole sequence, as Qwen's cached generation does.
    `vocab` limits the argmax to real token ids (the tokenizer's); `repetition_penalty` is HF's, over every id
    seen so far.
    """
    device = model.device
    alpha = model.prefill_alpha(len(prompt))
    ids = list(prompt)
    new: list[int] = []
    for _ in range(steps):
        n = len(ids)
        fb = ForwardBatch(positions=torch.arange(n, device=device), ntk_alpha=torch.full((n,), alpha, device=device),
                          attn=DenseAttention(1, n))
        hidden = model.forward_tokens(torch.tensor(ids, device=device), fb)[-1]  # (hidden,)
        logits = model.compute_logits(hidden)[:vocab].double().cpu()  # (V,)
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        token = int(logits.argmax())
        ids.append(token)
        new.append(token)
        if token in stop_ids:
            break
    return new


class ContiguousKVCache(RotatingAttention):
    """K/V for `batch` sequences that advance together: (layers, batch, max_len, Hkv, D) each.

    Call `step(num_new)` before each forward over `batch * num_new` tokens and `advance()` after it.
    Keys are stored after rotation, as in the reference implementation.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # tokens already cached per sequence
        self.num_new = 0
        self.mask: torch.Tensor | None = None  # (S, L), the same for every layer of a step

    def step(self, num_new: int) -> None:
        end = self.length + num_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.num_new = num_new
        # new token i (absolute position length + i) sees keys 0..length + i
        rows = torch.arange(self.length, end, device=self.k.device)[:, None]
        self.mask = torch.arange(end, device=self.k.device)[None, :] <= rows

    def advance(self) -> None:
        self.length += self.num_new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, s, start = self.batch, self.num_new, self.length
        end = start + s
        self.k[layer, :, start:end] = k.view(b, s, *k.shape[1:])
        self.v[layer, :, start:end] = v.view(b, s, *v.shape[1:])
        keys, values = self.k[layer, :, :end], self.v[layer, :, :end]  # (B, L, Hkv, D)
        out = sdpa(q.view(b, s, *q.shape[1:]), keys, values, scale, self.mask, causal=False)
        return out.reshape(q.shape)


class Int8ContiguousKVCache(ContiguousKVCache):
    """Qwen's int8 KV scheme over the contiguous cache, derived from its description: each written chunk gets one
    range per (sequence, head), scale = (max - min) / 255, zero = -min / scale, codes round(x / scale + zero)
    clamped to 0..255; stored here already dequantized, scale * (code - zero)."""

    @staticmethod
    def _roundtrip(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (B, S, Hkv, D)
        lo, hi = xf.amin(dim=(1, 3), keepdim=True), xf.amax(dim=(1, 3), keepdim=True)  # (B, 1, Hkv, 1)
        scale = ((hi - lo) / 255).clamp_min(1e-8)
        zero = -lo / scale
        codes = torch.round(xf / scale + zero).clamp(0, 255)
        return (scale * (codes - zero)).to(x.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, s = self.batch, self.num_new
        k = self._roundtrip(k.view(b, s, *k.shape[1:])).reshape(k.shape)
        v = self._roundtrip(v.view(b, s, *v.shape[1:])).reshape(v.shape)
        return super().attend(layer, q, k, v, scale)


@torch.inference_mode()
def int8_cache_greedy(model, prompt: list[int], steps: int, vocab: int | None = None) -> list[int]:
    """Greedy tokens with Qwen's int8 KV cache: the prompt written as one chunk, then one token per step."""
    cfg, device = model.cfg, model.device
    cache = Int8ContiguousKVCache(cfg.num_layers, 1, len(prompt) + steps, cfg.num_kv_heads, cfg.head_dim,
                                  model.dtype, device)
    alpha, ids, new = model.prefill_alpha(len(prompt)), list(prompt), []
    for _ in range(steps):
        n = len(ids) - cache.length
        cache.step(n)
        fb = ForwardBatch(positions=torch.arange(cache.length, len(ids), device=device),
                          ntk_alpha=torch.full((n,), alpha, device=device), attn=cache)
        hidden = model.forward_tokens(torch.tensor(ids[cache.length:], device=device), fb)[-1]
        cache.advance()
        new.append(int(model.compute_logits(hidden)[:vocab].argmax()))
        ids.append(new[-1])
    return new
