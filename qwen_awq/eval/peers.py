"""Peers that the GPU benchmarks run in the same process as our engine (spec: performance.md, "How to measure").

`StaticPeer` is a gpt-fast-style decoder written here: a static KV cache, the whole decode step under
torch.compile(mode="reduce-overhead") (CUDA graphs), and, as the int4 peer, torch's built-in tinygemm kernel
`torch._weight_int4pack_mm` (bf16, group 128) for every block Linear. `hf_model` / `hf_time` time HF transformers'
eager `generate` on Qwen2ForCausalLM at Qwen-7B's sizes (Qwen v1 itself needs a folder's remote code, which we never
run; Qwen2 with MHA and a q/k/v bias computes the same thing). Weights are random: speed does not depend on values.
The byte floors (`weight_bytes`, `decode_bytes`: weights once per step plus every cached K/V) are divided by
`copy_bandwidth`, measured in the same run.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwen_awq.engine.kv_cache import bytes_per_block
from qwen_awq.models.config import ModelConfig

INNER_K_TILES = 8  # tinygemm's widest K tiling (gpt-fast's default for int4)
INT4_GROUP = 128  # the group size every int4 peer uses, as TheBloke's AWQ checkpoint


class Int4Linear(nn.Module):
    """y = x @ W^T through tinygemm, W random 4-bit codes in its packed layout with random bf16 scales/zeros."""

    def __init__(self, k: int, n: int, device: torch.device, gen: torch.Generator) -> None:
        super().__init__()
        self.k, self.n = k, n
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=gen)  # 2 per byte
        self.register_buffer("weight", torch._convert_weight_to_int4pack(codes, INNER_K_TILES))
        sz = torch.empty(k // INT4_GROUP, n, 2, device=device)  # (groups, N, scale|zero)
        sz[..., 0].uniform_(0.001, 0.01, generator=gen)
        sz[..., 1].normal_(0.0, 0.01, generator=gen)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm(x.reshape(-1, self.k), self.weight, INT4_GROUP, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.n)


LinearFactory = Callable[[int, int], nn.Module]


def dense_linear(dtype: torch.dtype, device: torch.device) -> LinearFactory:
    return lambda k, n: nn.Linear(k, n, bias=False, dtype=dtype, device=device)


def int4_linear(device: torch.device, seed: int = 0) -> LinearFactory:
    gen = torch.Generator(device=device).manual_seed(seed)
    return lambda k, n: Int4Linear(k, n, device, gen)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half rotation over the whole head in fp32; x (B, S, H, D), cos/sin (S, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class PeerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        d, width = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.wqkv, self.wo = linear(d, cfg.q_size + 2 * cfg.kv_size), linear(cfg.q_size, d)
        self.bqkv = nn.Parameter(torch.zeros(cfg.q_size + 2 * cfg.kv_size, dtype=dtype, device=device))
        self.w_gate_up, self.w_down = linear(d, 2 * width), linear(width, d)
        self.ln_1 = nn.Parameter(torch.ones(d, dtype=dtype, device=device))
        self.ln_2 = nn.Parameter(torch.ones(d, dtype=dtype, device=device))
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # the static cache
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def attention(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        cfg, (b, s, _) = self.cfg, x.shape
        qkv = self.wqkv(x) + self.bqkv
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = rotate(q.view(b, s, cfg.num_heads, cfg.head_dim), cos, sin).transpose(1, 2)  # (B, H, S, D)
        k = rotate(k.view(b, s, cfg.num_kv_heads, cfg.head_dim), cos, sin).transpose(1, 2)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask,
                                             enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(b, s, cfg.q_size))

    def forward(self, x, pos, cos, sin, mask):
        h = x + self.attention(rms_norm(x, self.ln_1, self.cfg.rms_eps), pos, cos, sin, mask)
        gate, up = self.w_gate_up(rms_norm(h, self.ln_2, self.cfg.rms_eps)).chunk(2, dim=-1)
        return h + self.w_down(F.silu(gate) * up)


class StaticPeer(nn.Module):
    """gpt-fast-style decoder over a static cache of `max_len` positions for `batch` sequences."""

    def __init__(self, cfg: ModelConfig, linear: LinearFactory, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(PeerBlock(cfg, linear, batch, max_len, dtype, device)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size, dtype=dtype, device=device))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
        freqs = torch.arange(max_len, device=device).float()[:, None] * inv_freq  # (L, D/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) at positions pos (S,) -> fp32 logits (B, S, V); keys are cached as they are computed."""
        mask = torch.arange(self.max_len, device=pos.device)[None, :] <= pos[:, None]  # (S, L)
        x = self.embed(tokens)
        cos, sin = self.cos[pos], self.sin[pos]
        for block in self.blocks:
            x = block(x, pos, cos, sin, mask)
        return self.lm_head(rms_norm(x, self.norm, self.cfg.rms_eps)).float()


