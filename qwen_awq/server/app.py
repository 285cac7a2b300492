"""The FastAPI app: shared server state, the engine-request runner every route uses (merging a request's
prompts, recording metrics, aborting on disconnect), the API-key and crash guard, page, health, metrics."""
from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_awq import __version__
from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.llm_engine import RequestOutput
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import QwenAwqError
from qwen_awq.server.errors import (
    APIError,
    ClientDisconnected,
    Kind,
    as_api_error,
    error_response,
    install_error_handlers,
    log,
)
from qwen_awq.server.metrics import CONTENT_TYPE, Metrics, RequestRecord
from qwen_awq.server.protocol import install_openapi

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 16 << 20  # far above any prompt that fits a 32k context, small enough to refuse junk
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering events
PUBLIC_PATHS = frozenset({"/health", "/favicon.ico"})  # besides the page: open even with --api-key
T = TypeVar("T")


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    max_body_bytes: int
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.engine.model

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(Kind.NOT_FOUND, f"The model `{name}` does not exist; this server serves "
                           f"`{self.model_name}`.", param="model", code="model_not_found")

    def check_ids(self, ids: list[int], what: str = "prompt") -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(Kind.INVALID, f"{what} holds token ids outside [0, {vocab}): {bad[:5]}",
                           param=what)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


class Run:
    """The engine requests behind one HTTP request (one per prompt), merged into one (index, output) stream.

    Leaving early (client gone, error) cancels the per-prompt tasks, which aborts their engine requests.
    """

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams):
        self.state, self.request_id, self.prompts, self.params = state, request_id, prompts, params
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._refused: BaseException | None = None

    async def start(self) -> None:
        for ids in self.prompts:
            self.state.engine.check(ids, self.params)
        self._tasks = [asyncio.create_task(self._pump(i, ids)) for i, ids in enumerate(self.prompts)]
        # In this one loop turn each task runs up to its first wait inside AsyncEngine.generate, so a refusal
        # (queue full since the check above) is known before the reply's status line goes out.
        await asyncio.sleep(0)
        if self._refused is not None:
            self.close()
            raise self._refused

    async def _pump(self, i: int, ids: list[int]) -> None:
        start, first, last = time.monotonic(), None, None
        refused = False
        try:
            stream = self.state.engine.generate(f"{self.request_id}-{i}", ids, self.params)
            async with aclosing(stream) as outs:
                async for out in outs:
                    first, last = first or time.monotonic(), out
                    self._queue.put_nowait((i, out))
        except Exception as e:  # delivered to the consumer, which turns it into the route's error
            refused = last is None and isinstance(e, QwenAwqError)
            if refused and self._refused is None:
                self._refused = e
            self._queue.put_nowait((i, e))
        finally:
            if not refused:
                self.state.metrics.observe(RequestRecord(len(ids), last, start, first, time.monotonic()))
            self._queue.put_nowait((i, None))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, run: Run) -> list[RequestOutput]:
    """A non-streaming reply's final outputs; a client that hangs up first aborts the generation."""
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
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


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


def _is_public(scope: Scope) -> bool:
    path = scope.get("path", "")
    page = path == "/" and scope.get("method") in ("GET", "HEAD")
    return page or path in PUBLIC_PATHS or path.startswith("/static/")


class Guard:
    """Outermost layer: the API key on every route but /health and the page (which holds no data), and a
    500 with the route's error body, never a crash, for an exception no handler caught."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers", []))
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and not _is_public(scope) and not self._authorized(scope):
            error = APIError(Kind.AUTH, "missing or wrong API key: send `Authorization: Bearer <key>` with "
                             "the key given to --api-key", code="invalid_api_key")
            return await error_response(scope, error)(scope, receive, send)
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if started:  # the status line is out; all we can do is log and close the connection
                log.error("response failed after it started", exc_info=e)
                return
            await error_response(scope, as_api_error(e))(scope, receive, send)


def _misc_routes(app: FastAPI) -> None:
    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise APIError(Kind.NOT_FOUND, f"the web page is not installed ({index} is missing)")
        return FileResponse(index, media_type="text/html")


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The whole HTTP server; the app's lifespan starts the engine's step thread and shuts it down."""
    from qwen_awq.server import openai_api, tgi_api, vllm_api

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="qwen-awq", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState(async_engine, served_model_name, max_body_bytes,
                                   Metrics(async_engine, served_model_name))
    install_error_handlers(app)
    _misc_routes(app)
    app.include_router(openai_api.router)
    app.include_router(tgi_api.router)
    app.include_router(vllm_api.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_openapi(app)
    app.add_middleware(Guard, api_key=api_key)
    return app
