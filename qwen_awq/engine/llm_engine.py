"""The synchronous engine: requests in, one scheduled model step at a time, incremental outputs out."""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from qwen_awq.engine.block_manager import BlockManager
from qwen_awq.engine.cuda_graph import DecodeGraphs
from qwen_awq.engine.guided import GuidedDecoding, GuidedMatcher
from qwen_awq.engine.kv_cache import KVPool, bytes_per_block
from qwen_awq.engine.model_runner import ModelRunner
from qwen_awq.engine.output import OutputTracker, eos_ids
from qwen_awq.engine.overlap import PLACEHOLDER, InFlight, can_look_ahead, next_input_ids
from qwen_awq.engine.sampler import HostSample, make_generator
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.scheduler import ScheduledBatch, Scheduler
from qwen_awq.engine.sequence import FinishReason, Sequence
from qwen_awq.errors import ConfigError, GrammarError
from qwen_awq.models.decoder import Decoder
from qwen_awq.quant.linear import warm_up_w4a16
from qwen_awq.tokenizer import Tokenizer

GiB = 1 << 30
# The default token budget of a step. GPU: vLLM's for its server on H100-class cards; on the H200 the offline
# 128 x (512 + 256) run went from 4920 to 5330 out tok/s (AWQ) over 2048 (bench/results/gpu_final_H200_2026-12-04.md):
# fewer, larger prefill steps. CPU: short steps keep decodes flowing between prompt chunks.
STEP_TOKENS = {"cuda": 8192, "cpu": 2048}


@dataclass
class EngineConfig:
    """Engine settings; fields with help metadata are `qwen-awq serve` flags (cli_args.add_config_args)."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int | None = field(default=None, metadata={  # None: STEP_TOKENS for the device
        "help": "token budget of one engine step (long prompts prefill in chunks of this size; default 8192 on a "
                "GPU, 2048 on the CPU)"})
    max_model_len: int | None = field(default=None, metadata={  # None: the model's context length
        "help": "context length (default: the model's, or what the KV cache holds if less)"})
    max_waiting: int = field(default=1024, metadata={  # queued sequences beyond this are refused with Overloaded
        "flags": ("--max-queue", "--max-waiting"),
        "help": "most waiting sequences; beyond it requests get 503 (OpenAI routes) or 429 (TGI routes) with "
                "Retry-After"})
    kv_cache_memory: int | None = field(default=None, metadata={  # bytes
        "unit": "bytes", "help": "KV-cache size, e.g. 2GiB (default: a share of free GPU memory, 1 GiB on CPU)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "share of free GPU memory for the KV cache when --kv-cache-memory is absent"})
    kv_cache_dtype: str = field(default="auto", metadata={  # "int8": Qwen's per-chunk asymmetric scheme
        "choices": ("auto", "int8"), "help": "auto: the model dtype; int8: Qwen's per-chunk quantized KV cache"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "flags": ("--no-prefix-caching",), "help": "do not share KV blocks of common prefixes"})
    enforce_eager: bool = field(default=False, metadata={  # vLLM's name: no CUDA-graph capture of decode steps
        "help": "run decode steps eagerly instead of replaying captured CUDA graphs"})
    async_scheduling: bool = field(default=True, metadata={  # vLLM's name; engine/overlap.py says when it applies
        "flags": ("--no-async-scheduling",),
        "help": "do not overlap the host's scheduling and output processing of a decode step with the GPU's run "
                "of the previous one"})

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ConfigError(f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")

    def for_device(self, device: torch.device) -> EngineConfig:
        """This config with the device's step budget where none was asked for (STEP_TOKENS)."""
        if self.max_num_batched_tokens is not None:
            return self
        return dataclasses.replace(self, max_num_batched_tokens=STEP_TOKENS["cuda" if device.type == "cuda" else "cpu"])


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None  # a str: "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: top ids and the chosen id -> logprob
    cumulative_logprob: float = 0.0
    delta_text: str = ""  # what this step added (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    def snapshot(self) -> RequestOutput:
        """A copy that later steps do not mutate (handed to another thread). Built with the constructors, not
        dataclasses.replace (which inspects the fields on every call): it runs once per request per step."""
        outs = [CompletionOutput(o.index, o.text, o.token_ids[:], o.finish_reason, o.stop_reason,
                                 None if o.logprobs is None else o.logprobs[:], o.cumulative_logprob, o.delta_text,
                                 o.delta_token_ids[:]) for o in self.outputs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished,
                             self.num_cached_tokens, self.arrival_time, self.first_token_time)


@dataclass
class _Request:
    output: RequestOutput
    params: SamplingParams
    seqs: list[Sequence]
    trackers: list[OutputTracker]


def kv_budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type != "cuda":
        return GiB
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * config.gpu_memory_utilization) - GiB  # leave room for activations and logits


