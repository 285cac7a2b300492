"""The server's one bridge to the engine: sampling parameters and their defaults, the admission check, the
engine requests behind one HTTP request (merged, recorded in the metrics, aborted when the client leaves), SSE
streaming, the structured-output constraints of every API as the engine's GuidedSpec (compiled off the event loop,
so an invalid one is refused before anything is queued), and the CPU work (tokenization, template rendering,
detokenization) run in a thread pool so that the event loop stays free. Routes use the engine only through this
module.
"""
from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen_awq.chat import window_size
from qwen_awq.engine.async_engine import AsyncEngine, GenerationFailed
from qwen_awq.engine.guided import GuidedSpec, json_rule
from qwen_awq.engine.llm_engine import CompletionOutput, RequestOutput
from qwen_awq.engine.sampling_params import REPLY_MAX_TOKENS, SamplingParams
from qwen_awq.errors import ContextLengthError, GrammarError, QwenAwqError
from qwen_awq.server.errors import APIError, ClientDisconnected, Flavor, Kind, log
from qwen_awq.server.metrics import EngineStats, Metrics, RequestRecord
from qwen_awq.server.protocol import Constraint

__all__ = ["CompletionOutput", "Defaults", "GuidedSpec", "RequestOutput", "Run", "Runner", "SamplingParams",
           "ServerState", "json_rule"]
T = TypeVar("T")
CPU_WORKERS = 2  # tokenizer threads: each request's CPU work is one task; more threads only contend for cores
# Unicode composition (NFC/NFKC, which Qwen's tokenizer applies) shrinks text at most 3:1 (three Hangul jamo,
# 9 bytes, become one 3-byte syllable; the Kelvin sign, 3 bytes, lowercases to "k").
COMPOSITION_SHRINK = 3
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering events
SPEC_OF: dict[str, Callable[[Any], GuidedSpec]] = {  # a Constraint's kind -> the engine's spec
    "json_object": lambda _: GuidedSpec.json_object(), "json_schema": GuidedSpec.json_schema,
    "regex": GuidedSpec.regex, "choice": GuidedSpec.choice, "grammar": GuidedSpec.grammar}


class Defaults(enum.Enum):
    MODEL = "model"  # absent fields take the model's generation_config.json values (OpenAI routes)
    VLLM = "vllm"  # absent fields take vLLM's SamplingParams defaults (legacy /generate; TGI fills every field)


