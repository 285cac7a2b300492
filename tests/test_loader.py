"""Checkpoint loading: sharded folders, configs, and the clear errors a user can cause."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoints import write_qwen_checkpoint
from safetensors.torch import load_file, save_file

from qwen_awq.errors import CheckpointError, ConfigError
from qwen_awq.models.config import load_generation_config
from qwen_awq.models.family import load_config
from qwen_awq.models.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_qwen_config_resolves_real_keys(qwen_dir):
    cfg = load_config(qwen_dir)
    assert (cfg.family, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen", 4, 4, 16)
    assert cfg.intermediate_size == 128 and cfg.seq_length == 64 and cfg.qkv_bias
    assert cfg.use_dynamic_ntk and cfg.use_logn_attn and cfg.torch_dtype == "bfloat16"
    gen = load_generation_config(qwen_dir)
    assert (gen.top_p, gen.top_k, gen.repetition_penalty, gen.max_window_size) == (0.8, 0, 1.1, 6144)


def test_sharded_checkpoint_equals_single(tmp_path, qwen_vocab, qwen_dir):
    sharded = write_qwen_checkpoint(tmp_path / "sharded", qwen_vocab, shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    ids = torch.randint(0, 151851, (1, 12), generator=torch.Generator().manual_seed(0))
    a = load_model(sharded, dtype="float32", device="cpu")(ids)
    b = load_model(qwen_dir, dtype="float32", device="cpu")(ids)
    assert torch.equal(a, b)


def test_python_in_model_folder_is_never_executed(tmp_path, qwen_dir):
    folder = _copy(qwen_dir, tmp_path / "m")
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    for name in ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py", "__init__.py"):
        (folder / name).write_text(code)
    load_model(folder, dtype="float32", device="cpu")
    assert not marker.exists()


def test_missing_config_and_weights(tmp_path, qwen_dir):
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path, device="cpu")
    folder = _copy(qwen_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(folder, device="cpu")


def test_truncated_safetensors(tmp_path, qwen_dir):
    folder = _copy(qwen_dir, tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder, device="cpu")


def test_missing_tensor_and_wrong_shape(tmp_path, qwen_dir):
    folder = _copy(qwen_dir, tmp_path / "m")
    sd = load_file(str(folder / "model.safetensors"))
    del sd["transformer.h.1.mlp.w1.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.w1\.weight"):
        load_model(folder, device="cpu")
    sd = load_file(str(qwen_dir / "model.safetensors"))
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"][:10]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.ln_f\.weight has shape \(10,\), expected \(64,\)"):
        load_model(folder, device="cpu")


def test_unknown_architecture_and_dtype(tmp_path, qwen_dir):
    folder = _copy(qwen_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        load_model(folder, dtype="int3", device="cpu")
    (folder / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ConfigError, match="GPTNeoXForCausalLM"):
        load_model(folder, device="cpu")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(folder, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_requested_without_gpu(qwen_dir):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_model(qwen_dir, device="cuda")


def test_quant_format_hooks_run_on_each_layer_of_their_format(qwen_dir):
    """The after-load slot kernels will use (repacking): called once per AWQ layer; the CPU hook only on CPU."""
    from dataclasses import replace

    from qwen_awq.models.config import QuantConfig
    from qwen_awq.models.decoder import Decoder
    from qwen_awq.quant.formats import AWQ, PLAIN, after_load, quant_format
    from qwen_awq.quant.linear import AWQLinear

    cfg = replace(load_config(qwen_dir), quant=QuantConfig(group_size=16))
    assert quant_format(cfg.quant) is AWQ and quant_format(None) is PLAIN
    model = Decoder(cfg)
    layers = [m for m in model.modules() if isinstance(m, AWQLinear)]
    assert len(layers) == 4 * cfg.num_layers
    seen: list = []
    after_load(model, replace(AWQ, post_load=seen.append), torch.device("meta"))
    assert seen == layers and not any(m.cache_dequantized for m in layers)
    after_load(model, AWQ, torch.device("cpu"))
    assert all(m.cache_dequantized for m in layers)
    with pytest.raises(ConfigError, match="'gptq' is not supported"):
        QuantConfig(method="gptq")


def test_every_architecture_has_a_family_record(qwen_dir):
    from dataclasses import replace

    from qwen_awq.models.family import ARCHITECTURES, FAMILIES, family_of

    assert {f.name for f in ARCHITECTURES.values()} == set(FAMILIES)
    assert family_of(load_config(qwen_dir)).weights.modules(1)["layers.0.mlp.gate_up_proj"] == (
        "transformer.h.0.mlp.w2", "transformer.h.0.mlp.w1")  # Qwen's gate is w2
    with pytest.raises(ConfigError, match="unknown model family 'gpt2'"):
        family_of(replace(load_config(qwen_dir), family="gpt2"))


def test_an_awq_model_is_repacked_for_the_w4a16_kernels_once_loaded(monkeypatch):
    """Every AWQ layer gets AWQLinear.post_load (the repack for the W4A16 kernels; a no-op on the CPU) from the
    load path itself: without it a GPU model silently runs the slower AutoAWQ-layout kernels."""
    from qwen_awq.eval.synthetic import load_synthetic
    from qwen_awq.quant.linear import AWQLinear

    calls: list = []
    original = AWQLinear.post_load
    monkeypatch.setattr(AWQLinear, "post_load", lambda self, cpu=False: (calls.append(self), original(self, cpu)))
    model = load_synthetic("qwen-tiny", quant=True, device="cpu", layers=2)
    layers = [m for m in model.modules() if isinstance(m, AWQLinear)]
    assert len(layers) == 8 and calls == layers
    assert all(m.cache_dequantized and not m.repacked for m in layers)  # the CPU keeps AutoAWQ's tensors
