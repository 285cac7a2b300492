"""Batch-1 decode and batch-32 throughput of random Qwen-7B-shaped models on the GPU, with HF transformers as peer.

Speed does not depend on weight values, so the models are built in memory with random weights of the real shapes
(spec: performance.md). Usage: python bench/gpu_decode.py --out results.json [--tokens 256] [--skip-hf]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from qwen_awq.engine.sampling_params import SamplingParams  # noqa: E402
from qwen_awq.models.decoder import Decoder  # noqa: E402
from qwen_awq.models.family import load_config  # noqa: E402

QWEN_7B = {"architectures": ["QWenLMHeadModel"], "hidden_size": 4096, "intermediate_size": 22016, "kv_channels": 128,
           "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "num_attention_heads": 32,
           "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 8192,
           "use_dynamic_ntk": True, "use_logn_attn": True, "vocab_size": 151936, "bf16": True}


def qwen7b(quant: bool, dtype: torch.dtype) -> Decoder:
    cfg = dict(QWEN_7B)
    if quant:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        mcfg = load_config(d)
    with torch.device("cuda"):
        model = Decoder(mcfg, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == torch.int32:
                t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=gen, device="cuda", dtype=torch.int64))
            elif name.endswith("scales"):
                t.uniform_(0.001, 0.01, generator=gen)
            else:
                t.normal_(0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def engine_decode(model: Decoder, tok, tokens: int, batch: int, eager: bool) -> dict:
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=tokens + 16, max_num_seqs=max(batch, 1),
                                                kv_cache_memory=6 << 30, enforce_eager=eager))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

    def run(n_tokens: int) -> float:
        p = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{time.perf_counter()}-{i}", [1 + i], p)
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(8)  # warm-up
    times = sorted(run(params.max_tokens) for _ in range(3))
    return {"batch": batch, "new_tokens": tokens, "median_s": times[1], "out_tok_per_s": batch * tokens / times[1],
            "cuda_graphs": not eager, "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def hf_decode(tokens: int, batch: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).half().eval()
    ids = torch.ones((batch, 1), dtype=torch.long, device="cuda")
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"batch": batch, "new_tokens": tokens, "median_s": elapsed, "out_tok_per_s": batch * tokens / elapsed,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", required=True, help="qwen.tiktoken")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    from qwen_awq.tokenizer import QwenTokenizer

    tok = QwenTokenizer(args.vocab)
    rows = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_hf:
        rows["hf_fp16_eager_b1"] = hf_decode(args.tokens, 1)
        print(rows["hf_fp16_eager_b1"], flush=True)
    for name, quant, dtype in (("ours_fp16", False, torch.float16), ("ours_awq", True, torch.float16)):
        torch.cuda.reset_peak_memory_stats()
        model = qwen7b(quant, dtype)
        for batch, eager in ((1, True), (1, False), (32, False)):
            key = f"{name}_b{batch}_{'eager' if eager else 'graphs'}"
            rows[key] = engine_decode(model, tok, args.tokens, batch, eager)
            print(key, rows[key], flush=True)
        del model
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
