"""The benchmark peers compute the same model as our decoder (else a speed ratio against them means nothing)."""
from __future__ import annotations

import torch

from qwen_awq.eval.peers import StaticPeer, copy_from_decoder, dense_linear, peer_greedy, time_peer, weight_bytes
from qwen_awq.eval.synthetic import build_synthetic, synthetic_config


def test_static_peer_matches_the_decoder_token_for_token():
    model = build_synthetic("qwen-tiny", quant=False, dtype=torch.float32, device="cpu", seed=1)
    torch.nn.init.normal_(model.layers[0].attn.qkv_proj.bias, std=0.1)  # the bias path must be exercised
    peer = StaticPeer(model.cfg, dense_linear(torch.float32, torch.device("cpu")), batch=2, max_len=16,
                      dtype=torch.float32, device=torch.device("cpu"))
    copy_from_decoder(peer, model)
    first = torch.tensor([[5], [77]])
    peer_ids = peer_greedy(peer, first, 10)  # (2, 10) through the static cache
    ids = first
    for _ in range(10):  # independent oracle: full recompute with our decoder, no cache
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(peer_ids, ids[:, 1:])
    pos = torch.arange(ids.shape[1] - 1)
    fresh = StaticPeer(model.cfg, dense_linear(torch.float32, torch.device("cpu")), 2, 16, torch.float32,
                       torch.device("cpu"))
    copy_from_decoder(fresh, model)
    torch.testing.assert_close(fresh(ids[:, :-1], pos), model(ids[:, :-1]), rtol=1e-4, atol=1e-4)


def test_weight_bytes_are_the_spec_floors():
    cfg = synthetic_config("qwen-7b", None)
    assert abs(weight_bytes(cfg, int4=True) / 1e9 - 4.610) < 0.005  # spec: performance.md, W4 g128 + fp16 lm_head
    assert abs(weight_bytes(cfg, int4=False) / 1e9 - 14.198) < 0.005


def test_compiled_peer_is_timed_and_decodes_like_the_eager_one():
    """The GPU benchmark times the peer under torch.compile (reduce-overhead); the compiled module must go through
    the same greedy loop (a compiled module has no truth value: `step or peer` raised on the H200)."""
    model = build_synthetic("qwen-tiny", quant=False, dtype=torch.float32, device="cpu", seed=2)
    cpu = torch.device("cpu")
    peer = StaticPeer(model.cfg, dense_linear(torch.float32, cpu), 1, 8, torch.float32, cpu)
    copy_from_decoder(peer, model)
    result = time_peer(peer, batch=1, new_tokens=8, runs=1, compile=True)
    assert result["compiled"] and result["tokens"] == 8 and result["out_tok_per_s"] > 0
    first = torch.tensor([[1]])
    compiled = torch.compile(peer, mode="reduce-overhead", fullgraph=True)
    assert torch.equal(peer_greedy(peer, first, 8, compiled), peer_greedy(peer, first, 8))
