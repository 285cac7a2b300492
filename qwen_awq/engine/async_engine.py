"""The engine for the server: a background thread runs steps; each request is an async iterator of outputs.

Adds and aborts are queued and applied by the step thread between steps, so the engine itself is never touched
by two threads at once. A step's outputs cross to each event loop in one call_soon_threadsafe (one self-pipe
write and one loop wake-up per step, not one per request: issue 12's profile had the engine thread spend 40% of
its time in those writes at 128 streams), or none when the loop has not yet run the last one (they are added to
it: each write drops the GIL, and retaking it waits while the loop is busy). `shutdown()` stops and joins the thread.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from qwen_awq.engine.llm_engine import LLMEngine, RequestOutput
from qwen_awq.engine.sampling_params import SamplingParams

IDLE_WAIT_S = 0.05  # how long the idle step thread sleeps between checks for new work


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None
    cache_salt: str | None


class GenerationFailed(RuntimeError):
    """A step of the engine failed; every request in flight at the time gets this error."""


class StreamingGenerate:
    """generate() for an engine with submit() and outputs(): AsyncEngine and the data-parallel front share it."""

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; leaving the iteration early (client gone) aborts it and frees its blocks."""
        stream = self.submit(request_id, prompt_ids, params, prompt, cache_salt)
        async with aclosing(self.outputs(request_id, stream)) as outs:
            async for out in outs:
                yield out


class AsyncEngine(StreamingGenerate):
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[_Add | str] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = 0  # adds queued but not yet seen by the step thread (for the Overloaded check)
        self._lock = threading.Lock()
        # per event loop, the items handed off that it has not run yet (the engine thread appends to them)
        self._unread: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]] = {}
        self._handoff_lock = threading.Lock()
        self.errors = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="qwen-awq-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise at once what the engine would refuse (its one admission rule), counting adds on their way."""
        self.engine.check_request(len(prompt_ids), params, pending=self._pending)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
               cache_salt: str | None = None) -> asyncio.Queue:
        """Queue the request now (raising at once what the engine would refuse); read its outputs with
        `outputs(request_id, stream)`, or give it up with `release`."""
        self.check(prompt_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        with self._lock:
            self._pending += params.n
        self._commands.put(_Add(request_id, prompt_ids, params, prompt, cache_salt))
        self._wake.set()
        return stream

    async def outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """A submitted request's outputs up to its finished one; leaving early aborts it."""
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def release(self, request_id: str) -> None:
        """Give up a submitted request whose outputs are not being read: forget its stream and abort it (nothing
        to do once `outputs` has ended)."""
        if self._streams.pop(request_id, None) is not None:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its request's stream (requests already gone are skipped), one hand-off per loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                batches.setdefault(target[0], []).append((target[1], item))
        for loop, batch in batches.items():
            with self._handoff_lock:
                unread = self._unread.get(loop)
                if unread is not None:  # that loop has not run the last hand-off yet: this step rides along
                    unread.extend(batch)
                    continue
                self._unread[loop] = batch
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:  # the loop is closed: its streams are gone with it
                with self._handoff_lock:
                    del self._unread[loop]
                raise

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: the steps' items handed off since the last drain into their streams, in order."""
        with self._handoff_lock:
            batch = self._unread.pop(loop)
        for stream, item in batch:
            stream.put_nowait(item)

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, str):
                self.engine.abort(cmd)
                continue
            with self._lock:
                self._pending -= cmd.params.n
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.prompt, cmd.cache_salt)
            except Exception as e:  # refused by the scheduler (e.g. Overloaded): tell that client only
                self._deliver(cmd.request_id, e)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failing step must not kill the server: fail the requests in flight
                self.errors += 1
                self._fail_all(e)
                continue
            self._deliver_all([(out.request_id, out.snapshot()) for out in outputs])

    def _fail_all(self, error: Exception) -> None:
        failed = list(self.engine.requests)
        for request_id in failed:
            self.engine.abort(request_id)
        self._deliver_all([(request_id, GenerationFailed(f"generation failed: {error}")) for request_id in failed])
