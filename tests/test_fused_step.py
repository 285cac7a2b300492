"""The fused decode step (models/fusion.py): residual add + RMSNorm in one kernel, SiLU(gate) * up in one pass or in
the W4A16 down projection, against the decoder's unfused formula written out here in plain PyTorch.

On the CPU the fused ops take their torch references, so the fused decoder must be bit-identical to the old one
(fp32, fp16, bf16; plain and AWQ, repacked or not) and its greedy tokens equal (tests/reference.dense_greedy). The
Triton kernels themselves run under TRITON_INTERPRET=1 in a subprocess (the variable is read when a kernel is
decorated): silu_mul at odd shapes against its reference, a whole fp16 decoder forward through both kernels, and
the kernel count of eval/profile_step.py (fused < unfused per layer). `python tests/test_fused_step.py` with
TRITON_INTERPRET=1 prints those results as JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interpret import run_interpreted
from reference import dense_greedy

from qwen_awq.models import fusion
from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.models.layers import logn_scale, rotary_cos_sin

PROMPT = [101, 2024, 7, 33000, 512]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # one ulp at 1.0
# silu_mul's bound in ulps: fp16 one rounding each of silu and product; bf16 more, as the interpreter truncates
# fp32 -> bf16 where a GPU rounds to nearest (each of the two roundings may be off by one more ulp)
SILU_ULPS = {torch.float16: 2, torch.bfloat16: 4}


def _model(quant: bool, dtype: torch.dtype, repack: bool = False, seed: int = 0):
    from qwen_awq.eval.synthetic import build_synthetic

    model = build_synthetic("qwen-tiny", quant, dtype, "cpu", seed)
    with torch.no_grad():  # larger weights than N(0, 0.02): activations and logit gaps well above rounding
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point and "norm" not in name:
                p.mul_(4)
    if repack:
        for m in model.modules():
            if hasattr(m, "post_load"):
                m.post_load(cpu=True)
    return model


def _batch(model, n: int) -> ForwardBatch:
    return ForwardBatch(positions=torch.arange(n), ntk_alpha=torch.ones(n), attn=DenseAttention(1, n))


def _old_forward(model, ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
    """The decoder before the fusions: h = x + attn(norm(x)); out = h + down(silu(gate) * up)(norm(h))."""
    cfg = model.cfg
    cos, sin = rotary_cos_sin(fb.positions, fb.ntk_alpha, cfg.head_dim, cfg.rope_theta)
    logn = logn_scale(fb.positions, cfg.seq_length) if cfg.use_logn_attn else None

    def norm(mod, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=mod.eps).to(x.dtype) * mod.weight

    x = model.embed_tokens(ids)
    for b in model.layers:
        h = x + b.attn(norm(b.input_layernorm, x), cos, sin, logn, fb)
        gate, up = b.mlp.gate_up_proj(norm(b.post_attention_layernorm, h)).chunk(2, dim=-1)
        x = h + b.mlp.down_proj(F.silu(gate) * up)
    return norm(model.norm, x)


# AWQ in fp16/bf16 only (the checkpoints' activations); "awq-repacked": the W4A16 layout, SiLU in its reference
BIT_CASES = [("plain", "fp32"), ("plain", "fp16"), ("plain", "bf16"), ("awq", "fp16"), ("awq", "bf16"),
             ("awq-repacked", "fp16"), ("awq-repacked", "bf16")]


@pytest.mark.parametrize(("weights", "dtype"), BIT_CASES)
@torch.inference_mode()
def test_fused_decoder_is_bit_identical_on_cpu(weights: str, dtype: str) -> None:
    model = _model(weights != "plain", DTYPES[dtype], repack=weights == "awq-repacked")
    ids = torch.tensor(PROMPT)
    expect = _old_forward(model, ids, _batch(model, len(PROMPT)))
    with fusion.fusion(True):
        fused = model.forward_tokens(ids, _batch(model, len(PROMPT)))
    with fusion.fusion(False):
        unfused = model.forward_tokens(ids, _batch(model, len(PROMPT)))
    assert expect.abs().max() > 0.1  # a real signal, not zeros
    assert torch.equal(fused, expect) and torch.equal(unfused, expect)
    # the quantizer's entry point (Block.forward) still returns the whole hidden state
    x = model.embed_tokens(ids)
    cos, sin = rotary_cos_sin(torch.arange(5), torch.ones(5), model.cfg.head_dim, model.cfg.rope_theta)
    logn = logn_scale(torch.arange(5), model.cfg.seq_length)
    blk = model.layers[0]
    out = blk(x, cos, sin, logn, _batch(model, 5))
    norm = blk.input_layernorm
    h = x + blk.attn(norm(x), cos, sin, logn, _batch(model, 5))
    gate, up = blk.mlp.gate_up_proj(blk.post_attention_layernorm(h)).chunk(2, dim=-1)
    assert torch.equal(out, h + blk.mlp.down_proj(F.silu(gate) * up))


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "awq"])
def test_greedy_tokens_unchanged_by_fusion(quant: bool) -> None:
    model = _model(quant, torch.float16 if quant else torch.float32)
    with fusion.fusion(False):
        before = dense_greedy(model, PROMPT, 6)
    with fusion.fusion(True):
        after = dense_greedy(model, PROMPT, 6)
    assert after == before and len(set(before)) > 1


def test_fusion_switch_env_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fusion.FUSED_ENV, raising=False)
    assert fusion.fused()
    monkeypatch.setenv(fusion.FUSED_ENV, "0")
    assert not fusion.fused()
    with fusion.fusion(True):
        assert fusion.fused()
    assert not fusion.fused()
    monkeypatch.setenv(fusion.FUSED_ENV, "1")
    with fusion.fusion(False):
        assert not fusion.fused()


def test_kernel_count_equal_when_no_kernel_runs() -> None:
    """fp32 on the CPU: the fused ops are their references, so the counts must agree (the counter is honest)."""
    from qwen_awq.eval.profile_step import layer_counts

    counts = layer_counts(_model(False, torch.float32))
    assert counts["fused"] == counts["unfused"] and counts["fused"]["per_layer"] > 5


def test_step_kernels_cli_writes_counts(tmp_path: Path) -> None:
    from qwen_awq.cli import main

    out = tmp_path / "k.json"
    assert main(["bench", "step-kernels", "--synthetic", "qwen-tiny", "--device", "cpu", "--dtype", "float32",
                 "--quant", "none", "--batch", "1", "2", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["layers"] == 2 and r["quant"] == "plain" for r in rows)
    assert (tmp_path / "k.md").read_text().startswith("| weights |")


# --- under the Triton interpreter (subprocess) ---------------------------------------------------------------

SILU_CASES = [("fp16", (3, 2 * 1500)), ("fp16", (1, 2 * 37)), ("bf16", (2, 5, 2 * 100)), ("bf16", (7, 2 * 1025)),
              ("fp16", "strided")]


def _silu_case(dtype: str, shape, seed: int) -> float:
    """max |kernel - reference| in units of its bound (SILU_ULPS; 1.0 passes)."""
    from qwen_awq.kernels.reference import silu_mul_reference
    from qwen_awq.kernels.silu_mul import silu_mul

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    if shape == "strided":  # gate_up a column slice of a wider tensor: rows not contiguous
        x = (torch.randn(4, 2 * 300 + 64, generator=gen) * 3).to(dt)[:, 64:]
    else:
        x = (torch.randn(shape, generator=gen) * 3).to(dt)
    y, ref = silu_mul(x), silu_mul_reference(x)
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return float("inf")
    bound = SILU_ULPS[dt] * EPS[dt] * ref.float().abs() + 1e-5
    return float(((y.float() - ref.float()).abs() / bound).max())


def _decoder_case(quant: bool) -> dict:
    """fp16 decoder forward, fused (Triton norm and silu kernels) vs the old formula, and greedy tokens."""
    from torch.profiler import profile

    from qwen_awq.eval.profile_step import TRITON_TAG, _tagged_triton_launches

    model = _model(quant, torch.float16)
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        expect = _old_forward(model, ids, _batch(model, len(PROMPT)))
        with fusion.fusion(True), _tagged_triton_launches(), profile() as prof:
            fused = model.forward_tokens(ids, _batch(model, len(PROMPT)))
    launches = sorted({e.name for e in prof.events() if e.name.startswith(TRITON_TAG)})
    err = float((fused.float() - expect.float()).abs().max() / expect.float().abs().max())
    with fusion.fusion(False):
        before = dense_greedy(model, PROMPT, 4)
    with fusion.fusion(True):
        after = dense_greedy(model, PROMPT, 4)
    return {"err": err, "launches": launches, "before": before, "after": after}


def _count_case(quant: bool) -> dict:
    from qwen_awq.eval.profile_step import layer_counts

    return layer_counts(_model(quant, torch.float16))


def _main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    out = {"silu": [_silu_case(d, s, i) for i, (d, s) in enumerate(SILU_CASES)],
           "decoder": {q: _decoder_case(q == "awq") for q in ("plain", "awq")},
           "counts": {q: _count_case(q == "awq") for q in ("plain", "awq")}}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__, threads=1)


def test_silu_mul_kernel_matches_reference(interpreted: dict) -> None:
    for (dtype, shape), ratio in zip(SILU_CASES, interpreted["silu"], strict=True):
        assert ratio <= 1.0, f"{dtype} {shape}: error {ratio:.3g} x the ulp bound"


@pytest.mark.parametrize("weights", ["plain", "awq"])
def test_decoder_forward_through_triton_kernels(interpreted: dict, weights: str) -> None:
    r = interpreted["decoder"][weights]
    kernels = {"triton::_add_rms_norm_kernel"} | ({"triton::_silu_mul_kernel"} if weights == "plain" else set())
    assert kernels <= set(r["launches"]), r["launches"]  # AWQ on the CPU: SiLU * up in the down reference
    assert r["err"] <= 4e-3, r["err"]  # fp16 roundings, fp32 sums in another order
    assert r["after"] == r["before"]


@pytest.mark.parametrize("weights", ["plain", "awq"])
def test_fused_step_has_fewer_kernels_per_layer(interpreted: dict, weights: str) -> None:
    c = interpreted["counts"][weights]
    assert c["fused"]["per_layer"] < c["unfused"]["per_layer"], c
    assert c["fused"]["step"] < c["unfused"]["step"], c


if __name__ == "__main__":
    _main()