class Runner:
    """The engine as the routes see it: model facts, a small query surface, params, admission and runs."""

    def __init__(self, engine: AsyncEngine, special_tokens_in_prompts: bool = True) -> None:
        self.engine = engine
        self.special_tokens_in_prompts = special_tokens_in_prompts
        self._pool = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="qwen-awq-cpu")
        self._bytes_per_token: asyncio.Future[int | None] | None = None

    # --- facts and queries ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def chat_window(self) -> int:
        return window_size(self.engine.engine.model)

    def limits(self) -> dict[str, Any]:
        """What TGI's /info reports about the model and the engine's batch limits."""
        core = self.engine.engine
        return {"model_dtype": str(core.model.dtype), "model_device_type": core.model.device.type,
                "max_batch_size": core.config.max_num_seqs, "max_waiting": core.scheduler.max_waiting,
                "max_batch_total_tokens": core.config.max_num_batched_tokens}

    def stats(self) -> EngineStats:
        core = self.engine.engine
        sched, blocks = core.scheduler, core.block_manager
        return EngineStats(sched.num_running, sched.num_waiting, blocks.usage, blocks.num_blocks,
                           blocks.block_size, sched.num_preemptions, blocks.prefix_query_tokens,
                           blocks.prefix_hit_tokens, core.config.kv_cache_dtype, core.config.enable_prefix_caching)

    def check_ids(self, ids: list[int], what: str = "prompt") -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(Kind.INVALID, f"{what} holds token ids outside [0, {vocab}): {bad[:5]}", param=what)

    # --- CPU work off the event loop -----------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the tokenizer threads (encoding a megabyte takes seconds)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def encode_prompt(self, text: str, what: str = "prompt", refuse_long: bool = True) -> list[int]:
        """A raw prompt's ids; special-token text is parsed (as vLLM does) unless the server was told not to."""
        if refuse_long:
            await self.refuse_oversized([text], what)
        allowed = "all" if self.special_tokens_in_prompts else set()
        return await self.offload(self.tokenizer.encode, text, allowed)

    async def decode(self, ids: list[int]) -> str:
        return await self.offload(self.tokenizer.decode, ids)

    async def refuse_oversized(self, texts: list[str], what: str = "prompt") -> None:
        """Refuse, before tokenizing, text that surely has more tokens than the context: more bytes than
        max_model_len tokens can stand for."""
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size <= self.max_model_len:  # every token stands for at least one byte
            return
        if self._bytes_per_token is None:
            self._bytes_per_token = asyncio.ensure_future(self.offload(bytes_per_token_bound, self.tokenizer))
        bound = await asyncio.shield(self._bytes_per_token)
        if bound is not None and size > self.max_model_len * bound:
            raise ContextLengthError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                     f"the {what} has {size} bytes, more than {self.max_model_len} tokens can hold "
                                     f"(at most {bound} bytes each). Please reduce the {what}.")

    # --- parameters and admission --------------------------------------------------------------------------
    def params(self, fields: dict[str, Any], defaults: Defaults) -> SamplingParams:
        """SamplingParams from vLLM-named fields (None or absent: the default `defaults` names)."""
        model_defaults = self.engine.engine.model.generation_config if defaults is Defaults.MODEL else None
        return SamplingParams.from_defaults(model_defaults, **fields)

    async def guided(self, constraints: list[Constraint], prefix: str = "") -> GuidedSpec | None:
        """The request's one structured-output constraint (None without one), compiled now in the CPU threads
        (the first one builds llguidance's view of the vocabulary), so that an invalid schema is a 4xx with the
        validator's message after `prefix` (default: the field's name)."""
        if not constraints:
            return None
        if len(constraints) > 1:
            raise APIError(Kind.INVALID, f"{prefix}send at most one structured-output constraint, got "
                           f"{', '.join(c.param for c in constraints)}", param=constraints[1].param)
        c = constraints[0]
        core = self.engine.engine
        try:
            if c.kind == "json_schema" and c.value is None:
                raise GrammarError(f"{c.param} needs a `schema`")
            spec = SPEC_OF[c.kind](c.value)
            await self.offload(lambda: core.guided_decoding().compile(spec))
        except GrammarError as e:
            raise APIError(Kind.INVALID, f"{prefix or c.param + ': '}{e}", param=c.param) from None
        return spec

    def chat_max_tokens(self, prompt_len: int) -> int:
        """A chat's max_tokens when absent: the model's max_new_tokens (else REPLY_MAX_TOKENS), cut to the room
        left in the context (never below 1: a full context is then refused with numbers by the length check)."""
        defaults = self.engine.engine.model.generation_config
        room = self.max_model_len - prompt_len
        return SamplingParams.from_defaults(defaults, room=room, default_max_tokens=REPLY_MAX_TOKENS).max_tokens

    def admit(self, prompts: list[list[int]], params: SamplingParams, flavor: Flavor) -> None:
        """Raise now what the engine would refuse: a request that can never fit, or a full queue (retryable)."""
        queue = self.engine.engine.scheduler.max_waiting
        if len(prompts) * params.n > queue:
            raise APIError(Kind.INVALID, f"this request needs {len(prompts) * params.n} sequences at once (n={params.n}"
                           f" for {len(prompts)} prompt(s)); this server queues at most {queue} (--max-queue)",
                           param="n")
        for ids in prompts:
            want = len(ids) + params.max_tokens
            if flavor is Flavor.TGI and ids and want > self.max_model_len:
                raise APIError(Kind.INVALID, f"`inputs` tokens + `max_new_tokens` must be <= {self.max_model_len}. "
                               f"Given: {len(ids)} `inputs` tokens and {params.max_tokens} `max_new_tokens`",
                               param="max_new_tokens")
            self.engine.check(ids, params)

    def run(self, state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams) -> Run:
        return Run(self.engine, state.metrics, request_id, prompts, params)


def bytes_per_token_bound(tokenizer: Any) -> int | None:
    """Most input bytes one token can stand for: its longest decoded text (a partial character decodes to
    U+FFFD, 3 bytes, more than it covers), plus one for a leading space a decoder strips, times the most that
    normalization shrinks text. None when the tokenizer's normalizer may delete text (no bound exists)."""
    if not getattr(tokenizer, "normalizer_keeps_text", True):
        return None
    longest = max(len(tokenizer.decode([i]).encode()) for i in range(tokenizer.vocab_size))
    return (longest + 1) * COMPOSITION_SHRINK


@dataclass
class ServerState:
    runner: Runner
    model_name: str
    max_body_bytes: int
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(Kind.NOT_FOUND, f"The model `{name}` does not exist; this server serves "
                           f"`{self.model_name}`.", param="model", code="model_not_found")

    async def start(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
                    flavor: Flavor = Flavor.OPENAI) -> Run:
        """Admit the request and start its engine requests (refusals are raised before any reply byte)."""
        self.runner.admit(prompts, params, flavor)
        run = self.runner.run(self, request_id, prompts, params)
        await run.start()
        return run


def server_state(request: Request) -> ServerState:
    return request.app.state.server


