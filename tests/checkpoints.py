"""Random-weight checkpoints in the exact published layouts, and their transformers twins for cross-checking."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# Keys of Qwen/Qwen-7B-Chat's config.json, shrunk; seq_length is small so NTK/LogN are cheap to exercise.
QWEN_TINY = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 256, "kv_channels": 16,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 4, "num_hidden_layers": 2, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 64, "softmax_in_fp32": False,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
    "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": True,
    "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}
QWEN_GENERATION = {
    "chat_format": "chatml", "do_sample": True, "eos_token_id": 151643, "max_new_tokens": 512,
    "max_window_size": 6144, "pad_token_id": 151643, "repetition_penalty": 1.1, "top_k": 0, "top_p": 0.8,
    "transformers_version": "4.31.0",
}


def _rand(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.05) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def qwen_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with Qwen v1's exact names and [out, in] shapes."""
    gen = torch.Generator().manual_seed(seed)
    h, v, mlp = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2
    proj = cfg["num_attention_heads"] * cfg["kv_channels"]
    sd = {"transformer.wte.weight": _rand((v, h), gen, 0.5), "lm_head.weight": _rand((v, h), gen, 0.2),
          "transformer.ln_f.weight": 1 + _rand((h,), gen, 0.1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd |= {
            p + "ln_1.weight": 1 + _rand((h,), gen, 0.1), p + "ln_2.weight": 1 + _rand((h,), gen, 0.1),
            p + "attn.c_attn.weight": _rand((3 * proj, h), gen, 0.2), p + "attn.c_attn.bias": _rand((3 * proj,), gen),
            p + "attn.c_proj.weight": _rand((h, proj), gen, 0.1), p + "mlp.w1.weight": _rand((mlp, h), gen, 0.1),
            p + "mlp.w2.weight": _rand((mlp, h), gen, 0.1), p + "mlp.c_proj.weight": _rand((h, mlp), gen, 0.1),
        }
    return sd


def write_qwen_checkpoint(folder: Path, vocab: Path, overrides: dict | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16, shards: int = 1) -> Path:
    """A tiny Qwen v1 folder: real config keys, bf16 safetensors (optionally sharded + index), qwen.tiktoken."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = QWEN_TINY | (overrides or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(QWEN_GENERATION, indent=2))
    shutil.copy(vocab, folder / "qwen.tiktoken")
    sd = {k: t.to(dtype).contiguous() for k, t in qwen_state_dict(cfg, seed).items()}
    _save_sharded(sd, folder, shards)
    return folder


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def hf_qwen2_twin(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' Qwen2ForCausalLM holding the same weights as the Qwen v1 folder (renamed, c_attn split)."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd |= load_file(str(f))
    h, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    hf_cfg = Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=h, intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hd, rms_norm_eps=cfg["layer_norm_epsilon"], max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rotary_emb_base"])},
        tie_word_embeddings=False, use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
    new = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            new[q + f"self_attn.{name}.weight"] = w[j * heads * hd:(j + 1) * heads * hd]
            new[q + f"self_attn.{name}.bias"] = b[j * heads * hd:(j + 1) * heads * hd]
        new |= {q + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
                q + "mlp.gate_proj.weight": sd[p + "mlp.w2.weight"], q + "mlp.up_proj.weight": sd[p + "mlp.w1.weight"],
                q + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"],
                q + "input_layernorm.weight": sd[p + "ln_1.weight"],
                q + "post_attention_layernorm.weight": sd[p + "ln_2.weight"]}
    model.load_state_dict({k: v.to(dtype) for k, v in new.items()}, strict=True)
    return model


def write_llama_checkpoint(folder: Path, seed: int = 0, tied: bool = False, vocab_size: int = 512,
                           overrides: dict | None = None):
    """A tiny GQA Llama folder written by transformers itself; returns the transformers model (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=tied,
                    bos_token_id=1, eos_token_id=2)
    cfg = LlamaConfig(**settings | (overrides or {}))
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + p.numel()))
        for layer in model.model.layers:
            layer.input_layernorm.weight.add_(1.0)
            layer.post_attention_layernorm.weight.add_(1.0)
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(folder)
    return model
