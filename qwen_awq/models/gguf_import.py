"""Convert a llama.cpp GGUF file (architecture "llama") into a Hugging Face Llama folder in the user cache.

Weights are dequantized to fp32 with the `gguf` package; the tokenizer is rebuilt from the GGUF metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from qwen_awq.assets import cache_dir
from qwen_awq.errors import CheckpointError, ConfigError, TokenizerError
from qwen_awq.models.shards import INDEX_FILE, MAX_SHARD_BYTES, WEIGHTS_FILE, build_atomically, write_sharded

# Bump when the written folder changes, so stale cache entries are not reused.
FORMAT_VERSION = "1"
SHARD_BYTES = MAX_SHARD_BYTES  # read at each import, so tests can patch it to force several shards
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

# GGUF tensor name -> HF Llama name (llama.cpp's gguf-py/gguf/tensor_mapping.py naming).
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# tokenizer.ggml.pre -> split regex run before byte-level BPE (llama.cpp src/llama-vocab.cpp). "smollm"
# isolates every digit first, then applies GPT-2's regex, as SmolLM2's own tokenizer.json does.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_SPLITS: dict[str, list[str]] = {
    "default": [GPT2_SPLIT], "gpt2": [GPT2_SPLIT], "smollm": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT], "qwen2": [QWEN2_SPLIT],
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp's llama_token_type values


@dataclass
class GgufLlamaParams:
    """The hyperparameters of a llama-architecture GGUF, read from its `llama.*` metadata."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int

    def __post_init__(self) -> None:
        if min(self.num_hidden_layers, self.hidden_size, self.num_attention_heads, self.head_dim) <= 0:
            raise ConfigError(f"GGUF hyperparameters must be positive, got {self}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"GGUF head_count {self.num_attention_heads} is not a multiple of "
                              f"head_count_kv {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"GGUF rope dimension {self.head_dim} must be even")

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], n_vocab: int) -> GgufLlamaParams:
        def need(key: str) -> Any:
            if f"llama.{key}" not in meta:
                raise ConfigError(f"GGUF metadata lacks llama.{key}; the file is not a complete llama model")
            return meta[f"llama.{key}"]
        heads, hidden = need("attention.head_count"), need("embedding_length")
        return cls(
            num_hidden_layers=need("block_count"), hidden_size=hidden,
            intermediate_size=need("feed_forward_length"), num_attention_heads=heads,
            num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
            head_dim=meta.get("llama.rope.dimension_count", hidden // heads),
            rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
            # 10000 is llama.cpp's default freq_base when the key is absent
            rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=need("context_length"), vocab_size=meta.get("llama.vocab_size", n_vocab),
        )


def _f32(value: float) -> float:
    """GGUF stores float32; its shortest repr gives back the config value (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def import_gguf(gguf_path: Path, out_dir: Path | None = None, progress: bool = True) -> Path:
    """Convert `gguf_path` into an HF Llama folder (fp32 safetensors + tokenizer) and return the folder."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {gguf_path} does not exist")
    if out_dir is None:
        out_dir = cache_dir() / "models" / f"{gguf_path.stem}-{_content_hash(gguf_path)}"
    out_dir = Path(out_dir)
    if out_dir.exists():
        if _is_complete(out_dir):
            return out_dir
        raise CheckpointError(f"{out_dir} exists but is an incomplete GGUF import; remove it or pick another")
    reader = _open(gguf_path)
    with build_atomically(out_dir) as tmp:
        _convert(reader, gguf_path, tmp, progress)
        try:
            os.replace(tmp, out_dir)  # atomic: readers see no folder or a whole one
        except OSError:
            if not _is_complete(out_dir):  # a concurrent import that finished first is fine
                raise
    return out_dir


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _is_complete(folder: Path) -> bool:
    has_weights = (folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file()
    return has_weights and all((folder / name).is_file() for name in FOLDER_FILES)


def _open(gguf_path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(gguf_path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{gguf_path} is not a readable GGUF file ({exc})") from exc


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _convert(reader: gguf.GGUFReader, gguf_path: Path, out: Path, progress: bool) -> None:
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{gguf_path.name} has no tokenizer.ggml.tokens; cannot build a tokenizer")
    params = GgufLlamaParams.from_metadata(meta, len(tokens))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    _write_json(out / "config.json", _hf_config(params, meta, tied))
    _write_json(out / "generation_config.json", _special_ids(meta))
    _build_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta, params))
    write_sharded(_hf_tensors(reader, params, progress), out, SHARD_BYTES)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "pad_token_id": "padding_token_id"}
    return {hf: meta[f"tokenizer.ggml.{k}"] for hf, k in keys.items() if f"tokenizer.ggml.{k}" in meta}


def _hf_config(params: GgufLlamaParams, meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"GGUF rope scaling {scaling!r} is not supported yet (only plain RoPE)")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **vars(params),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tied, "torch_dtype": "float32", **_special_ids(meta),
    }


def _tokenizer_config(meta: dict[str, Any], params: GgufLlamaParams) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
             "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    config: dict[str, Any] = {
        name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in names.items()
        if f"tokenizer.ggml.{key}" in meta
    }
    config |= {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": params.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary and merges (tokenizer.ggml.model "gpt2")."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    if pre not in PRE_SPLITS:
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(PRE_SPLITS)}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Control tokens (<|im_start|>...) are matched whole before splitting, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind_ in zip(tokens, types, strict=True) if kind_ == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind_ in zip(tokens, types, strict=True) if kind_ == TOKEN_USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tok


def _hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Llama equivalent; file not supported")
    return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's `permute`, which interleaves each head's two rotary halves.

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates halves (x_i, x_{i+D/2}); the converter reorders
    rows per head from [half, pair] to [pair, half]. This reorders them back.
    """
    rows, cols = weight.shape  # (n_head * head_dim, hidden)
    w = weight.reshape(n_head, rows // n_head // 2, 2, cols)  # (heads, head_dim/2, pair, hidden)
    return w.transpose(1, 2).reshape(rows, cols)


def _dequantize(tensor: gguf.ReaderTensor, params: GgufLlamaParams) -> torch.Tensor:
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        kind = tensor.tensor_type.name
        raise CheckpointError(f"GGUF tensor {tensor.name} has unsupported type {kind}") from exc
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dims fastest-first, torch the reverse
    weight = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    if tensor.name.endswith("attn_q.weight"):
        weight = unpermute_qk(weight, params.num_attention_heads)
    elif tensor.name.endswith("attn_k.weight"):
        weight = unpermute_qk(weight, params.num_key_value_heads)
    return weight.contiguous()


def _hf_tensors(reader: gguf.GGUFReader, params: GgufLlamaParams, progress: bool
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) pairs, dequantized one at a time so only the shard being written is in memory."""
    for tensor in tqdm(reader.tensors, desc="GGUF -> safetensors", unit="tensor", disable=not progress):
        weight = _dequantize(tensor, params)  # before naming: an unsupported type is reported first, as before
        yield _hf_name(tensor.name), weight
