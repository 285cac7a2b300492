"""The AWQ search: exact folding, the search pieces against brute force, and quantized models against the
fake-quantized fp model that replays the recorded scales and clips."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen_awq.models.config import ModelConfig
from qwen_awq.models.decoder import Decoder
from qwen_awq.models.family import scale_groups
from qwen_awq.models.loader import load_model
from qwen_awq.quant import awq
from qwen_awq.quant.export import export_awq
from qwen_awq.quant.groups import QUANT_LINEARS
from qwen_awq.quant.packing import fake_quantize


def _ids(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _mha_llama(seed: int = 0) -> Decoder:
    """A random Llama-family model without GQA and with a qkv bias (Qwen2-like): it has the v -> o group."""
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", family="llama", vocab_size=256, hidden_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=96,
                      rms_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256, qkv_bias=True,
                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = Decoder(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layernorm" in name or name == "norm.weight"
                    else 0.1 * torch.randn_like(p))
    return model


def _reference_rows(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    # Written out here rather than taken from groups.fused_rows, so a wrong table there shows up.
    q, kv, w = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"v": (q + kv, q + 2 * kv), "up": (w, 2 * w)}


def fold_reference(model: Decoder, scales: list[dict[str, torch.Tensor]]) -> None:
    """Fold per-group scales the plain way: prev op (rows) / s, the Linear's input columns * s."""
    rows = _reference_rows(model.cfg)
    with torch.no_grad():
        for block, block_scales in zip(model.layers, scales, strict=True):
            for group in scale_groups(model.cfg):
                s = block_scales[group.linear]
                block.get_submodule(group.linear).weight.mul_(s)
                prev = block.get_submodule(group.prev)
                lo, hi = rows[group.prev_part] if group.prev_part else (0, s.numel())
                if prev.weight.dim() == 1:
                    prev.weight.div_(s)
                else:
                    prev.weight[lo:hi] /= s[:, None]
                    if prev.bias is not None:
                        prev.bias[lo:hi] /= s


def replay_reference(model: Decoder, records: list[awq.BlockRecord], group_size: int) -> None:
    """The fake-quantized fp model: the same scales and clips, then packing.fake_quantize of each Linear."""
    fold_reference(model, [r.scales for r in records])
    with torch.no_grad():
        for block, record in zip(model.layers, records, strict=True):
            for name in QUANT_LINEARS:
                linear = block.get_submodule(name)
                if name in record.clips:
                    bound = record.clips[name].repeat_interleave(group_size, dim=1)  # (N, K)
                    linear.weight.copy_(torch.clamp(linear.weight, -bound, bound))
                linear.weight.copy_(fake_quantize(linear.weight, group_size))
        packed = {f"layers.{i}.{name}.weight" for i in range(model.cfg.num_layers) for name in QUANT_LINEARS}
        for name, tensor in model.named_parameters():  # the checkpoint keeps all but packed weights in fp16
            if name not in packed:
                tensor.copy_(tensor.half().float())


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["qwen", "llama", "llama-mha"])
def test_folding_leaves_function_unchanged(family, qwen_dir, llama_dir):
    model = _mha_llama() if family == "llama-mha" else load_model(
        qwen_dir if family == "qwen" else llama_dir, dtype=torch.float32, device="cpu")
    ids = _ids((2, 24), model.cfg.vocab_size, seed=1)
    before, qkv_before = model(ids), model.layers[0].attn.qkv_proj.weight.clone()
    gen = torch.Generator().manual_seed(3)
    groups = scale_groups(model.cfg)
    assert len(groups) == (4 if family == "llama-mha" else 3)  # v -> o only without GQA
    for block in model.layers:
        with torch.no_grad():
            for group in groups:
                k = block.get_submodule(group.linear).weight.shape[1]
                s = torch.exp(torch.randn(k, generator=gen))  # spans ~0.05 .. 20
                awq.fold_scale(block, group, s, awq.fused_rows(model.cfg))
    after = model(ids)
    assert _rel_change(after, before) < 1e-5
    assert (model.layers[0].attn.qkv_proj.weight - qkv_before).abs().max() > 0.1  # the fold really happened