class Run:
    """The engine requests behind one HTTP request (one per prompt), merged into one (index, output) stream.

    One prompt (the usual case) is read straight from its engine stream; several are pumped by one task each
    into a shared queue. That extra hop was a task wake-up per token per stream on the event loop (issue 12).
    Leaving early (client gone, error) aborts the engine requests.
    """

    def __init__(self, engine: AsyncEngine, metrics: Metrics, request_id: str, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.engine, self.metrics, self.request_id, self.prompts, self.params = (
            engine, metrics, request_id, prompts, params)
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._refused: BaseException | None = None
        self._stream: asyncio.Queue | None = None  # the one prompt's engine stream, until it is read
        self._start, self._first = time.monotonic(), None  # the one prompt's start and first output times
        self._last: RequestOutput | None = None
        self._recorded = False  # the one prompt is in the metrics (or was refused: it never ran)

    async def start(self) -> None:
        if len(self.prompts) == 1:  # a refusal (queue full since the check) is raised here
            self._stream = self.engine.submit(f"{self.request_id}-0", self.prompts[0], self.params)
            return
        self._tasks = [asyncio.create_task(self._pump(i, ids)) for i, ids in enumerate(self.prompts)]
        # In this one loop turn each task runs up to its first wait inside AsyncEngine.generate, so a refusal
        # (queue full since the check) is known before the reply's status line goes out.
        await asyncio.sleep(0)
        if self._refused is not None:
            self.close()
            raise self._refused

    async def _pump(self, i: int, ids: list[int]) -> None:
        start, first, last = time.monotonic(), None, None
        refused = False
        try:
            stream = self.engine.generate(f"{self.request_id}-{i}", ids, self.params)
            async with aclosing(stream) as outs:
                async for out in outs:
                    first, last = first or time.monotonic(), out
                    self._queue.put_nowait((i, out))
        except Exception as e:  # delivered to the consumer, which turns it into the route's error
            refused = last is None and isinstance(e, QwenAwqError)
            if refused and self._refused is None:
                self._refused = e
            self._queue.put_nowait((i, _route_error(e)))
        finally:
            if not refused:
                self.metrics.observe(_record(len(ids), last, start, first))
            self._queue.put_nowait((i, None))

    async def _direct(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The one prompt's outputs, as _pump would merge them (errors mapped, the request recorded)."""
        stream, self._stream = self._stream, None
        assert stream is not None
        try:
            async with aclosing(self.engine.outputs(f"{self.request_id}-0", stream)) as outs:
                async for out in outs:
                    self._first, self._last = self._first or time.monotonic(), out
                    yield 0, out
        except Exception as e:
            # refused by the engine thread (queue full since the check): not a request served
            self._recorded = self._recorded or (self._last is None and isinstance(e, QwenAwqError))
            raise _route_error(e) from None
        finally:
            self._observe()

    def _observe(self) -> None:
        if not self._recorded:
            self._recorded = True
            self.metrics.observe(_record(len(self.prompts[0]), self._last, self._start, self._first))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self._stream is not None:
            try:
                async with aclosing(self._direct()) as outs:
                    async for item in outs:
                        yield item
            finally:
                self.close()
            return
        remaining = len(self._tasks)
        try:
            while remaining:
                i, item = await self._queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            self.close()

    async def finals(self) -> list[RequestOutput]:
        """The last output of every prompt (non-streaming routes)."""
        last: dict[int, RequestOutput] = {}
        async with aclosing(self.outputs()) as outs:
            async for i, out in outs:
                last[i] = out
        return [last[i] for i in range(len(self.prompts))]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._stream is not None:  # one prompt whose outputs were never read (client gone before them)
            self._stream = None
            self.engine.release(f"{self.request_id}-0")
            self._observe()


def _route_error(e: Exception) -> Exception:
    """A failed step as the routes' 500; other errors as they are."""
    if isinstance(e, GenerationFailed):
        log.error("generation failed", exc_info=e)
        return APIError(Kind.GENERATION, str(e))
    return e


def _record(prompt_tokens: int, last: RequestOutput | None, start: float, first: float | None) -> RequestRecord:
    outputs = last.outputs if last is not None else []
    finished = last is not None and last.finished
    return RequestRecord(prompt_tokens, [len(o.token_ids) for o in outputs],
                         [o.finish_reason if finished else None for o in outputs], start, first, time.monotonic())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, run: Run) -> list[RequestOutput]:
    """A non-streaming reply's final outputs; a client that hangs up first aborts the generation (499)."""
    try:
        return await until_disconnect(request, run.finals())
    finally:
        run.close()  # also when the work was cancelled before it started


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client hangs up first; then cancel it (aborting its generation)."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    with suppress(asyncio.CancelledError):  # let the cancellation run: it aborts the engine requests
        await task
    raise ClientDisconnected()


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator and its Run however the response ends, so a client disconnect aborts the
    generation now, even one that hangs up before the first byte, rather than at garbage collection."""

    def __init__(self, events: AsyncGenerator[str | bytes, None], run: Run, media_type: str) -> None:
        super().__init__(events, media_type=media_type, headers=SSE_HEADERS)
        self.events, self.run = events, run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()
            self.run.close()


def event_stream(events: AsyncGenerator[str | bytes, None], run: Run, media_type: str = "text/event-stream"
                 ) -> Response:
    return ClosingStreamingResponse(events, run, media_type)
