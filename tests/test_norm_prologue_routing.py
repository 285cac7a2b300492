"""The decoder's route to a projection that takes the residual add + RMSNorm in its own prologue
(models/fusion.norm_linear -> AWQLinear.norm_forward): when a Linear offers one, the block uses its output and its
residual; when it declines (None) or the fusions are off, the block norms first. The kernel itself is CUDA-only
(tests/test_w4a16_kernels.py, cudanorm cases, against a float64 oracle on the GPU)."""
from __future__ import annotations

import torch

from qwen_awq.eval.synthetic import build_synthetic
from qwen_awq.kernels import w4a16 as kern
from qwen_awq.kernels.reference import fused_add_rms_norm_reference
from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.models.fusion import fusion
from qwen_awq.models.layers import rotary_cos_sin


def _block_inputs(model, t: int = 5):
    gen = torch.Generator().manual_seed(3)
    cfg = model.cfg
    x = torch.randn(t, cfg.hidden_size, generator=gen)
    residual = torch.randn(t, cfg.hidden_size, generator=gen)
    positions = torch.arange(t)
    cos, sin = rotary_cos_sin(positions, torch.ones(t), cfg.head_dim, cfg.rope_theta)
    return x, residual, cos, sin, ForwardBatch(positions, torch.ones(t), DenseAttention(1, t))


def _offer(linear, calls: list, shift: float):
    """Give `linear` a norm_forward that computes the reference norm + projection, moved by `shift` so that the
    test sees whether the block used its output, and records each call."""
    def norm_forward(x, residual, weight, eps):
        calls.append(linear)
        normed, h = fused_add_rms_norm_reference(x, residual, weight, eps)
        return linear(normed) + shift, h
    linear.norm_forward = norm_forward


def test_the_block_takes_an_offered_prologue_and_its_residual():
    model = build_synthetic("qwen-tiny", False, torch.float32, "cpu", seed=2)
    block = model.layers[0]
    x, residual, cos, sin, fb = _block_inputs(model)
    with torch.no_grad(), fusion(False):
        plain_out, plain_res = block.forward_residual(x, residual, cos, sin, None, fb)
    calls: list = []
    _offer(block.attn.qkv_proj, calls, 0.0)
    _offer(block.mlp.gate_up_proj, calls, 0.0)
    with torch.no_grad(), fusion(True):
        out, res = block.forward_residual(x, residual, cos, sin, None, fb)
    assert calls == [block.attn.qkv_proj, block.mlp.gate_up_proj]
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, plain_res, rtol=0, atol=0)  # x + attn(x) exactly, as without the offer
    _offer(block.mlp.gate_up_proj, calls, 1.0)  # a projection whose output the block must use, not recompute
    with torch.no_grad(), fusion(True):
        moved, _ = block.forward_residual(x, residual, cos, sin, None, fb)
    assert not torch.allclose(moved, plain_out)
    with torch.no_grad(), fusion(False):  # fusions off: the offer is not taken
        off, _ = block.forward_residual(x, residual, cos, sin, None, fb)
    torch.testing.assert_close(off, plain_out, rtol=0, atol=0)


def test_a_declined_prologue_norms_first():
    model = build_synthetic("qwen-tiny", False, torch.float32, "cpu", seed=2)
    block = model.layers[0]
    x, residual, cos, sin, fb = _block_inputs(model)
    with torch.no_grad(), fusion(False):
        plain_out, plain_res = block.forward_residual(x, None, cos, sin, None, fb)  # the first block: no residual
    block.attn.qkv_proj.norm_forward = lambda *args: None
    block.mlp.gate_up_proj.norm_forward = lambda *args: None
    with torch.no_grad(), fusion(True):
        out, res = block.forward_residual(x, None, cos, sin, None, fb)
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, plain_res, rtol=1e-6, atol=1e-6)


def test_the_awq_prologue_declines_off_the_gpu_and_unless_asked(monkeypatch):
    model = build_synthetic("qwen-tiny", True, torch.float16, "cpu", seed=2)
    layer = model.layers[0].attn.qkv_proj
    x = torch.randn(1, model.cfg.hidden_size).half()
    weight = torch.ones(model.cfg.hidden_size).half()
    monkeypatch.setenv(kern.NORM_PROLOGUE_ENV, "1")
    assert layer.norm_forward(x, x, weight, 1e-6) is None  # CPU tensors: the block norms first
    monkeypatch.delenv(kern.NORM_PROLOGUE_ENV)
    assert kern.w4a16_norm_matmul(x, x, weight, 1e-6, layer.w4) is None  # off by default
