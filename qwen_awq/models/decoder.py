"""One decoder for Qwen v1 and the Llama family (Llama, Qwen2, Mistral): pre-norm blocks, RoPE, gated MLP.

The forward works on T flattened tokens with per-token positions and NTK alpha; attention goes through a backend
(models/attention.py) so that dense, contiguous-cache and paged-cache attention share one model definition.
Generation lives above it: `chat.ChatModel` adds HF's generate and Qwen's chat on top of the engine.
"""
from __future__ import annotations

import torch
from torch import nn

from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.models.config import GenerationDefaults, ModelConfig
from qwen_awq.models.fusion import add_rms_norm, norm_linear, silu_mul_down
from qwen_awq.models.layers import RMSNorm, logn_scale, make_linear, ntk_alpha, rotary_cos_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.scale = cfg.head_dim ** -0.5
        qkv_out = cfg.q_size + 2 * cfg.kv_size
        self.qkv_proj = make_linear(cfg.hidden_size, qkv_out, cfg.qkv_bias, cfg.quant, dtype)
        self.o_proj = make_linear(cfg.q_size, cfg.hidden_size, False, cfg.quant, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None,
                fb: ForwardBatch, norm: nn.Module | None = None, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention over x, the normed input; with `norm`, x is the block's input instead and the result is
        (output, x + residual), the norm and add fused with the qkv projection where they can be (norm_linear)."""
        cfg = self.cfg
        t = x.shape[0]
        if norm is None:
            qkv = self.qkv_proj(x)
        else:
            qkv, residual = norm_linear(x, residual, norm, self.qkv_proj)
        qkv = qkv.view(t, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)  # (T, H + 2 Hkv, D)
        out = fb.attn.attend_qkv(self.layer, qkv, cfg.num_heads, cos, sin, logn, self.scale)  # (T, H, D)
        out = self.o_proj(out.reshape(t, cfg.q_size))
        return out if norm is None else (out, residual)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (Qwen: gate = w2, up = w1)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.width = cfg.intermediate_size
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * self.width, False, cfg.quant, dtype)
        self.down_proj = make_linear(self.width, cfg.hidden_size, False, cfg.quant, dtype)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The MLP over x, the normed input; with `norm`, as Attention.forward: (output, x + residual)."""
        if norm is None:
            return silu_mul_down(self.gate_up_proj(x), self.down_proj)  # gate_up (tokens, 2 * width)
        gate_up, residual = norm_linear(x, residual, norm, self.gate_up_proj)
        return silu_mul_down(gate_up, self.down_proj), residual


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None,
                fb: ForwardBatch) -> torch.Tensor:
        """The block's output hidden state h + mlp(norm(h)), h = x + attn(norm(x)) (the quantizer calls this)."""
        out, residual = self.forward_residual(x, None, cos, sin, logn, fb)
        return out + residual

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                         sin: torch.Tensor, logn: torch.Tensor | None, fb: ForwardBatch
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual) with the residual carried, not added: the hidden state is x + residual (x
        alone in the first block), and each add happens inside the next norm's fused kernel (models/fusion.py),
        which for one token on the GPU is the next W4A16 projection's (norm_linear)."""
        attn_out, residual = self.attn(x, cos, sin, logn, fb, self.input_layernorm, residual)
        return self.mlp(attn_out, self.post_attention_layernorm, residual)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.generation_config = GenerationDefaults()  # the loader fills it from generation_config.json
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, False, None, dtype)  # plain in AWQ models too
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward_tokens(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """input_ids (T,) -> final hidden states (T, hidden), after the last norm."""
        cfg = self.cfg
        cos, sin = rotary_cos_sin(fb.positions, fb.ntk_alpha, cfg.head_dim, cfg.rope_theta)  # (T, D/2)
        logn = logn_scale(fb.positions, cfg.seq_length) if cfg.use_logn_attn else None
        x, residual = self.embed_tokens(input_ids), None  # (T, hidden); the hidden state is x + residual
        for block in self.layers:
            x, residual = block.forward_residual(x, residual, cos, sin, logn, fb)
        return add_rms_norm(x, residual, self.norm)[0]  # the last block's add fused into the final norm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden) -> fp32 logits (..., vocab_size incl. padding)."""
        return self.lm_head(hidden).float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without cache: input_ids (B, S) -> logits (B, S, V)."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).repeat(b)  # (B*S,)
        alpha = torch.full((b * s,), self.prefill_alpha(s), device=input_ids.device)
        fb = ForwardBatch(positions=positions, ntk_alpha=alpha, attn=DenseAttention(b, s))
        hidden = self.forward_tokens(input_ids.reshape(-1), fb)
        return self.compute_logits(hidden).view(b, s, -1)

    def prefill_alpha(self, prefill_len: int) -> float:
        """The NTK alpha a sequence keeps for its lifetime, fixed by the length of its first forward."""
        if not self.cfg.use_dynamic_ntk:
            return 1.0
        return ntk_alpha(prefill_len, self.cfg.seq_length)
