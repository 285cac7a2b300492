"""HTTP errors: one exception the routes raise, rendered as each API's error body (OpenAI or TGI).

Which body a request gets is its route's "flavor": fixed by path, or set by a route that tells TGI from vLLM
bodies. User errors (QwenAwqError) map to 4xx/503; anything else is a 500 with the same body. This module knows
nothing of the engine: the runner turns engine failures into APIError(Kind.GENERATION).
"""
from __future__ import annotations

import enum
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from qwen_awq.errors import Overloaded, QwenAwqError

log = logging.getLogger("qwen_awq.server")
RETRY_AFTER_S = 1  # a queue slot frees when any request finishes, typically well within a second
FLAVOR_KEY = "qwen_awq.flavor"  # where a route records its flavor in the ASGI scope


class Flavor(enum.Enum):
    OPENAI = "openai"  # OpenAI and vLLM routes: {"error": {"message", "type", "param", "code"}}
    TGI = "tgi"  # Hugging Face TGI routes: {"error": str, "error_type": str}


class Kind(enum.Enum):
    """What went wrong; each kind has its (status, type) per flavor."""

    INVALID = ((400, "invalid_request_error"), (422, "validation"))
    AUTH = ((401, "authentication_error"), (401, "authentication"))
    NOT_FOUND = ((404, "not_found_error"), (404, "not_found"))
    METHOD = ((405, "invalid_request_error"), (405, "validation"))
    TOO_LARGE = ((413, "invalid_request_error"), (413, "validation"))
    MEDIA_TYPE = ((415, "invalid_request_error"), (415, "validation"))  # axum's and FastAPI's status for it
    OVERLOADED = ((503, "service_unavailable_error"), (429, "overloaded"))
    GENERATION = ((500, "internal_server_error"), (424, "generation"))
    INTERNAL = ((500, "internal_server_error"), (500, "incomplete_generation"))


class APIError(Exception):
    def __init__(self, kind: Kind, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.param, self.code = kind, message, param, code

    def status(self, flavor: Flavor) -> int:
        return self.kind.value[flavor is Flavor.TGI][0]

    def body(self, flavor: Flavor) -> dict[str, Any]:
        status, kind = self.kind.value[flavor is Flavor.TGI]
        if flavor is Flavor.TGI:
            prefix = "Input validation error: " if self.kind is Kind.INVALID else ""
            return {"error": prefix + self.message, "error_type": kind}
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code or status}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.kind is Kind.OVERLOADED else {}


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as an APIError: user errors keep their message; bugs become a generic 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Overloaded):
        return APIError(Kind.OVERLOADED, str(exc))
    if isinstance(exc, QwenAwqError):
        return APIError(Kind.INVALID, str(exc))
    log.error("request failed", exc_info=exc)
    return APIError(Kind.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log")


TGI_PATHS = frozenset({"/generate_stream", "/info"})


def set_flavor(request: Request, flavor: Flavor) -> None:
    request.scope[FLAVOR_KEY] = flavor


def flavor_of(scope: Scope) -> Flavor:
    """The route's flavor: set by the route, else by path (POST / and /generate default to TGI's body)."""
    if FLAVOR_KEY in scope:
        return scope[FLAVOR_KEY]
    path = scope.get("path", "")
    tgi = path in TGI_PATHS or path == "/generate" or (path == "/" and scope.get("method") == "POST")
    return Flavor.TGI if tgi else Flavor.OPENAI


def error_response(scope: Scope, error: APIError) -> JSONResponse:
    flavor = flavor_of(scope)
    return JSONResponse(error.body(flavor), status_code=error.status(flavor), headers=error.headers())


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's first error as one line naming the field, and the field (OpenAI's `param`)."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    return (f"{field}: {first.get('msg', 'invalid value')}" if field else first.get("msg", "invalid request"),
            field)


class ClientDisconnected(Exception):
    """The client went away before a non-streaming reply was ready (its generation was aborted)."""


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        return error_response(request.scope, as_api_error(exc))

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(list(exc.errors()))
        return error_response(request.scope, APIError(Kind.INVALID, message, param))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kinds = {404: Kind.NOT_FOUND, 405: Kind.METHOD, 413: Kind.TOO_LARGE, 401: Kind.AUTH}
        kind = kinds.get(exc.status_code, Kind.INVALID)
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return error_response(request.scope, APIError(kind, message))

    async def gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(QwenAwqError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, gone)