def write_qwen2(folder: Path) -> Path:
    """A tiny Qwen2 checkpoint written by transformers: q/k/v biases, no GQA (so the v -> o group applies)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["qwen", "llama", "qwen2"])
def test_quantized_checkpoint_reloads_to_fake_quantized_model(family, qwen_dir, llama_dir, tmp_path):
    src = {"qwen": qwen_dir, "llama": llama_dir}.get(family) or write_qwen2(tmp_path / "qwen2")
    model = load_model(src, dtype=torch.float32, device="cpu")
    calib = _ids((8, 32), model.cfg.vocab_size, seed=5)
    records = awq.awq_quantize(model, calib, 32, micro_batch=3, search_samples=4, progress=False)
    assert any(not torch.equal(s, torch.ones_like(s)) for r in records for s in r.scales.values())
    assert all(set(r.clips) == set(QUANT_LINEARS) for r in records)
    out = export_awq(model, src, tmp_path / "awq", group_size=32)
    if family == "qwen2":  # the folded v bias went out as its own fp16 tensor
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            v_bias = f.get_tensor("model.layers.1.self_attn.v_proj.bias")
        torch.testing.assert_close(v_bias, model.layers[1].attn.qkv_proj.bias[128:].half(), rtol=0, atol=0)
    reloaded = load_model(out, dtype=torch.float32, device="cpu")
    assert reloaded.cfg.quant is not None and reloaded.cfg.quant.group_size == 32
    reference = load_model(src, dtype=torch.float32, device="cpu")
    replay_reference(reference, records, 32)
    ids = _ids((2, 20), model.cfg.vocab_size, seed=6)
    expected, got = reference(ids), reloaded(ids)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    fp = load_model(src, dtype=torch.float32, device="cpu")(ids)
    assert _rel_change(got, fp) > 1e-3  # and quantization really changed the weights


def test_fake_quantize_inplace_is_bit_identical():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.rand(256, generator=gen) * 4
    w[0, :64] = 0.25  # a constant group (range clamped to 1e-5)
    w[1, 64:128] = -w[1, 64:128].abs()  # all negative: zero point at the top
    w[2, 128:192] = w[2, 128:192].abs() + 3  # all positive, far from zero: zero point clamped to 0
    assert torch.equal(awq.fake_quantize_(w.clone(), 64), fake_quantize(w, 64))


def test_clip_search_matches_brute_force_over_tokens():
    """Gram-matrix losses pick the same per-(row, group) clip as AutoAWQ's direct sum over tokens."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 128, generator=gen)
    w[:, 5] *= 8  # outlier weights make shrinking worthwhile for some groups
    x = torch.randn(300, 128, generator=gen) * torch.rand(128, generator=gen)
    got = awq.search_clip(w, x, 32)  # (24, 4)
    wg = w.view(24, 1, 4, 32)
    xg = x.view(1, 300, 4, 32)
    w_max = wg.abs().amax(-1, keepdim=True)  # (24, 1, 4, 1)
    reference = (xg * wg).sum(-1)  # (24, 300, 4)
    errors, limits = [], []
    for shrink in awq.CLIP_SHRINKS:
        limit = w_max * shrink
        q = fake_quantize(torch.clamp(wg, -limit, limit).view(24, 128), 32).view(24, 1, 4, 32)
        errors.append(((xg * q).sum(-1) - reference).pow(2).mean(1))  # (24, 4)
        limits.append(limit.view(24, 4))
    best = torch.stack(errors).argmin(0)  # (24, 4)
    expected = torch.stack(limits).gather(0, best[None]).squeeze(0)
    assert (best > 0).any()  # some groups are really clipped
    assert torch.equal(got, expected)
    assert len(awq.CLIP_SHRINKS) == 10 and awq.CLIP_SHRINKS[-1] == pytest.approx(0.55)


def test_scale_search_grid_and_fallback():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=gen)
    x_mean, w_mean = torch.rand(64, generator=gen) + 0.1, torch.rand(64, generator=gen) + 0.1
    seen = []

    def recording_loss(dw):
        seen.append(dw)
        return float("nan")

    s = awq.search_scale(w, x_mean, w_mean, 32, recording_loss)
    assert torch.equal(s, torch.ones(64)) and len(seen) == 20  # no finite loss: s = 1, not an exception
    ratio = 0.35
    expected = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    expected = expected / (expected.max() * expected.min()).sqrt()
    torch.testing.assert_close(awq.ratio_scales(x_mean, w_mean, ratio), expected)
    target = awq.ratio_scales(x_mean, w_mean, 0.35)
    picked = awq.search_scale(w, x_mean, w_mean, 32, lambda dw: float((dw - seen[7]).abs().sum()))
    torch.testing.assert_close(picked, target)  # the grid's 8th point is ratio 0.35


@pytest.mark.parametrize("group_index", [0, 1])  # the attention and the MLP group
def test_module_loss_equals_direct_forward(group_index, qwen_dir):
    """The loss built from recorded activations and the error term x @ dW^T equals running the inspected
    module with W + dW against running it with W."""
    model = load_model(qwen_dir, dtype=torch.float32, device="cpu")
    block, seqs, seqlen = model.layers[0], 4, 16
    calib = awq.Calibration(model, 3, seqlen, torch.device("cpu"))
    x = model.embed_tokens(_ids((seqs, seqlen), model.cfg.vocab_size, seed=8))
    with torch.inference_mode():
        _, inputs = awq.record_block(block, x, calib, search_samples=seqs)  # every sequence
        feats = {name: rec.search for name, rec in inputs.items()}  # (seqs, S, K)
        group = scale_groups(model.cfg)[group_index]
        weight = block.get_submodule(group.linear).weight
        dw = 0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(9))
        got = awq.module_loss(block, group, feats, calib, torch.float32)(dw)
        module = block.get_submodule(group.inspect)
        perturbed = copy.deepcopy(module)
        perturbed.get_submodule(group.linear.split(".", 1)[1]).weight.add_(dw)
        inputs = feats[group.linear].flatten(0, 1)  # (tokens, K): all sequences in one call
        expected = (calib.run(perturbed, inputs) - calib.run(module, inputs)).pow(2).mean()
    assert got == pytest.approx(float(expected), rel=1e-4)


def test_awq_beats_rtn_with_outlier_input_channels():
    model = _mha_llama(seed=4)
    with torch.no_grad():  # a few activation channels 30x larger than the rest, as in real LLMs
        for block in model.layers:
            block.input_layernorm.weight[[3, 17, 40]] *= 30
            block.post_attention_layernorm.weight[[5, 29]] *= 30
    calib, held_out = _ids((8, 32), 256, seed=10), _ids((4, 32), 256, seed=11)
    fp = model(held_out)
    awq_model, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    awq.awq_quantize(awq_model, calib, 32, micro_batch=4, search_samples=8, progress=False)
    awq.rtn_quantize(rtn_model, 32, progress=False)
    mse_awq = float((awq_model(held_out) - fp).pow(2).mean())
    mse_rtn = float((rtn_model(held_out) - fp).pow(2).mean())
    assert mse_awq < 0.7 * mse_rtn  # measured: about half
