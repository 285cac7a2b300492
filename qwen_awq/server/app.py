"""The FastAPI app, wired: server state, the API-key and crash guard, the routes (OpenAI, TGI, vLLM, and the two
paths TGI and vLLM share, told apart by their bodies), page, health, metrics and the OpenAPI document."""
from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_awq import __version__
from qwen_awq.server import openai_api, tgi_api, vllm_api
from qwen_awq.server.errors import (
    APIError,
    Flavor,
    Kind,
    as_api_error,
    error_response,
    install_error_handlers,
    log,
    set_flavor,
)
from qwen_awq.server.metrics import CONTENT_TYPE, Metrics
from qwen_awq.server.protocol import (
    REQUESTS,
    TGIRequest,
    TGITokenizeRequest,
    TokenizeRequest,
    VLLMGenerateRequest,
    body_doc,
    json_object,
    read_json,
    validate,
)
from qwen_awq.server.responses import RESPONSES, Version
from qwen_awq.server.runner import Runner, ServerState, server_state

STATIC_DIR = Path(__file__).parent / "static"
# The default body cap: what a full context can use. 64 bytes per context token is about ten times an English
# token written as escaped JSON (\uXXXX for every non-ASCII character, as Python's json writes by default),
# and 1 MiB at least, for chat histories and token-id batches; --max-body-bytes raises it.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20
PUBLIC_PATHS = frozenset({"/health", "/favicon.ico"})  # besides the page: open even with --api-key


def default_max_body_bytes(max_model_len: int) -> int:
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


def _is_public(scope: Scope) -> bool:
    path = scope.get("path", "")
    page = path == "/" and scope.get("method") in ("GET", "HEAD")
    return page or path in PUBLIC_PATHS or path.startswith("/static/")


class Guard:
    """Outermost layer: the API key on every route but /health and the page (which holds no data), and a
    500 with the route's error body, never a crash, for an exception no handler caught."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    def _refusal(self, scope: Scope) -> APIError | None:
        """Why the request's credentials are refused: the scheme is case-insensitive (RFC 7235); two
        Authorization headers are ambiguous (a proxy may have added one), so they are refused."""
        given = [v for k, v in scope.get("headers", []) if k == b"authorization"]
        if len(given) > 1:
            return APIError(Kind.INVALID, f"the request has {len(given)} Authorization headers; send one")
        scheme, _, token = (given[0] if given else b"").strip().partition(b" ")
        assert self.api_key is not None
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode()):
            return None
        return APIError(Kind.AUTH, "missing or wrong API key: send `Authorization: Bearer <key>` with the key "
                        "given to --api-key", code="invalid_api_key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope) if self.api_key and not _is_public(scope) else None
        if refusal is not None:
            return await error_response(scope, refusal)(scope, receive, send)
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

    @app.get("/version", responses={200: {"model": Version}})
    async def version() -> Response:
        return Response(Version(version=__version__).model_dump_json(), media_type="application/json")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise APIError(Kind.NOT_FOUND, f"the web page is not installed ({index} is missing)")
        return FileResponse(index, media_type="text/html")


def _shared_routes(app: FastAPI) -> None:
    """POST /generate and /tokenize exist in both TGI and vLLM: a body with "inputs" is TGI's."""

    @app.post("/generate", openapi_extra=body_doc(TGIRequest, VLLMGenerateRequest))
    async def generate(request: Request) -> Response:
        state = server_state(request)
        data = json_object(await read_json(request, state.max_body_bytes))
        if "inputs" in data:
            return await tgi_api.tgi_generate(request, state, data, stream=False, as_list=False)
        return await vllm_api.generate(request, state, data)

    @app.post("/tokenize", openapi_extra=body_doc(TokenizeRequest, TGITokenizeRequest))
    async def tokenize(request: Request) -> Response:
        state = server_state(request)
        data = await read_json(request, state.max_body_bytes)
        if isinstance(data, dict) and "inputs" in data:
            set_flavor(request, Flavor.TGI)
            return await tgi_api.tgi_tokenize(state, validate(TGITokenizeRequest, data))
        return await vllm_api.tokenize(state, data)


def install_openapi(app: FastAPI) -> None:
    """Add the hand-read bodies' and the replies' schemas to the OpenAPI document (routes name them)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for m in (*REQUESTS, *RESPONSES):
                schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[m.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(engine: Any, served_model_name: str, api_key: str | None = None, max_body_bytes: int | None = None,
               special_tokens_in_prompts: bool = True) -> FastAPI:
    """The whole HTTP server for an AsyncEngine; the app's lifespan starts its step thread and shuts it down.
    max_body_bytes None: what the context can use (default_max_body_bytes)."""
    runner = Runner(engine, special_tokens_in_prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            runner.shutdown()

    app = FastAPI(title="qwen-awq", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    limit = max_body_bytes or default_max_body_bytes(runner.max_model_len)
    app.state.server = ServerState(runner, served_model_name, limit, Metrics(runner.stats, served_model_name))
    install_error_handlers(app)
    _misc_routes(app)
    _shared_routes(app)
    for module in (openai_api, tgi_api, vllm_api):
        app.include_router(module.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_openapi(app)
    app.add_middleware(Guard, api_key=api_key)
    return app