@torch.no_grad()
def copy_from_decoder(peer: StaticPeer, model: nn.Module) -> None:
    """Give a dense peer our Decoder's weights, so a test can check both compute the same model."""
    peer.embed.weight.copy_(model.embed_tokens.weight)
    peer.norm.copy_(model.norm.weight)
    peer.lm_head.weight.copy_(model.lm_head.weight)
    for mine, theirs in zip(peer.blocks, model.layers, strict=True):
        mine.wqkv.weight.copy_(theirs.attn.qkv_proj.weight)
        if theirs.attn.qkv_proj.bias is not None:
            mine.bqkv.copy_(theirs.attn.qkv_proj.bias)
        mine.wo.weight.copy_(theirs.attn.o_proj.weight)
        mine.w_gate_up.weight.copy_(theirs.mlp.gate_up_proj.weight)
        mine.w_down.weight.copy_(theirs.mlp.down_proj.weight)
        mine.ln_1.copy_(theirs.input_layernorm.weight)
        mine.ln_2.copy_(theirs.post_attention_layernorm.weight)


@torch.no_grad()
def peer_greedy(peer: StaticPeer, first: torch.Tensor, new_tokens: int, step: Callable | None = None) -> torch.Tensor:
    """Greedy decode from a (B, 1) first token, one position per step: (B, new_tokens) ids."""
    step = peer if step is None else step  # a compiled module has no truth value (OptimizedModule.__len__)
    tok, out = first, []
    for p in range(new_tokens):
        pos = torch.tensor([p], device=first.device)
        tok = step(tok, pos)[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_peer(peer: StaticPeer, batch: int, new_tokens: int, runs: int = 3, compile: bool = True) -> dict:
    """tok/s of greedy decode from a 1-token prompt (median of `runs` after a compiling warm-up); peak memory
    since the call began (the peer's weights included, which were allocated before it: they are still held)."""
    device = peer.cos.device
    reset_peak(device)
    step = torch.compile(peer, mode="reduce-overhead", fullgraph=True) if compile else peer
    first = torch.ones(batch, 1, dtype=torch.long, device=device)
    start = time.perf_counter()
    peer_greedy(peer, first, min(8, peer.max_len), step)  # compile + graph capture
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        ids = peer_greedy(peer, first, new_tokens, step)
        sync(device)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {"batch": batch, "new_tokens": new_tokens, "runs": runs, "median_s": med,
            "out_tok_per_s": batch * new_tokens / med, "tokens": ids.numel(), "compiled": compile,
            "warmup_s": warmup_s, "peak_gpu_bytes": peak_bytes(device)}


def hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float16, max_len: int = 32768):
    """HF transformers' Qwen2ForCausalLM at cfg's sizes (MHA, q/k/v bias), random weights, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=max(32768, max_len), rms_norm_eps=cfg.rms_eps)
    with torch.device(device):
        return Qwen2ForCausalLM(hf_cfg).to(dtype).eval()


def _hf_run(model, ids: torch.Tensor, new_tokens: int) -> int:
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(ids))
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def hf_time(model, batch: int, prompt_len: int, new_tokens: int, chunk: int | None = None, seed: int = 0) -> dict:
    """HF eager `generate` (greedy, exactly new_tokens, EOS ignored) of `batch` random prompts, `chunk` at a time
    (default all): one timed pass after a 4-token warm-up. Out of memory halves the chunk and starts over."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size - 1000, (batch, prompt_len), generator=gen).to(device)
    chunk = min(chunk or batch, batch)
    while True:
        try:
            reset_peak(device)
            _hf_run(model, ids[:chunk], 4)
            sync(device)
            start = time.perf_counter()
            made = sum(_hf_run(model, ids[i:i + chunk], new_tokens) for i in range(0, batch, chunk))
            sync(device)
            break
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk //= 2
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - start
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "elapsed_s": elapsed,
            "out_tok_per_s": made / elapsed, "tokens": made, "chunk": chunk, "peak_gpu_bytes": peak_bytes(device)}


