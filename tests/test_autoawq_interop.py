"""A checkpoint written by AutoAWQ 0.2.9 itself (its full quantize + save_quantized on a tiny Llama) loads in
qwen-awq and computes what transformers computes with AutoAWQ's own dequantization of the same tensors."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings

import pytest
import torch
from checkpoints import write_llama_checkpoint
from safetensors import safe_open

from qwen_awq.models.loader import load_model

G = 32


def _import_autoawq():
    """AutoAWQForCausalLM and dequantize_gemm. AutoAWQ imports `datasets` only to download calibration sets (we
    pass token ids), and on import resets the warning filters and warns that it is deprecated: both undone here."""
    # record=True: the notice lands in a list dropped here (AutoAWQ's own "default" filter would beat an "ignore").
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True):
        mp.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None))
        from awq import AutoAWQForCausalLM
        from awq.utils.packing_utils import dequantize_gemm
    return AutoAWQForCausalLM, dequantize_gemm


@pytest.fixture(scope="module")
def autoawq_folder(tmp_path_factory):
    if importlib.util.find_spec("awq") is None:  # a test asset like the others: fail, never skip
        pytest.fail("the AutoAWQ oracle is not installed: pip install --no-deps autoawq==0.2.9")
    AutoAWQForCausalLM, dequantize_gemm = _import_autoawq()
    root = tmp_path_factory.mktemp("autoawq")
    # AutoAWQ's clip search takes output rows 64 at a time, so every clipped Linear needs a multiple of 64.
    write_llama_checkpoint(root / "src", seed=3, overrides={"intermediate_size": 192, "num_key_value_heads": 8})
    model = AutoAWQForCausalLM.from_pretrained(str(root / "src"), torch_dtype=torch.float32, device_map="cpu")
    calib = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    model.quantize(None, quant_config={"zero_point": True, "q_group_size": G, "w_bit": 4, "version": "GEMM"},
                   calib_data=calib.tolist(), max_calib_samples=4, max_calib_seq_len=16,
                   n_parallel_calib_samples=None)
    model.save_quantized(str(root / "awq"))
    return root / "awq", dequantize_gemm


def _transformers_on_autoawq_weights(folder, dequantize_gemm):
    """LlamaForCausalLM (fp32) holding the folder's tensors, quantized ones dequantized by AutoAWQ's code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    state = {}
    for name, t in tensors.items():
        prefix, kind = name.rsplit(".", 1)
        if kind == "qweight":  # fp32 scales: AutoAWQ's fp16 product would round (q - z) * s
            wt = dequantize_gemm(t, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"].float(), 4, G)
            state[f"{prefix}.weight"] = wt.t()  # (K, N) -> nn.Linear's (N, K)
        elif kind not in ("qzeros", "scales"):
            state[name] = t.float()
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def test_autoawq_written_checkpoint_matches_transformers(autoawq_folder):
    folder, dequantize_gemm = autoawq_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] | {"modules_to_not_convert": None} == {
        "quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None}
    ours = load_model(folder, dtype=torch.float32, device="cpu")
    hf = _transformers_on_autoawq_weights(folder, dequantize_gemm)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1  # real, varied logits, not a degenerate model


def test_our_checkpoint_matches_transformers_on_autoawq_dequantization(autoawq_folder, tmp_path):
    """The other direction on the CPU: a folder our quantizer wrote, unpacked by AutoAWQ's own dequantize_gemm
    into transformers' Llama, computes our logits (names, unfused parts, configs and bit layout end to end)."""
    from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

    _, dequantize_gemm = autoawq_folder
    write_llama_checkpoint(tmp_path / "src", seed=5)
    calib = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    out = quantize_model(tmp_path / "src", tmp_path / "awq", QuantizeConfig(group_size=G, samples=4, seqlen=16,
                         micro_batch=2, search_samples=2), calib=calib, progress=False)
    hf = _transformers_on_autoawq_weights(out, dequantize_gemm)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(load_model(out, dtype=torch.float32, device="cpu")(ids), expected,
                               rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="AutoAWQ runs GEMM checkpoints only on a GPU (its CPU path needs IPEX): "
                           "run with QWEN_AWQ_TEST_DEVICE=cuda on a GPU machine")
def test_autoawq_loads_our_checkpoint(tmp_path):
    """The other direction, end to end: AutoAWQ's from_quantized reads a folder our quantizer wrote, and its
    own GPU kernels compute the same logits as ours."""
    from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

    src = tmp_path / "src"
    write_llama_checkpoint(src, seed=4, overrides={"hidden_size": 256, "intermediate_size": 768,
                                                   "num_attention_heads": 4, "num_key_value_heads": 4})
    calib = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    out = quantize_model(src, tmp_path / "awq", QuantizeConfig(group_size=128, samples=4, seqlen=16, micro_batch=2,
                                                               search_samples=2), calib=calib, progress=False)
    AutoAWQForCausalLM, _ = _import_autoawq()
    theirs = AutoAWQForCausalLM.from_quantized(str(out), device_map={"": "cuda:0"}, torch_dtype=torch.float16,
                                               fuse_layers=False)
    ours = load_model(out, dtype=torch.float16, device="cuda")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        expected = theirs.model(ids).logits.float()
        got = ours(ids).float()
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