class LLMEngine:
    """Without a tokenizer (ids in, ids out) outputs carry no text, eos ids are the model's and sampling covers
    the model's whole (padded) vocabulary."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer | None, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config = (config or EngineConfig()).for_device(model.device)
        int8 = config.kv_cache_dtype == "int8"
        per_block = bytes_per_block(model.cfg, config.block_size, model.dtype, int8)
        budget_blocks = kv_budget(config, model.device) // per_block
        # unless asked for, the longest sequence is what the model supports and the KV budget holds
        self.max_model_len = min(config.max_model_len or budget_blocks * config.block_size,
                                 model.cfg.context_length)
        needed = -(-self.max_model_len // config.block_size) * config.max_num_seqs  # more is never used
        num_blocks = min(budget_blocks, needed)
        use_graphs = model.device.type == "cuda" and not config.enforce_eager
        # one extra block, owned by no sequence, takes the K/V writes of a captured graph's padding rows
        self.pool = KVPool(model.cfg, num_blocks + use_graphs, config.block_size, model.dtype, model.device, int8)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.max_waiting)
        if model.device.type == "cuda":  # every W4A16 kernel variant compiled now, not as a stall inside a step
            warm_up_w4a16(model, config.max_num_batched_tokens)
        graphs = None
        vocab = tokenizer.vocab_size if tokenizer is not None else model.cfg.vocab_size
        if use_graphs:
            graphs = DecodeGraphs(model, self.pool, config.max_num_seqs, -(-self.max_model_len // config.block_size),
                                  scratch_block=num_blocks, vocab_size=vocab)
            graphs.capture()
        self.runner = ModelRunner(model, self.pool, vocab, graphs)
        self.eos = eos_ids(tokenizer, model.cfg.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._guided: GuidedDecoding | None = None  # built by the first request with a structured-output spec
        self._guided_lock = threading.Lock()
        self._in_flight: InFlight | None = None  # a launched decode step not yet processed (async_scheduling)
        self.num_overlapped_steps = 0  # steps launched while the previous one ran (metrics, tests)
        tokens = num_blocks * config.block_size
        self.kv_report = (f"KV cache: {num_blocks} blocks x {config.block_size} tokens = {tokens} tokens "
                          f"({num_blocks * per_block / GiB:.2f} GiB, {'int8' if int8 else str(model.dtype)[6:]}); "
                          f"{tokens / self.max_model_len:.1f} sequences at the full context of "
                          f"{self.max_model_len} tokens")

    def check_request(self, num_prompt_tokens: int, params: SamplingParams, pending: int = 0) -> None:
        """Raise now what add_request would refuse: ContextLengthError (prompt + max_tokens over max_model_len)
        or Overloaded (the waiting queue, plus `pending` adds on their way, is full)."""
        self.scheduler.check_admission(num_prompt_tokens, params.max_tokens, pending)

    def guided_decoding(self) -> GuidedDecoding:
        """The engine's one structured-output state (llguidance's view of the tokenizer over the logits width),
        built on first use: about a second for Qwen's 150k ids. Safe to call from any thread."""
        with self._guided_lock:
            if self._guided is None:
                if self.tokenizer is None:
                    raise GrammarError("structured output needs a tokenizer: pass tokenizer=...")
                self._guided = GuidedDecoding(self.tokenizer, self.model.cfg.vocab_size, self.eos)
            return self._guided

    def check_guided(self, params: SamplingParams) -> None:
        """Compile the request's structured-output spec now (cached), raising GrammarError when it is invalid."""
        if params.guided is not None:
            self.guided_decoding().compile(params.guided)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, cache_salt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(len(prompt_ids), params)
        self.check_guided(params)
        trackers = [OutputTracker(self.tokenizer, params, self.eos, len(prompt_ids), self.max_model_len)
                    for _ in range(params.n)]
        seqs = [self._sequence(request_id, prompt_ids, params, i, t, cache_salt) for i, t in enumerate(trackers)]
        self.scheduler.add(*seqs)
        outputs = [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        self.requests[request_id] = _Request(RequestOutput(request_id, prompt, list(prompt_ids), outputs),
                                             params, seqs, trackers)

    def _sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int,
                  tracker: OutputTracker, cache_salt: str | None = None) -> Sequence:
        alpha = self.model.prefill_alpha(len(prompt_ids))
        # keys are cached after a rotation that depends on alpha: never share blocks across alphas
        salt = cache_salt if alpha == 1.0 else f"{cache_salt}|ntk={alpha}"
        # each of a request's n samples gets its own stream: seed + index (vLLM's rule)
        generator = None if params.seed is None else make_generator(params.seed + index, self.model.device)
        matcher = None if params.guided is None else self.guided_decoding().matcher(params.guided)
        # a constrained sample bans no stop id for min_tokens: once its grammar is complete only end ids are left
        stop_ids = () if matcher is not None else tuple(sorted(tracker.stop_ids))
        return Sequence(next(self._seq_ids), request_id, prompt_ids, params, cache_salt=salt, ntk_alpha=alpha,
                        index=index, stop_ids=stop_ids, generator=generator, matcher=matcher)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._in_flight is not None  # the last step in flight is still drained

    def step(self) -> list[RequestOutput]:
        """One scheduled model call; returns the requests that produced something (finished ones last time). With
        async_scheduling a decode step may already be in flight: the next one is launched before it is read."""
        if self._in_flight is not None:
            current, self._in_flight = self._in_flight, None
            return self._complete(current)
        batch = self.scheduler.schedule()
        if not batch.entries:
            return []
        if self._guided is not None:  # the step's masks are computed while the model runs
            self._guided.prefetch([e.seq.matcher for e in batch.sampling])
        sampled = self.runner.step(batch)
        if sampled is None:
            self.scheduler.update(batch, {})
            return []
        return self._complete(InFlight(batch, sampled, sampled.start_copy()))

    def _complete(self, current: InFlight) -> list[RequestOutput]:
        """Launch the next step when it is safe (engine/overlap.py), then wait for `current` and process it."""
        launched = self._launch_next(current) if self._overlaps(current.batch) else None
        host = current.pending.result()
        if launched is None:
            self.scheduler.update(current.batch, host.tokens)
        else:  # recorded with placeholders by _launch_next: the real tokens go over them
            for e, token in zip(current.batch.sampling, host.tokens, strict=True):
                if not e.seq.is_finished:
                    e.seq.output_token_ids[-1] = token
        outputs = self._process(current.batch, host)
        self._in_flight = launched
        return outputs

    def _overlaps(self, batch: ScheduledBatch) -> bool:
        return (self.config.async_scheduling and self.runner.device_input_ids
                and can_look_ahead(batch, self.scheduler, self.max_model_len))

    def _launch_next(self, current: InFlight) -> InFlight:
        """Record `current` with placeholder tokens, schedule the next decode step and launch it on the tokens that
        `current` samples on the device. A sequence that `current` finishes has its next row computed and dropped;
        its blocks are freed after the launch, so only later launches reuse them (stream order)."""
        self.scheduler.update(current.batch, [PLACEHOLDER] * len(current.batch.sampling))
        batch = self.scheduler.schedule()
        assert batch.entries and not batch.preempted, "can_look_ahead promised a decode step without preemption"
        sampled = self.runner.step(batch, next_input_ids(current, batch))
        self.num_overlapped_steps += 1
        return InFlight(batch, sampled, sampled.start_copy())

    def _process(self, batch: ScheduledBatch, sampled: HostSample) -> list[RequestOutput]:
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for row, e in enumerate(batch.sampling):
            seq = e.seq
            if seq.is_finished:  # aborted, or ended by the step before, while this one was in flight: dropped
                continue
            req = self.requests[seq.request_id]
            if seq.request_id not in touched:
                for out in req.output.outputs:
                    out.delta_text, out.delta_token_ids = "", []
                touched[seq.request_id] = req
            self._append(req, seq, sampled, row)
            req.output.first_token_time = req.output.first_token_time or now
            req.output.num_cached_tokens = max(req.output.num_cached_tokens, seq.num_cached_prefix_tokens)
        for req in touched.values():
            req.output.finished = all(t.finished for t in req.trackers)
            if req.output.finished:
                del self.requests[req.output.request_id]
        return [req.output for req in touched.values()]

    def _append(self, req: _Request, seq: Sequence, sampled: HostSample, row: int) -> None:
        token = sampled.tokens[row]
        tracker, out = req.trackers[seq.index], req.output.outputs[seq.index]
        piece = tracker.add(token, grammar_done=_grammar_done(seq.matcher, seq.output_token_ids))
        out.text, out.token_ids = tracker.text, tracker.token_ids
        out.delta_text += piece
        out.delta_token_ids.append(token)
        lp = sampled.logprobs[row]
        out.cumulative_logprob += lp
        if out.logprobs is not None:
            top = {}
            if sampled.top_ids is not None and req.params.logprobs:
                k = req.params.logprobs
                top = dict(zip(sampled.top_ids[row][:k], sampled.top_values[row][:k], strict=True))
            out.logprobs.append(top | {token: lp})
        if tracker.finished:
            out.finish_reason, out.stop_reason = tracker.finish_reason, tracker.stop_reason
            self.scheduler.finish(seq, tracker.finish_reason)


def _grammar_done(matcher: GuidedMatcher | None, output_ids: list[int]) -> bool:
    """Advance a sequence's matcher past its new token; whether its grammar is now complete."""
    if matcher is None:
        return False
    matcher.follow(output_ids)
    return matcher.is_terminated()
