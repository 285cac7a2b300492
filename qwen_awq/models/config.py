"""Model, quantization and generation configs: the only place where a checkpoint's config keys are read.

Each family's reader (`read_qwen`, `read_llama`) turns config.json into a ModelConfig; models/family.py picks
the reader by architecture.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError

AWQ_VERSIONS = ("gemm",)
NTK_MAX_CONTEXT = 32768  # Qwen's dynamic-NTK / LogN reference stops here (spec: qwen.md)


@dataclass(frozen=True)
class QuantConfig:
    """What a checkpoint's quantization_config says: AutoAWQ settings (4-bit GEMM layout only). Which layer is
    built from it is quant/formats.py's business."""

    method: str = "awq"  # quant_method
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"

    def __post_init__(self) -> None:
        if self.method != "awq":
            raise ConfigError(f"quantization method {self.method!r} is not supported (only AWQ)")
        if self.bits != 4:
            raise ConfigError(f"AWQ checkpoints with {self.bits} bits are not supported (only 4-bit)")
        if self.version not in AWQ_VERSIONS:
            raise ConfigError(
                f"AWQ layout version {self.version!r} is not supported: only the GEMM layout is "
                "(re-export the model with AutoAWQ version='gemm')"
            )
        if not self.zero_point:
            raise ConfigError("AWQ checkpoints without zero points are not supported")
        if self.group_size <= 0 or self.group_size % 8:
            raise ConfigError(f"AWQ group_size must be a positive multiple of 8, got {self.group_size}")

    def to_json(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json as AutoAWQ writes it."""
        return {"quant_method": self.method, "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point, "version": self.version}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, for both families (Qwen v1 and Llama/Qwen2)."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # MLP width (Qwen v1: config intermediate_size // 2)
    rms_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    torch_dtype: str  # "bfloat16" | "float16" | "float32": the checkpoint's native dtype
    seq_length: int | None = None  # Qwen v1 trained context, used by dynamic NTK and LogN
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    use_cache_quantization: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quant: QuantConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if (self.use_dynamic_ntk or self.use_logn_attn) and not self.seq_length:
            raise ConfigError("use_dynamic_ntk/use_logn_attn need seq_length in config.json")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_length(self) -> int:
        """The longest sequence we serve: with dynamic NTK, where Qwen's reference stops; else the trained length
        (Qwen v1's seq_length; the Llama family has only max_position_embeddings)."""
        if self.use_dynamic_ntk:
            return NTK_MAX_CONTEXT
        return int(self.seq_length or self.max_position_embeddings)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a model folder needs config.json next to its weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _qwen_dtype(cfg: dict[str, Any]) -> str:
    """Qwen v1 stores its dtype as bf16/fp16/fp32 flags; all False means 'auto' (the weights' own dtype, bf16)."""
    for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        if cfg.get(flag):
            return name
    return cfg.get("torch_dtype") or "bfloat16"


def _quant_config(folder: Path, cfg: dict[str, Any]) -> QuantConfig | None:
    """Read `quantization_config` from config.json or quant_config.json, accepting both key spellings."""
    q = cfg.get("quantization_config")
    if q is None and (folder / "quant_config.json").exists():
        q = read_json(folder / "quant_config.json")
    if q is None:
        return None
    return QuantConfig(
        method=str(q.get("quant_method", "awq")).lower(),
        bits=int(q.get("bits", q.get("w_bit", 4))),
        group_size=int(q.get("group_size", q.get("q_group_size", 128))),
        zero_point=bool(q.get("zero_point", True)),
        version=str(q.get("version", "gemm")).lower(),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def read_qwen(arch: str, cfg: dict[str, Any], quant: QuantConfig | None) -> ModelConfig:
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("kv_channels", cfg["hidden_size"] // heads))
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"rotary_pct {cfg['rotary_pct']} is not supported (Qwen-7B uses 1.0)")
    return ModelConfig(
        architecture=arch, family="qwen", vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, intermediate_size=int(cfg["intermediate_size"]) // 2,
        rms_eps=float(cfg.get("layer_norm_epsilon", 1e-6)), rope_theta=float(cfg.get("rotary_emb_base", 10000)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", cfg.get("seq_length", 8192))),
        qkv_bias=True, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=_qwen_dtype(cfg), seq_length=int(cfg.get("seq_length", 8192)),
        use_dynamic_ntk=bool(cfg.get("use_dynamic_ntk", False)), use_logn_attn=bool(cfg.get("use_logn_attn", False)),
        use_cache_quantization=bool(cfg.get("use_cache_quantization", False)),
        bos_token_id=None, eos_token_ids=_eos_ids(cfg.get("eos_token_id", 151643)), quant=quant, raw=cfg,
    )


def read_llama(arch: str, cfg: dict[str, Any], quant: QuantConfig | None) -> ModelConfig:
    heads = int(cfg["num_attention_heads"])
    # transformers >= 5 writes rope_parameters; older configs have rope_theta and rope_scaling
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope type {rope_type!r} is not supported yet (only plain RoPE for this family)")
    return ModelConfig(
        architecture=arch, family="llama", vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg["intermediate_size"]), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_ids(cfg.get("eos_token_id")), quant=quant, raw=cfg,
    )


Reader = Callable[[str, dict[str, Any], QuantConfig | None], ModelConfig]


def read_config(folder: str | Path, readers: Mapping[str, Reader]) -> ModelConfig:
    """Build a ModelConfig from `folder/config.json` (and quant_config.json when present) with the reader of
    its first architecture found in `readers`."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    archs = cfg.get("architectures") or []
    known = [a for a in archs if a in readers]
    if not known:
        raise ConfigError(
            f"{folder / 'config.json'}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(readers)}"
        )
    try:
        return readers[known[0]](known[0], cfg, _quant_config(folder, cfg))
    except KeyError as e:
        raise ConfigError(f"{folder / 'config.json'} lacks the key {e.args[0]!r}") from None


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json values (None where absent); callers layer their own fallbacks on top."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_window_size: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "eos_token_ids"}

    def under(self, fallbacks: GenerationDefaults) -> GenerationDefaults:
        """These values, with `fallbacks` filling the ones this file lacks."""
        return replace(fallbacks, **self.as_dict(), eos_token_ids=self.eos_token_ids or fallbacks.eos_token_ids)


def load_generation_config(folder: str | Path) -> GenerationDefaults:
    path = Path(folder) / "generation_config.json"
    if not path.exists():
        return GenerationDefaults()
    g = read_json(path)
    pick = {k: g[k] for k in GenerationDefaults.__dataclass_fields__ if k in g and k != "eos_token_ids"}
    return GenerationDefaults(**pick, eos_token_ids=_eos_ids(g.get("eos_token_id")))
