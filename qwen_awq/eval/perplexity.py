"""Perplexity over non-overlapping windows: each window of ctx tokens predicts its tokens 1..ctx-1 from the
tokens before them in the same window; per-token NLLs come from fp32 logits and are summed in fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qwen_awq.errors import ConfigError, ContextLengthError
from qwen_awq.tokenizer import Tokenizer


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens: the window lengths minus one each
    windows: int

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.windows < 1:
            raise ValueError(f"need >= 1 token and window, got {self.tokens} and {self.windows}")


def window_spans(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """[start, end) of each window; a last partial window counts if it predicts anything (>= 2 tokens)."""
    spans = [(start, min(start + ctx, n_tokens)) for start in range(0, n_tokens, ctx)]
    return [(a, b) for a, b in spans if b - a >= 2]


def perplexity(
    model: nn.Module,
    token_ids: list[int] | torch.Tensor,
    ctx: int = 2048,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` (input_ids (B, S) -> logits (B, S, V)) on one token stream."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()  # (N,)
    if ctx < 2 or batch_size < 1:
        raise ConfigError(f"perplexity needs ctx >= 2 and batch_size >= 1, got {ctx} and {batch_size}")
    limit = model.cfg.max_position_embeddings
    if ctx > limit:
        raise ContextLengthError(f"--ctx {ctx} exceeds the model's {limit} positions; use {limit} or less")
    spans = window_spans(ids.numel(), ctx)
    if not spans:
        raise ConfigError(f"perplexity needs at least 2 tokens of text, got {ids.numel()}")
    device = next(model.parameters()).device
    # Rows of a batch must have equal length, so the one partial (last) window gets a batch of its own.
    full = [span for span in spans if span[1] - span[0] == ctx]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[span] for span in spans if span[1] - span[0] < ctx]
    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress)
    with torch.inference_mode():
        for batch in batches:
            x = torch.stack([ids[a:b] for a, b in batch]).to(device)  # (B, S)
            total += _batch_nll(model, x).cpu()
            bar.update(len(batch))
    bar.close()
    tokens = sum(b - a - 1 for a, b in spans)
    nll = total.item() / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=len(spans))


def _batch_nll(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Summed NLL (fp64 scalar) of tokens 1..S-1 of each row of x (B, S)."""
    logits = model(x)  # (B, S, V) fp32
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for row in range(x.shape[0]):  # one row at a time: a (S, V) log-softmax of a 150k vocabulary is large
        nll = F.cross_entropy(logits[row, :-1].float(), x[row, 1:], reduction="none")  # (S-1,)
        total += nll.double().sum()
    return total


def perplexity_of_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    text: str,
    ctx: int = 2048,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Tokenize `text` as data (special-token text stays plain) and score it with perplexity()."""
    ids = tokenizer.encode(text, allowed_special=set(), disallowed_special=())
    return perplexity(model, ids, ctx=ctx, batch_size=batch_size, progress=progress)
