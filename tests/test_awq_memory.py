"""The AWQ search's memory: what record_block keeps of the Linears' inputs equals the same taken from all of
them, and one block's peak live tensor bytes (eval/quant_memory.py) stay near its weights + activations."""
from __future__ import annotations

import pytest
import torch

from qwen_awq.eval.quant_memory import LiveBytes, block_weight_bytes, measure_block, token_scale
from qwen_awq.models.config import ModelConfig
from qwen_awq.models.decoder import Block
from qwen_awq.quant import awq
from qwen_awq.quant.groups import QUANT_LINEARS


def _config(intermediate: int = 256) -> ModelConfig:
    return ModelConfig(architecture="QWenLMHeadModel", family="qwen", vocab_size=256, hidden_size=128,
                       num_layers=1, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=intermediate,
                       rms_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256, qkv_bias=True,
                       tie_word_embeddings=False, torch_dtype="float32")


def _all_inputs(block: Block, x: torch.Tensor, calib: awq.Calibration) -> dict[str, torch.Tensor]:
    """Every Linear's input over all sequences (n, S, K), recorded the plain way: one call, all tokens."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, args[0].clone())) for name in QUANT_LINEARS]
    try:
        calib.run(block, x.flatten(0, 1))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: t.view(*x.shape[:2], -1) for name, t in seen.items()}


@pytest.mark.parametrize("micro_batch", [3, 8, 16])
def test_recorded_inputs_equal_those_taken_from_all_tokens(micro_batch, monkeypatch):
    """x_mean bit for bit as the fp32 sum over pieces of 8 sequences of all inputs (the order the search used
    when it held them all), the search sequences and the strided clip tokens exactly."""
    cfg, (n, seqlen, search_samples) = _config(), (19, 16, 4)
    monkeypatch.setattr(awq, "CLIP_TOKENS", 50)  # 304 tokens: every 6th is kept, a partial micro-batch included
    block = Block(cfg, 0, torch.float32).requires_grad_(False)
    x = torch.randn(n, seqlen, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    calib = awq.Calibration(block.attn, micro_batch, seqlen, torch.device("cpu"))  # .cfg is all it reads
    with torch.inference_mode():
        out, inputs = awq.record_block(block, x, calib, search_samples)
        everything = _all_inputs(block, x, awq.Calibration(block.attn, n, seqlen, torch.device("cpu")))
        expected_out = calib.run(block, x.flatten(0, 1)).view_as(x)
    torch.testing.assert_close(out, expected_out)
    for name, full in everything.items():
        rec = inputs[name]
        x_mean = sum(piece.abs().float().sum((0, 1)) for piece in full.split(8)) / (n * seqlen)
        if name == "attn.qkv_proj":  # its input (the norm of x) does not depend on the batching: bit for bit
            assert torch.equal(rec.x_mean, x_mean)
        torch.testing.assert_close(rec.x_mean, x_mean, rtol=1e-6, atol=0)  # matmuls round by batch size
        torch.testing.assert_close(rec.search, full[::n // search_samples][:search_samples], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rec.clip, full.flatten(0, 1)[::6], rtol=1e-6, atol=1e-6)
        assert rec.clip.shape[0] == len(range(0, n * seqlen, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the CPU path; bf16 has fp16's bytes
def test_peak_live_bytes_of_one_block_stay_under_weights_activations_and_slack(dtype, monkeypatch):
    """The bound of `bench quantize` at a size whose activations outweigh the weights: weights + x + the
    output + every Linear's input over all tokens, plus a slack that does not grow with the tokens. The slack,
    from the live tensors at the peak (eval/quant_memory.py report; the MLP group's loss): the loss's
    per-chunk fp32 tensors of (search tokens, 2 x intermediate), measured 4 of them, allowed 6; fp32 copies of
    the widest weight (w, w * s, the error dW), allowed 4. The clip tokens are inside the activations. Before
    the inputs were kept as they stream past, the peak held each of them twice (a list and its cat, then the
    scaled copies): fp32 32.2 MB against this bound's 24.0 (now 10.9), bf16 16.5 against 14.5 (now 6.9)."""
    cfg, n, seqlen, search_samples = _config(), 128, 40, 8
    monkeypatch.setattr(awq, "CLIP_TOKENS", n * seqlen // 8)  # as at 128 x 512: the clip search sees 1 in 8
    tracker = measure_block(cfg, n, seqlen, seqlen, dtype=dtype, search_samples=search_samples, group_size=32)
    block = Block(cfg, 0, dtype)
    tokens, elem = n * seqlen, torch.finfo(dtype).bits // 8
    d, width = cfg.hidden_size, cfg.intermediate_size
    activations = tokens * elem * (2 * d + d + cfg.q_size + d + width)  # x, out; qkv, o, gate_up, down inputs
    slack = 6 * search_samples * seqlen * 2 * width * 4 + 4 * 2 * width * d * 4
    assert tracker.peak <= block_weight_bytes(block) + activations + slack
    assert tracker.peak >= block_weight_bytes(block) + 2 * tokens * d * elem  # the tracker sees x and the output


def test_live_bytes_counts_each_storage_once_and_forgets_freed_ones():
    """Counted by hand: views and in-place results share their storage; a freed tensor leaves the count."""
    with LiveBytes(scale=token_scale(10, 40)) as tracker:  # dims that are multiples of 10 grow 4x
        a = torch.zeros(10, 7)  # 280 bytes; 1120 at the target scale
        view = a.view(70)
        a.add_(1)
        b = a * 2  # 560 live
        del a, view
        c = b[:5] + 1  # a freed: b and c, 280 + 140 bytes (5 rows: not scaled)
    assert (tracker.peak, tracker.now) == (560, 420)
    assert (tracker.peak_scaled, tracker.now_scaled) == (2240, 1120 + 140)
    assert float(c.sum()) == 5 * 7 * 3
