"""The decoder against transformers' independent implementations (Qwen2 / Llama classes with renamed weights)."""
from __future__ import annotations

import math

import pytest
import torch
from assets import DEVICE
from checkpoints import hf_qwen2_twin
from reference import ContiguousKVCache

from qwen_awq.models.attention import ForwardBatch
from qwen_awq.models.loader import load_model


def _ids(n: int, vocab: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy_with_cache(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill then decode one token at a time through the contiguous KV cache; returns tokens and step logits."""
    cfg, n = model.cfg, prompt.shape[1]
    cache = ContiguousKVCache(cfg.num_layers, 1, n + steps, cfg.num_kv_heads, cfg.head_dim, model.dtype, DEVICE)
    alpha = model.prefill_alpha(n)
    tokens, logits_seen, ids, start = [], [], prompt[0].to(DEVICE), 0
    for _ in range(steps):
        cache.step(len(ids))
        pos = torch.arange(start, start + len(ids), device=DEVICE)
        fb = ForwardBatch(positions=pos, ntk_alpha=torch.full((len(ids),), alpha, device=DEVICE), attn=cache)
        logits = model.compute_logits(model.forward_tokens(ids, fb))[-1].cpu()
        cache.advance()
        start += len(ids)
        logits_seen.append(logits)
        tokens.append(int(logits.argmax()))
        ids = torch.tensor([tokens[-1]], device=DEVICE)
    return tokens, logits_seen


def test_qwen_logits_match_transformers(qwen_dir):
    ours = load_model(qwen_dir, dtype="float32", device=DEVICE)
    ref = hf_qwen2_twin(qwen_dir)
    ids = _ids(48, 151851, batch=2)
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids.to(DEVICE)).cpu()
    assert got.shape == (2, 48, 151936)
    assert (got - expected).abs().max().item() <= 1e-4


def test_qwen_greedy_with_cache_matches_transformers(qwen_dir):
    ours = load_model(qwen_dir, dtype="float32", device=DEVICE)
    ref = hf_qwen2_twin(qwen_dir)
    prompt = _ids(10, 151851, seed=1)
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, 10:].tolist()
    tokens, _ = greedy_with_cache(ours, prompt, 32)
    assert tokens == expected


def _hf_with_ntk_logn(qwen_dir, alpha: float, seq_length: int, head_dim: int):
    """Re-derive Qwen's long-context math on the twin: base * alpha^(d/(d-2)) and q scaled by ln(p+1)/ln(S)."""
    ref = hf_qwen2_twin(qwen_dir)
    theta = 10000.0 * alpha ** (head_dim / (head_dim - 2))
    ref.config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    ref.model.rotary_emb.__init__(ref.config)

    def scale_query(module, inputs, output):  # LogN commutes with the rotation, so scale before RoPE
        p = torch.arange(output.shape[1], dtype=torch.float64) + 1
        s = torch.where(p > seq_length, torch.log(p) / math.log(seq_length), torch.ones_like(p))
        return output * s.to(output.dtype)[None, :, None]

    for layer in ref.model.layers:
        layer.self_attn.q_proj.register_forward_hook(scale_query)
    return ref


def test_qwen_long_prompt_uses_ntk_and_logn(qwen_dir):
    """A 150-token prompt with seq_length 64: alpha = 2^ceil(log2(150/64) + 1) - 1 = 7, LogN beyond 64."""
    ours = load_model(qwen_dir, dtype="float32", device=DEVICE)
    assert ours.prefill_alpha(150) == 7.0 and ours.prefill_alpha(100) == 3.0 and ours.prefill_alpha(64) == 1.0
    ref = _hf_with_ntk_logn(qwen_dir, 7.0, 64, 16)
    ids = _ids(150, 151851, seed=2)
    with torch.no_grad():
        expected = ref(ids).logits
    assert (ours(ids.to(DEVICE)).cpu() - expected).abs().max().item() <= 1e-4


def test_qwen_decoding_past_seq_length_keeps_prefill_alpha(qwen_dir):
    """A short prompt keeps alpha 1 while decoding past seq_length; LogN still scales the later positions."""
    ours = load_model(qwen_dir, dtype="float32", device=DEVICE)
    prompt = _ids(40, 151851, seed=3)
    tokens, step_logits = greedy_with_cache(ours, prompt, 60)
    full = torch.cat([prompt[0], torch.tensor(tokens[:-1])])[None]
    ref = _hf_with_ntk_logn(qwen_dir, 1.0, 64, 16)
    with torch.no_grad():
        expected = ref(full).logits[0, 39:]
    assert (torch.stack(step_logits) - expected).abs().max().item() <= 1e-4


def test_llama_gqa_logits_and_greedy_match_transformers(tmp_path):
    from checkpoints import write_llama_checkpoint

    for tied in (False, True):
        folder = tmp_path / f"tied{tied}"
        ref = write_llama_checkpoint(folder, seed=4, tied=tied)
        ours = load_model(folder, dtype="float32", device=DEVICE)
        assert ours.cfg.num_kv_heads == 2 and ours.cfg.tie_word_embeddings == tied
        ids = _ids(33, 512, seed=5, batch=3)
        with torch.no_grad():
            expected = ref(ids).logits
            gen = ref.generate(ids[:1, :8], max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert (ours(ids.to(DEVICE)).cpu() - expected).abs().max().item() <= 1e-4
        assert greedy_with_cache(ours, ids[:1, :8], 32)[0] == gen[0, 8:].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(qwen_dir, dtype):
    ids = _ids(20, 151851, seed=6)
    ref = load_model(qwen_dir, dtype="float32", device=DEVICE)(ids.to(DEVICE)).cpu()
    half = load_model(qwen_dir, dtype=dtype, device=DEVICE)
    assert half.layers[0].attn.qkv_proj.weight.dtype == dtype and half.embed_tokens.weight.dtype == dtype
    got = half(ids.to(DEVICE)).cpu()
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 3e-2  # 0 would mean the forward silently ran in fp32
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
