"""HF/Qwen-style generation on the engine: `generate` (ids in, ids out, optional HF streamer) and `TextStream`
(text pieces for one prompt).

Both run on the model's own small `LLMEngine` (paged KV cache, prefix caching, CUDA graphs on a GPU), built on
first use and kept on the model, so the package has one step loop: the engine's.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from qwen_awq.engine.llm_engine import CompletionOutput, EngineConfig, LLMEngine
from qwen_awq.engine.output import eos_ids
from qwen_awq.engine.sampling_params import REPLY_MAX_TOKENS, SamplingParams
from qwen_awq.engine.sequence import FinishReason
from qwen_awq.models.decoder import Decoder
from qwen_awq.tokenizer import Tokenizer

ENGINE_ATTRIBUTE = "_qwen_awq_engine"  # where a model keeps its own engine


class EngineDriver:
    """Steps one engine from the calling thread for any number of interleaved streams: each step's outputs go
    to their own request's queue, so iterating one stream never loses another's tokens."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, deque[CompletionOutput]] = {}
        self._ids = itertools.count()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> str:
        request_id = f"local-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_ids, params)
        self._queues[request_id] = deque()
        return request_id

    def outputs(self, request_id: str) -> Iterator[CompletionOutput]:
        """Yield the (n = 1) request's output after every step that changed it; leaving early aborts it."""
        queue = self._queues[request_id]
        try:
            while True:
                while not queue:
                    self._step()
                out = queue.popleft()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.cancel([request_id])

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[CompletionOutput]:
        yield from self.outputs(self.submit(prompt_ids, params))

    def cancel(self, request_ids: list[str]) -> None:
        """Forget these requests; those still running are aborted (their KV blocks freed)."""
        for request_id in request_ids:
            if self._queues.pop(request_id, None) is not None:
                self.engine.abort(request_id)

    def _step(self) -> None:
        for out in self.engine.step():
            # a shallow copy: later steps replace (never mutate) the delta and text fields it holds
            self._queues[out.request_id].append(replace(out.outputs[0]))


def model_driver(model: Decoder, tokenizer: Tokenizer | None, num_seqs: int = 1) -> EngineDriver:
    """The model's own engine driver for up to num_seqs sequences at a time, built on first use; built again for
    another tokenizer, a larger batch, or when the model moved to another device."""
    driver: EngineDriver | None = getattr(model, ENGINE_ATTRIBUTE, None)
    engine = driver.engine if driver is not None else None
    if (engine is None or engine.tokenizer is not tokenizer or engine.config.max_num_seqs < num_seqs
            or engine.pool.k.device != model.device):
        driver = EngineDriver(LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=num_seqs)))
        setattr(model, ENGINE_ATTRIBUTE, driver)
    return driver


def reply_params(model: Decoder, tokenizer: Tokenizer | None, prompt_len: int, **overrides: Any) -> SamplingParams:
    """A reply's sampling settings: the model's generation defaults under the caller's overrides; max_tokens
    when not given is the model's max_new_tokens, else REPLY_MAX_TOKENS, cut to the context left."""
    room = model_driver(model, tokenizer).engine.max_model_len - prompt_len
    return SamplingParams.from_defaults(model.generation_config, room=room, default_max_tokens=REPLY_MAX_TOKENS,
                                        **overrides)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason


class TextStream:
    """Iterate to get text pieces as they are generated; `output` holds the full result afterwards.

    The request is checked against the context length when the stream is made, and sent when iterated.
    """

    def __init__(self, model: Decoder, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.driver = model_driver(model, tokenizer)
        self.driver.engine.check_request(len(prompt_ids), params)
        self.prompt_ids, self.params = list(prompt_ids), params
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        for out in self.driver.stream(self.prompt_ids, self.params):
            if out.delta_text:
                yield out.delta_text
            if out.finish_reason is not None:
                self.output = GenerationOutput(out.text, out.token_ids, out.finish_reason)

    def run(self) -> GenerationOutput:
        for _ in self:
            pass
        assert self.output is not None
        return self.output


def generate(model: Decoder, input_ids: torch.Tensor | list[int], params: SamplingParams | None = None, *,
             tokenizer: Tokenizer | None = None, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
    """HF-like: input_ids (B, S) -> (B, S + n), rows that finished early padded with their eos id.

    Without `params`, the model's defaults under `kwargs` (HF names such as max_new_tokens and do_sample too).
    `streamer` is anything with HF's put(ids)/end() (e.g. transformers.TextStreamer), for one prompt. Stop
    strings need `tokenizer`.
    """
    prompts = torch.as_tensor(input_ids)
    prompts = prompts.reshape(1, -1) if prompts.dim() == 1 else prompts
    if streamer is not None and prompts.shape[0] != 1:
        raise ValueError("a streamer follows one prompt; pass input_ids of shape (1, S)")
    params = params or reply_params(model, tokenizer, prompts.shape[1], **kwargs)
    driver = model_driver(model, tokenizer, prompts.shape[0])
    rows = prompts.tolist()
    for row in rows:
        driver.engine.check_request(len(row), params)
    request_ids: list[str] = []
    try:
        request_ids += [driver.submit(row, params) for row in rows]
        if streamer is not None:
            streamer.put(prompts.cpu())
        new = [_token_ids(driver.outputs(i), streamer) for i in request_ids]
    finally:
        driver.cancel(request_ids)
    if streamer is not None:
        streamer.end()
    eos = eos_ids(tokenizer, model.cfg.eos_token_ids)
    pad, width = min(eos, default=0), max(map(len, new))
    padded = torch.tensor([ids + [pad] * (width - len(ids)) for ids in new], dtype=prompts.dtype)
    return torch.cat([prompts.cpu(), padded], dim=1)


def _token_ids(stream: Iterator[CompletionOutput], streamer: Any) -> list[int]:
    ids: list[int] = []
    for out in stream:
        ids = out.token_ids
        if streamer is not None:
            streamer.put(torch.tensor(out.delta_token_ids))
    return list(ids)
