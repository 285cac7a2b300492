"""The model the benchmark suites talk to: next-token logits for scoring, the engine for generation.

Scoring runs the decoder directly on right-padded batches (causal attention: real tokens never see the padding)
and computes logits only at the positions asked for; generation goes through the public `LLM` API, so the
suites batch through the same engine users run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError
from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.tokenizer import Tokenizer

# Scoring batches hold at most this many tokens (rows x longest row): 8 rows of 1024 tokens, a few hundred MiB of
# activations for a 7B model. Scoring never materializes logits beyond the positions asked for.
MAX_BATCH_TOKENS = 8192
# An eval run shares the GPU between the engine's KV pool and scoring batches, so it reserves less than serving.
EVAL_GPU_MEMORY_UTILIZATION = 0.5


class SuiteModel(Protocol):
    """What the suite runners use; tests substitute a scripted double at this boundary."""

    name: str
    tokenizer: Tokenizer
    context_length: int

    def last_logits(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """Prompts -> fp32 logits (len(prompts), vocab) at each prompt's last token, on the CPU."""
        ...

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[str]:
        """One completion text per prompt."""
        ...


@dataclass(frozen=True)
class ScoreRequest:
    """Score `tokens[i]` for i in `targets` from the prefix before it (targets index into tokens, >= 1)."""

    tokens: list[int]
    targets: range


class EvalModel:
    """A model folder loaded once through `LLM`; `model`/`tokenizer` are the engine's own objects."""

    def __init__(self, path: str | None = None, dtype: str = "auto", device: str = "auto",
                 batch_size: int = 8, max_model_len: int | None = None, **engine_kwargs: Any) -> None:
        from qwen_awq.engine.llm import LLM

        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        engine_kwargs.setdefault("gpu_memory_utilization", EVAL_GPU_MEMORY_UTILIZATION)
        self.llm = LLM(model=path, dtype=dtype, device=device, max_model_len=max_model_len, **engine_kwargs)
        self.model, self.tokenizer = self.llm.model, self.llm.get_tokenizer()
        self.name = str(path) if path is not None else "bundled SmolLM2-135M-Instruct AWQ"
        self.batch_size = batch_size
        self.context_length = min(self.llm.engine.max_model_len, self.model.cfg.context_length)

    def last_logits(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        reqs = [ScoreRequest(p, range(len(p), len(p) + 1)) for p in prompts]
        return torch.cat([x[-1:] for x in self.position_logits(reqs, with_last=True)])

    def position_logits(self, requests: Sequence[ScoreRequest], with_last: bool = False) -> list[torch.Tensor]:
        """fp32 logits predicting each target token (len(targets), vocab) per request, on the CPU.

        A target index equal to len(tokens) (allowed only with `with_last`) asks for the next-token logits.
        """
        for r in requests:
            top = len(r.tokens) + (1 if with_last else 0)
            if not r.tokens or (len(r.targets) and (r.targets.start < 1 or r.targets.stop > top)):
                raise ConfigError(f"score targets {r.targets} do not fit a row of {len(r.tokens)} tokens")
            if len(r.tokens) > self.context_length:
                raise ConfigError(f"a scoring row of {len(r.tokens)} tokens exceeds the context of "
                                  f"{self.context_length}; truncate it first")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))  # similar lengths together
        out: list[torch.Tensor | None] = [None] * len(requests)
        for batch in self._batches(order, requests):
            for i, logits in zip(batch, self._forward_batch([requests[i] for i in batch]), strict=True):
                out[i] = logits
        return out  # type: ignore[return-value]

    def _batches(self, order: list[int], requests: Sequence[ScoreRequest]) -> list[list[int]]:
        batches: list[list[int]] = []
        for i in order:
            longest = len(requests[batches[-1][0]].tokens) if batches else 0
            if batches and len(batches[-1]) < self.batch_size and longest * (len(batches[-1]) + 1) <= \
                    max(MAX_BATCH_TOKENS, longest):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.inference_mode()
    def _forward_batch(self, requests: list[ScoreRequest]) -> list[torch.Tensor]:
        model, dev = self.model, self.model.device
        b, s = len(requests), max(len(r.tokens) for r in requests)
        ids = torch.zeros((b, s), dtype=torch.long)  # (B, S) right-padded with id 0
        alpha = torch.ones((b, s))
        for row, r in enumerate(requests):
            ids[row, :len(r.tokens)] = torch.tensor(r.tokens)
            alpha[row] = model.prefill_alpha(len(r.tokens))  # what an unpadded forward of this row would use
        positions = torch.arange(s).repeat(b)  # (B*S,)
        fb = ForwardBatch(positions=positions.to(dev), ntk_alpha=alpha.reshape(-1).to(dev),
                          attn=DenseAttention(b, s))
        hidden = model.forward_tokens(ids.reshape(-1).to(dev), fb).view(b, s, -1)  # (B, S, hidden)
        picks = [torch.tensor(list(r.targets), dtype=torch.long) - 1 for r in requests]  # predictor positions
        flat = torch.cat([hidden[row, p.to(dev)] for row, p in enumerate(picks)])  # (sum targets, hidden)
        logits = model.compute_logits(flat).cpu()  # (sum targets, V) fp32
        return list(logits.split([len(p) for p in picks]))

    def continuation_logprobs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), whether greedy decoding yields it) per (context, cont) pair.

        Rows longer than the context keep their last tokens (the continuation is always scored whole).
        """
        reqs = []
        for context, cont in pairs:
            if not context or not cont:
                raise ConfigError("continuation scoring needs a non-empty context and continuation")
            tokens = (context + cont)[-self.context_length:]
            if len(cont) >= len(tokens):
                raise ConfigError(f"a continuation of {len(cont)} tokens leaves no context in {self.context_length}")
            reqs.append(ScoreRequest(tokens, range(len(tokens) - len(cont), len(tokens))))
        results = []
        for r, logits in zip(reqs, self.position_logits(reqs), strict=True):
            logprobs = torch.log_softmax(logits.double(), dim=-1)  # (n, V): the full width, as perplexity and HF score
            target = torch.tensor(r.tokens[r.targets.start:r.targets.stop])
            total = logprobs.gather(1, target[:, None]).sum().item()
            results.append((total, bool((logprobs.argmax(-1) == target).all())))
        return results

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[str]:
        outs = self.llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def close(self) -> None:
        """Drop the model so the next one in `eval compare` gets the memory."""
        del self.llm, self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