def hf_generate(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, device: str = "cuda",
                chunk: int | None = None) -> dict:
    """hf_time on a freshly built fp16 model (freed afterwards)."""
    model = hf_model(cfg, torch.device(device), max_len=prompt_len + new_tokens)
    try:
        return hf_time(model, batch, prompt_len, new_tokens, chunk)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def weight_bytes(cfg: ModelConfig, int4: bool) -> int:
    """Bytes a batch-1 decode step must read (spec: performance.md floors): block Linears + lm_head."""
    d, width = cfg.hidden_size, cfg.intermediate_size
    per_layer = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * width  # weight elements
    elems = cfg.num_layers * per_layer
    if int4:  # 4-bit codes + fp16 scale and 4-bit zero per group of 128
        block = elems // 2 + elems // 128 * 2 + elems // 128 // 2
    else:
        block = elems * 2
    return block + cfg.vocab_size * d * 2


def floor_tok_per_s(cfg: ModelConfig, int4: bool, copy_bytes_per_s: float) -> float:
    return copy_bytes_per_s / weight_bytes(cfg, int4)


def kv_bytes_per_token(cfg: ModelConfig, int8: bool = False, dtype: torch.dtype = torch.float16) -> int:
    """K and V of one token over all layers as the engine's pool stores them (spec: performance.md, Qwen-7B fp16:
    512 KiB); int8: one byte per value plus each head's fp32 (scale, zero)."""
    return bytes_per_block(cfg, 1, dtype, int8)


def decode_bytes(cfg: ModelConfig, int4: bool, batch: int, prompt_len: int, new_tokens: int,
                 max_batch: int | None = None, int8_kv: bool = False) -> int:
    """The step byte floor's bytes: sequences run in waves of max_batch (default all at once); step s of a wave
    (s = 0..new_tokens-1, the first being the prefill's last position) reads the weights once plus each
    sequence's cached K/V of prompt_len + s tokens. Prefill compute and activations are not counted."""
    per_wave = max_batch or batch
    kv, weights, total = kv_bytes_per_token(cfg, int8=int8_kv), weight_bytes(cfg, int4), 0
    for start in range(0, batch, per_wave):
        rows = min(per_wave, batch - start)
        cached = new_tokens * prompt_len + new_tokens * (new_tokens - 1) // 2  # sum of prompt_len + s
        total += new_tokens * weights + rows * cached * kv
    return total


def decode_floor_tok_per_s(cfg: ModelConfig, int4: bool, batch: int, prompt_len: int, new_tokens: int,
                           copy_bytes_per_s: float, max_batch: int | None = None) -> float:
    seconds = decode_bytes(cfg, int4, batch, prompt_len, new_tokens, max_batch) / copy_bytes_per_s
    return batch * new_tokens / seconds


def copy_bandwidth(gib: float = 4.0, runs: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (spec: performance.md)."""
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / statistics.median(times)
