"""The simple generation path: a batch of equal-length prompts advancing together through a contiguous KV cache.

`generate` is HF-like (ids in, ids out, optional HF-style streamer); `TextStream` yields text pieces for one prompt.
The engine (engine/) serves many requests at once; its greedy output equals this path token for token.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qwen_awq.engine.output import OutputTracker, eos_ids, row_stop_ids
from qwen_awq.engine.sampler import SampleOutput, SamplingBatch, make_generator, sample
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ContextLengthError
from qwen_awq.models.attention import ContiguousKVCache, ForwardBatch
from qwen_awq.models.decoder import Decoder
from qwen_awq.tokenizer import Tokenizer

# Qwen-7B-Chat's generation_config.json values, used when a Qwen folder lacks the file (spec: qwen.md).
QWEN_FALLBACKS = {"do_sample": True, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "max_new_tokens": 512}
HF_NAMES = ("do_sample", "max_new_tokens", "min_new_tokens")


def default_params(model: Decoder, **overrides: Any) -> SamplingParams:
    """The model's generation_config.json defaults (Qwen fallbacks for Qwen folders), then the caller's values.

    Accepts HF names (max_new_tokens, do_sample, min_new_tokens) as well as SamplingParams' own names.
    """
    gen = dict(QWEN_FALLBACKS) if model.cfg.family == "qwen" else {}
    gen |= model.generation_config.as_dict()
    gen |= {k: overrides.pop(k) for k in HF_NAMES if overrides.get(k) is not None}
    if overrides.get("temperature") is not None and gen.get("do_sample") is False and overrides["temperature"] > 0:
        gen["do_sample"] = True
    return SamplingParams.from_generation_config(gen, **overrides)


def check_length(model: Decoder, prompt_len: int, max_new: int) -> int:
    """Clamp max_new to the context window; refuse prompts that leave no room for one token."""
    limit = model.cfg.context_length
    if prompt_len >= limit:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens but the model's context length is {limit}")
    return min(max_new, limit - prompt_len)


@torch.inference_mode()
def sample_steps(model: Decoder, prompts: torch.Tensor, params: list[SamplingParams], stop_ids: list[frozenset[int]],
                 vocab_size: int, max_new: int) -> Iterator[SampleOutput]:
    """Prefill prompts (B, S), then yield one SampleOutput (B tokens) per step; the caller stops iterating."""
    cfg, dev = model.cfg, model.device
    b, s = prompts.shape
    cache = ContiguousKVCache(cfg.num_layers, b, s + max_new, cfg.num_kv_heads, cfg.head_dim, model.dtype, dev)
    alpha = model.prefill_alpha(s)
    generators = [make_generator(p.seed, dev) if p.seed is not None else None for p in params]
    prompt_lists, outputs = prompts.tolist(), [[] for _ in range(b)]
    ids, start = prompts.to(dev).reshape(-1), 0
    for _ in range(max_new):
        n = ids.numel() // b
        cache.step(n)
        positions = torch.arange(start, start + n, device=dev).repeat(b)  # (B*n,)
        fb = ForwardBatch(positions=positions, ntk_alpha=torch.full((b * n,), alpha, device=dev), attn=cache)
        hidden = model.forward_tokens(ids, fb).view(b, n, -1)[:, -1]  # (B, hidden)
        cache.advance()
        start += n
        batch = SamplingBatch.build(params, prompt_lists, outputs, vocab_size, dev,
                                    stop_ids_per_row=[sorted(r) for r in stop_ids])
        out = sample(model.compute_logits(hidden), batch, generators)
        for row, token in zip(outputs, out.tokens.tolist(), strict=True):
            row.append(token)
        yield out
        ids = out.tokens


def generate(model: Decoder, input_ids: torch.Tensor | list[int], params: SamplingParams | None = None, *,
             tokenizer: Tokenizer | None = None, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
    """HF-like: input_ids (B, S) -> (B, S + n) with finished rows padded by their eos id.

    `streamer` is anything with HF's put(ids)/end() (e.g. transformers.TextStreamer). Stop strings need `tokenizer`.
    """
    prompts = torch.as_tensor(input_ids).reshape(-1, len(input_ids)) if isinstance(input_ids, list) \
        else input_ids
    params = params or default_params(model, **kwargs)
    eos = eos_ids(tokenizer, model.cfg.eos_token_ids) if tokenizer else frozenset(model.cfg.eos_token_ids)
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer: pass tokenizer=...")
    max_new = check_length(model, prompts.shape[1], params.max_tokens)
    b = prompts.shape[0]
    trackers = [OutputTracker(tokenizer, params, eos, prompts.shape[1], model.cfg.context_length)
                if tokenizer else None for _ in range(b)]
    stops = [row_stop_ids(params, eos)] * b
    pad = min(eos) if eos else 0
    vocab = tokenizer.vocab_size if tokenizer else model.cfg.vocab_size
    rows: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    if streamer is not None:
        streamer.put(prompts.cpu())
    for out in sample_steps(model, prompts, [params] * b, stops, vocab, max_new):
        step = out.tokens.tolist()
        for i in range(b):
            rows[i].append(pad if done[i] else step[i])
            if not done[i]:
                done[i] = _row_done(step[i], trackers[i], stops[i], len(rows[i]), max_new)
        if streamer is not None:
            streamer.put(torch.tensor([r[-1] for r in rows]))
        if all(done):
            break
    if streamer is not None:
        streamer.end()
    return torch.cat([prompts.cpu(), torch.tensor(rows, dtype=prompts.dtype)], dim=1)


def _row_done(token: int, tracker: OutputTracker | None, stops: frozenset[int], n: int, max_new: int) -> bool:
    if tracker is not None:
        tracker.add(token)
        return tracker.finished
    return token in stops or n >= max_new


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


class TextStream:
    """Iterate to get text pieces as they are generated; `output` holds the full result afterwards."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, prompt_ids: list[int],
                 params: SamplingParams) -> None:
        self.model, self.prompt_ids, self.params = model, prompt_ids, params
        self.max_new = check_length(model, len(prompt_ids), params.max_tokens)
        eos = eos_ids(tokenizer, model.cfg.eos_token_ids)
        self.tracker = OutputTracker(tokenizer, params, eos, len(prompt_ids), model.cfg.context_length)
        self.vocab = tokenizer.vocab_size
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        t = self.tracker
        prompt = torch.tensor([self.prompt_ids])
        for out in sample_steps(self.model, prompt, [self.params], [t.stop_ids], self.vocab, self.max_new):
            piece = t.add(int(out.tokens[0]))
            if piece:
                yield piece
            if t.finished:
                break
        self.output = GenerationOutput(t.text, t.token_ids, t.finish_reason or "length")

    def run(self) -> GenerationOutput:
        for _ in self:
            pass
        assert self.output is not None
        return self.output
