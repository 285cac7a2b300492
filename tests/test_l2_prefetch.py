"""The L2 prefetch chain of a decode step (kernels/l2_prefetch.py): the matrices in launch order, no effect off the
GPU, and on the GPU (QWEN_AWQ_TEST_DEVICE=cuda) a captured decode forward whose logits are bit-identical with the
prefetch on (both fork points) and off, with every hook removed afterwards."""
from __future__ import annotations

import pytest
import torch
from assets import DEVICE

from qwen_awq.errors import ConfigError
from qwen_awq.eval.synthetic import build_synthetic, prepare
from qwen_awq.kernels.l2_prefetch import PrefetchConfig, decode_chain, prefetching, weights_of
from qwen_awq.models.attention import DenseAttention, ForwardBatch


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_chain_is_every_projection_in_launch_order_then_the_lm_head():
    model = build_synthetic("qwen-tiny", quant=True, dtype=torch.float16, device="cpu", layers=2)
    chain = decode_chain(model)
    a, b = model.layers
    assert chain == [a.attn.qkv_proj, a.attn.o_proj, a.mlp.gate_up_proj, a.mlp.down_proj,
                     b.attn.qkv_proj, b.attn.o_proj, b.mlp.gate_up_proj, b.mlp.down_proj, model.lm_head]
    assert weights_of(model.lm_head) == [model.lm_head.weight]
    layer = a.attn.qkv_proj
    assert weights_of(layer) == []  # AutoAWQ layout: the kernels stream nothing until the repack
    layer.post_load(cpu=True)
    assert [t.data_ptr() for t in weights_of(layer)] == [layer.qweight_t.data_ptr(), layer.scale_zero.data_ptr()]
    assert weights_of(model.layers[0].input_layernorm) == []  # a 1-d weight is no matrix


@pytest.mark.parametrize("mode, mb, blocks", [("sideways", 16.0, 32), ("during", 0.0, 32), ("after", -1.0, 32),
                                              ("after", 8.0, 0)])
def test_config_rejects_unknown_modes_empty_budgets_and_grids(mode, mb, blocks):
    with pytest.raises(ConfigError, match="QWEN_AWQ_L2_PREFETCH"):
        PrefetchConfig(mode, mb, blocks=blocks)


def test_environment_sets_the_config(monkeypatch):
    monkeypatch.setenv("QWEN_AWQ_L2_PREFETCH", "after")
    monkeypatch.setenv("QWEN_AWQ_L2_PREFETCH_MB", "24")
    monkeypatch.setenv("QWEN_AWQ_L2_PREFETCH_BULK", "0")
    monkeypatch.setenv("QWEN_AWQ_L2_PREFETCH_BLOCKS", "8")
    monkeypatch.setenv("QWEN_AWQ_L2_PREFETCH_LAST", "1")
    assert PrefetchConfig.from_env() == PrefetchConfig("after", 24.0, False, 8, True)
    monkeypatch.setenv("QWEN_AWQ_L2_PREFETCH", "always")
    with pytest.raises(ConfigError, match="during, after"):
        PrefetchConfig.from_env()


def _forward(model, ids):
    fb = ForwardBatch(positions=torch.arange(ids.numel(), device=ids.device),
                      ntk_alpha=torch.ones(ids.numel(), device=ids.device), attn=DenseAttention(1, ids.numel()))
    return model.compute_logits(model.forward_tokens(ids, fb))


def test_off_the_gpu_nothing_is_hooked():
    model = build_synthetic("qwen-tiny", quant=False, dtype=torch.float32, device="cpu", layers=1)
    ids = torch.tensor([5, 9, 2])
    want = _forward(model, ids)
    with prefetching(model, PrefetchConfig("during")):
        assert _hooks(model) == 0
        got = _forward(model, ids)
    assert torch.equal(got, want)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="the prefetch kernel and CUDA graphs need a GPU "
                                                          "(QWEN_AWQ_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize("cfg", [PrefetchConfig("during", 0.25), PrefetchConfig("after", 64.0, evict_last=True),
                                 PrefetchConfig("during", 1.0, bulk=False, blocks=3)])
def test_captured_forward_with_prefetch_equals_the_plain_one(quant, cfg):
    model = prepare(build_synthetic("qwen-tiny", quant=quant, dtype=torch.float16, device="cuda", layers=2))
    ids = torch.tensor([7], device="cuda")
    with torch.inference_mode():
        want = _forward(model, ids).clone()
        with prefetching(model, cfg):
            assert _hooks(model) == 2 * len(decode_chain(model))
            _forward(model, ids)  # warm-up: compiles outside the capture
        torch.cuda.synchronize()
        graph, out = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graph):
            with prefetching(model, cfg):
                out = _forward(model, ids)
        graph.replay()
        torch.cuda.synchronize()
    assert _hooks(model) == 0
    assert torch.equal(out, want)
