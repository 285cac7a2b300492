"""`QwenAwqForCausalLM`: a transformers PreTrainedModel + GenerationMixin whose forward is our Decoder (and AWQ
kernels), loaded by qwen_awq.models.loader; no Python file of the folder is ever imported.

HF's generate, logits processors, streamers and pipelines run on top unchanged. The KV cache is a transformers
Cache holding our rotated keys (B, kv_heads, L, head_dim); Qwen's NTK alpha is fixed by the first forward's length.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from qwen_awq.chat import DEFAULT_SYSTEM, DEFAULT_WINDOW, History, make_context
from qwen_awq.errors import ConfigError
from qwen_awq.models.attention import ForwardBatch, RotatingAttention
from qwen_awq.models.decoder import Decoder
from qwen_awq.tokenizer import Tokenizer
from qwen_awq.transformers.configuration import QWenConfig

# transformers 5.2x renamed the cache argument and output field `past_key_values` -> `cache`; accept both.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ALPHA_ATTR = "qwen_awq_ntk_alpha"  # set on the Cache object at prefill: the sequence's NTK alpha for its lifetime


class CacheAttention(RotatingAttention):
    """Our attention seam over a transformers Cache: append this step's keys/values, attend with `mask`."""

    def __init__(self, cache: Any, batch: int, seqlen: int, mask: torch.Tensor | None) -> None:
        self.cache, self.batch, self.seqlen, self.mask = cache, batch, seqlen, mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, s = self.batch, self.seqlen
        k = k.view(b, s, *k.shape[1:]).transpose(1, 2)  # (B, kv_heads, S, D)
        v = v.view(b, s, *v.shape[1:]).transpose(1, 2)
        keys, values = self.cache.update(k, v, layer)  # (B, kv_heads, L, D), L = past + S
        q4 = q.view(b, s, *q.shape[1:]).transpose(1, 2)  # (B, heads, S, D)
        out = F.scaled_dot_product_attention(q4, keys, values, attn_mask=self.mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(q.shape)


def attention_mask_4d(attention_mask: torch.Tensor | None, b: int, s: int, past: int, device: torch.device
                      ) -> torch.Tensor | None:
    """Causal mask (S, L) or, with padding, (B, 1, S, L); None for one new token without padding."""
    total = past + s
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and s == 1:
        return None
    rows = torch.arange(past, total, device=device)[:, None]
    cols = torch.arange(total, device=device)[None, :]
    causal = cols <= rows  # (S, L)
    if not padded:
        return causal
    assert attention_mask is not None
    if attention_mask.dim() != 2:
        raise ValueError("only 2-D attention masks (batch, keys) are supported")
    keep = attention_mask[:, -total:].to(device=device, dtype=torch.bool)  # (B, L)
    mask = (causal[None] & keep[:, None, :]) | (cols == rows)[None]  # a padded query still sees itself
    return mask[:, None]  # (B, 1, S, L)


def _device(device_map: Any) -> str | torch.device:
    """device_map as transformers users pass it: None (CPU, transformers' default), "auto", "cpu", "cuda:0",
    an index, a torch.device, or a dict placing the whole model ({"": "cuda:0"})."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        places = set(device_map.values())
        if len(places) != 1:
            raise ConfigError("qwen-awq keeps the whole model on one device; pass device_map='cuda:0' or 'cpu'")
        device_map = places.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return device_map if isinstance(device_map, torch.device) else str(device_map)


def _is_awq(config: Any) -> bool:
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "awq"


def generation_config_for(folder: Path, config: Any, tokenizer: Tokenizer) -> GenerationConfig:
    """The folder's generation_config.json; eos becomes every turn-ending id (Qwen: all three, as our engine
    stops), pad the tokenizer's eos when the file names none."""
    if (folder / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(folder)
    else:
        gen = GenerationConfig.from_model_config(config)
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    gen.eos_token_id = sorted({*eos, *tokenizer.stop_token_ids, tokenizer.eos_token_id})
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.eos_token_id
    return gen


class QwenAwqForCausalLM(PreTrainedModel, GenerationMixin):
    """Qwen v1 (model_type "qwen", bf16 or AWQ) on our decoder; subclasses route Llama-family AWQ folders here."""

    config_class = QWenConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: Any, decoder: Decoder | None = None, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        if decoder is None or tokenizer is None:
            raise ConfigError(f"{type(self).__name__} is built by from_pretrained(folder): its weights come from the "
                              "folder through qwen-awq's loader")
        self.model = decoder
        self.qwen_tokenizer = tokenizer  # our tokenizer for the folder: chat() builds Qwen's prompt with it
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialize: the loader fills every tensor from the checkpoint."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config: Any = None,
                        device_map: Any = None, dtype: Any = None, torch_dtype: Any = None, **kwargs: Any):
        """Load a local folder with qwen_awq.models.loader. low_cpu_mem_usage is always on (tensors stream in);
        trust_remote_code is never needed and never runs the folder's code; hub and quantizer arguments are
        ignored."""
        from qwen_awq.models.loader import load_model, resolve_device
        from qwen_awq.threads import apply_thread_policy
        from qwen_awq.tokenizer import load_tokenizer

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a model folder (qwen-awq loads local folders; it never downloads)")
        config = config if config is not None else AutoConfig.from_pretrained(folder)
        device = resolve_device(_device(device_map))
        if device.type == "cpu":
            apply_thread_policy()
        chosen = dtype if dtype is not None else torch_dtype
        decoder = load_model(folder, dtype="auto" if chosen is None else chosen, device=device)
        tokenizer = load_tokenizer(folder)
        model = cls(config, decoder, tokenizer)
        model.generation_config = generation_config_for(folder, config, tokenizer)
        model.name_or_path = str(folder)
        return model.eval()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Any = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, S) -> logits (B, S, vocab) in fp32, plus the cache (our rotated keys) when use_cache."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__} takes input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else DynamicCache()
        b, s = input_ids.shape
        past, dev = cache.get_seq_length(), self.model.device
        if past == 0:
            setattr(cache, ALPHA_ATTR, self.model.prefill_alpha(s))
        alpha = getattr(cache, ALPHA_ATTR, self.model.prefill_alpha(past + s))
        positions = position_ids if position_ids is not None else torch.arange(past, past + s).expand(b, s)
        mask = attention_mask_4d(attention_mask, b, s, past, dev)
        fb = ForwardBatch(positions=positions.to(dev).reshape(-1), ntk_alpha=torch.full((b * s,), alpha, device=dev),
                          attn=CacheAttention(cache, b, s, mask))
        hidden = self.model.forward_tokens(input_ids.to(dev).reshape(-1), fb).view(b, s, -1)  # (B, S, hidden)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.model.compute_logits(hidden)  # (B, S', vocab) fp32
        loss = None
        if labels is not None:  # next-token cross-entropy, -100 ignored (transformers' convention)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].to(dev).reshape(-1))
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        return out.to_tuple() if return_dict is False else out

    def chat(self, tokenizer: Any, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
             generation_config: GenerationConfig | None = None, **kwargs: Any) -> tuple[str, History]:
        """Qwen's `model.chat`: its ChatML prompt and history window, HF generate, the reply up to the turn's end."""
        gen = generation_config or self.generation_config
        window = getattr(gen, "max_window_size", None) or DEFAULT_WINDOW
        _, ids = make_context(self.qwen_tokenizer, query, history, system, window)
        out = self.generate(torch.tensor([ids], device=self.device), generation_config=generation_config, **kwargs)
        reply = out[0, len(ids):].tolist()
        eos = kwargs.get("eos_token_id", gen.eos_token_id)
        stops = {eos} if isinstance(eos, int) else set(eos or ())
        end = next((i for i, t in enumerate(reply) if t in stops), len(reply))
        response = tokenizer.decode(reply[:end], skip_special_tokens=True).strip()
        return response, [*(history or []), (query, response)]


def llama_family_class(config_class: type, native_class: type) -> type:
    """QwenAwqForCausalLM for `config_class`: AWQ folders load on our decoder and kernels; the rest keep
    transformers' own `native_class` (exact, and nothing of ours is needed)."""

    class Routed(QwenAwqForCausalLM):
        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config: Any = None,
                            **kwargs: Any):
            config = config if config is not None else AutoConfig.from_pretrained(pretrained_model_name_or_path)
            if not _is_awq(config):
                return native_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=config,
                                                    **kwargs)
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

        @classmethod
        def _from_config(cls, config: Any, **kwargs: Any):
            return native_class._from_config(config, **kwargs)

    Routed.config_class = config_class
    Routed.__name__ = Routed.__qualname__ = f"QwenAwq{native_class.__name__}"
    return Routed
