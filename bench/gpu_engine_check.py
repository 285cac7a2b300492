"""GPU check of the engine's attention fast path (issue 12): fused rotary + KV write, paged decode / chunked-prefill
kernels and one CUDA graph per batch size, against an eager dense greedy loop on small random fp16 models.

    python3 bench/gpu_engine_check.py [--out FILE]      (repo root on PYTHONPATH; < 60 s on an H200)

Models: a Qwen v1 (MHA, LogN and dynamic NTK active: seq_length 64) and a GQA Llama (8 heads, 2 kv heads). Workload:
ragged prompts arriving every other step (mixed prefill + decode steps), chunked prefill, a prefix-cache hit.
Checks: graphed engine == eager engine == the dense oracle (token for token), and the same with int8 KV for the
engine alone (graphed == eager; int8 has no dense oracle here). fp16 rounding differs between the kernels and SDPA,
so a divergence counts as a mismatch only where the oracle's top-2 logit margin there exceeds NEAR_TIE (a real
bug moves tokens far from ties). Prints one JSON line; exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.models.decoder import Decoder
from qwen_awq.models.family import load_config

NEAR_TIE = 0.05  # logits: fp16 attention rounding moves logits by ~1e-3 at these scales
MAX_TOKENS = 16
QWEN = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 256, "intermediate_size": 1024,
        "kv_channels": 64, "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "num_attention_heads": 4,
        "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 64,
        "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": 4096, "no_bias": True,
        "tie_word_embeddings": False, "fp16": True, "eos_token_id": 0}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
         "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "vocab_size": 4096, "max_position_embeddings": 1024, "tie_word_embeddings": False,
         "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}


def build(config: dict, seed: int, device: str) -> Decoder:
    """Random fp16 weights on the GPU, scaled so that logits have clear gaps (std 0.02 would tie everywhere)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config))
        cfg = load_config(d)
    with torch.device(device):
        model = Decoder(cfg, torch.float16)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.5 if "embed" in name else 0.08, generator=gen)
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def dense_logits(model: Decoder, ids: list[int], alpha: float) -> torch.Tensor:
    """fp32 logits (V,) of the last token: the whole sequence recomputed, no cache (the NTK alpha of the prompt)."""
    n, dev = len(ids), model.device
    fb = ForwardBatch(torch.arange(n, device=dev), torch.full((n,), alpha, device=dev), DenseAttention(1, n))
    return model.compute_logits(model.forward_tokens(torch.tensor(ids, device=dev), fb)[-1]).float()


def dense_greedy(model: Decoder, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the top-2 logit margin."""
    alpha, ids, margins = model.prefill_alpha(len(prompt)), list(prompt), []
    for _ in range(MAX_TOKENS):
        top = dense_logits(model, ids, alpha).topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        ids.append(int(top.indices[0]))
    return ids[len(prompt):], margins


def workload(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 37, 100, 70, 150)]
    return prompts + [prompts[2] + [7, 8, 9]]  # a prefix-cache hit on the 100-token prompt


def run_engine(model: Decoder, prompts: list[list[int]], **kw) -> tuple[list[list[int]], int]:
    """Greedy tokens of the engine, request i arriving before step 2i; and the number of graph replays."""
    config = EngineConfig(**({"max_num_seqs": 8, "max_model_len": 512, "kv_cache_memory": 2**26, "block_size": 16,
                              "max_num_batched_tokens": 64} | kw))
    engine = LLMEngine(model, None, config)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    done, step, pending = {}, 0, list(enumerate(prompts))
    while pending or engine.has_unfinished():
        while pending and pending[0][0] * 2 <= step:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    graphs = engine.runner.graphs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "KV blocks leaked"
    return [done[str(i)] for i in range(len(prompts))], graphs.replays if graphs is not None else 0


def divergences(got: list[list[int]], ref: list[list[int]], margins: list[list[float]] | None) -> list[dict]:
    """Per prompt that differs: where, and the oracle's margin there (a near tie is reported, not failed)."""
    out = []
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            margin = margins[i][at] if margins is not None and at < len(margins[i]) else None
            out.append({"prompt": i, "at": at, "margin": margin,
                        "fail": margin is None or margin >= NEAR_TIE})
    return out


def check(name: str, config: dict, device: str) -> dict:
    model = build(config, 1, device)
    prompts = workload(model.cfg.vocab_size)
    ref = [dense_greedy(model, p) for p in prompts]
    ref_tokens, margins = [r[0] for r in ref], [r[1] for r in ref]
    graphed, replays = run_engine(model, prompts)
    eager, _ = run_engine(model, prompts, enforce_eager=True)
    int8_graphed, int8_replays = run_engine(model, prompts, kv_cache_dtype="int8")
    int8_eager, _ = run_engine(model, prompts, kv_cache_dtype="int8", enforce_eager=True)
    agree = sum(a == b for x, y in zip(int8_graphed, ref_tokens, strict=True) for a, b in zip(x, y, strict=True))
    report = {"graphed_vs_dense": divergences(graphed, ref_tokens, margins),
              "eager_vs_dense": divergences(eager, ref_tokens, margins),
              "int8_graphed_vs_eager": divergences(int8_graphed, int8_eager, None),
              "graph_replays": replays, "int8_graph_replays": int8_replays,
              "int8_agrees_with_fp16_tokens": agree / (len(prompts) * MAX_TOKENS)}
    failed = any(d["fail"] for key in ("graphed_vs_dense", "eager_vs_dense", "int8_graphed_vs_eager")
                 for d in report[key]) or device == "cuda" and (replays == 0 or int8_replays == 0)
    return {"model": name, "ok": not failed, **report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON summary here")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (no graphs, no kernels)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 1
    start = time.perf_counter()
    results = [check("qwen-v1-mha-logn", QWEN, args.device), check("llama-gqa", LLAMA, args.device)]
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    summary = {"check": "gpu_fastpath", "ok": all(r["ok"] for r in results),
               "seconds": round(time.perf_counter() - start, 1), "device": device,
               "results": results}
    line = json.dumps(summary)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
