"""AutoAWQ GEMM folders: what quantize_model writes (names, shapes, dtypes, configs, shards), a folder in
AutoAWQ's layout written by hand, and the failures that must leave nothing at the output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_awq.errors import ConfigError
from qwen_awq.models.loader import load_model
from qwen_awq.quant import export
from qwen_awq.quant.packing import fake_quantize, pack_linear
from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

G = 32
VOCAB = 151936  # Qwen v1's
FAST = {"group_size": G, "samples": 4, "seqlen": 16, "micro_batch": 2, "search_samples": 2}


def _calib(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    return out


def _awq_layout(linears: dict[str, tuple[int, int, bool]]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The spec's GEMM table for Linears name -> (K inputs, N outputs, has bias)."""
    layout = {}
    for name, (k, n, bias) in linears.items():
        layout |= {f"{name}.qweight": (torch.int32, (k, n // 8)),
                   f"{name}.qzeros": (torch.int32, (k // G, n // 8)),
                   f"{name}.scales": (torch.float16, (k // G, n))}
        if bias:
            layout[f"{name}.bias"] = (torch.float16, (n,))
    return layout


def test_qwen_folder_layout_and_configs(qwen_dir, tmp_path):
    out = quantize_model(qwen_dir, tmp_path / "out", QuantizeConfig(**FAST), calib=_calib(VOCAB),
                         progress=False)
    h, v, mlp = 64, VOCAB, 128  # tests/checkpoints.py QWEN_TINY: hidden 64, 4 heads x 16, intermediate 256/2
    expected = {"transformer.wte.weight": (torch.float16, (v, h)), "lm_head.weight": (torch.float16, (v, h)),
                "transformer.ln_f.weight": (torch.float16, (h,))}
    for i in range(2):
        p = f"transformer.h.{i}."
        expected |= {p + "ln_1.weight": (torch.float16, (h,)), p + "ln_2.weight": (torch.float16, (h,))}
        expected |= _awq_layout({p + "attn.c_attn": (h, 3 * h, True), p + "attn.c_proj": (h, h, False),
                                 p + "mlp.w1": (h, mlp, False), p + "mlp.w2": (h, mlp, False),
                                 p + "mlp.c_proj": (mlp, h, False)})
    tensors = _tensors(out)
    assert {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()} == expected
    source = json.loads((qwen_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    fp16 = {"torch_dtype": "float16", "bf16": False, "fp16": True, "fp32": False}  # tensors and activations
    assert config == source | fp16 | {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": G,
                                                                "zero_point": True, "version": "gemm"}}
    assert json.loads((out / "quant_config.json").read_text()) == {
        "zero_point": True, "q_group_size": G, "w_bit": 4, "version": "GEMM"}
    for name in ("qwen.tiktoken", "generation_config.json"):
        assert (out / name).read_bytes() == (qwen_dir / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


def test_llama_parts_unfused_sharded_and_deterministic(llama_dir, tmp_path):
    qcfg = QuantizeConfig(**FAST, max_shard_size=60_000)
    a = quantize_model(llama_dir, tmp_path / "a", qcfg, calib=_calib(512), progress=False)
    b = quantize_model(llama_dir, tmp_path / "b", qcfg, calib=_calib(512), progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)  # same input, same bytes
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"].keys() == ta.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ta.values())
    p = "model.layers.1."  # write_llama_checkpoint: hidden 64, 8 heads x 8, 2 kv heads, intermediate 160
    layout = _awq_layout({p + "self_attn.q_proj": (64, 64, False), p + "self_attn.k_proj": (64, 16, False),
                          p + "self_attn.v_proj": (64, 16, False), p + "self_attn.o_proj": (64, 64, False),
                          p + "mlp.gate_proj": (64, 160, False), p + "mlp.up_proj": (64, 160, False),
                          p + "mlp.down_proj": (160, 64, False)})
    for name, (dtype, shape) in layout.items():
        assert (ta[name].dtype, tuple(ta[name].shape)) == (dtype, shape)
    assert len(ta) == 2 * (len(layout) + 2) + 3  # + 2 norms per block, embed, norm, lm_head: nothing else
    fp = load_model(llama_dir, dtype=torch.float32, device="cpu")
    quant = load_model(a, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    rel = (quant(ids) - fp(ids)).abs().max() / fp(ids).abs().max()
    assert 1e-4 < rel < 0.5  # quantized, yet close to the same model


def test_tied_embeddings_store_no_lm_head(tmp_path):
    from checkpoints import write_llama_checkpoint

    src = tmp_path / "tied"
    write_llama_checkpoint(src, tied=True)
    out = quantize_model(src, tmp_path / "out", QuantizeConfig(**FAST, method="rtn"), progress=False)
    names = _tensors(out).keys()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = load_model(out, dtype=torch.float32, device="cpu")
    assert model.lm_head.weight is model.embed_tokens.weight


def test_handwritten_autoawq_folder_loads(qwen_dir, tmp_path):
    """A folder laid out as AutoAWQ writes it (round-to-nearest from our packing helpers) loads, and computes
    with exactly the fake-quantized weights."""
    folder = tmp_path / "autoawq"
    folder.mkdir()
    fp = load_model(qwen_dir, dtype=torch.float32, device="cpu")
    with safe_open(str(qwen_dir / "model.safetensors"), framework="pt") as f:
        source = {name: f.get_tensor(name).float() for name in f.keys()}
    tensors = {}
    for name, t in source.items():
        linear = name.rsplit(".", 1)[0]
        if ".h." in name and name.endswith(".weight") and t.dim() == 2:
            bias = source.get(f"{linear}.bias")
            tensors |= {f"{linear}.{k}": v for k, v in pack_linear(t, G, bias).items()}
        elif not name.endswith("c_attn.bias"):
            tensors[name] = t.half()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((qwen_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))  # AutoAWQ's older folders: only quant_config.json
    (folder / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": G, "w_bit": 4, "version": "GEMM"}))
    model = load_model(folder, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in fp.named_parameters():
            is_linear = name.startswith("layers.") and name.endswith("proj.weight")
            p.copy_(fake_quantize(p, G) if is_linear else p.half().float())
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), fp(ids), rtol=1e-4, atol=1e-4)


def test_gemv_layout_is_refused(qwen_dir, tmp_path):
    out = quantize_model(qwen_dir, tmp_path / "out", QuantizeConfig(**FAST, method="rtn"), progress=False)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gemv.*GEMM"):
        load_model(out, dtype=torch.float32, device="cpu")


def test_bad_settings_fail_before_writing(qwen_dir, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"group size 48 does not divide the input size 64 of layers\.\*\."):
        quantize_model(qwen_dir, dst, QuantizeConfig(**(FAST | {"group_size": 48})), calib=_calib(VOCAB))
    with pytest.raises(ConfigError, match="method"):
        QuantizeConfig(method="gptq")
    with pytest.raises(ConfigError, match="multiple of 8"):
        QuantizeConfig(group_size=20)
    awq_dir = quantize_model(qwen_dir, tmp_path / "q", QuantizeConfig(**FAST, method="rtn"), progress=False)
    with pytest.raises(ConfigError, match="already an AWQ checkpoint"):
        quantize_model(awq_dir, dst, QuantizeConfig(**FAST), calib=_calib(VOCAB))
    assert not dst.exists()


def test_failure_mid_export_leaves_nothing(qwen_dir, tmp_path, monkeypatch):
    def broken(src: Path, folder: Path) -> None:
        (folder / "partial.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(export, "copy_side_files", broken)
    with pytest.raises(OSError, match="disk full"):
        quantize_model(qwen_dir, tmp_path / "out", QuantizeConfig(**FAST), calib=_calib(VOCAB),
                       progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(qwen_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        quantize_model(qwen_dir, dst, QuantizeConfig(**FAST, method="rtn"), progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    quantize_model(qwen_dir, dst, QuantizeConfig(**FAST, method="rtn", overwrite=True), progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

