"""Request bodies of every route (pydantic), read with a size cap and turned into one-line 4xx errors, and the
OpenAPI documentation of those bodies. Range checks of sampling values live in SamplingParams."""
from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen_awq.server.errors import APIError, Kind, validation_message

MAX_N = 128  # OpenAI's documented maximum for n
MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs maximum (vLLM's default max_logprobs is also 20)
M = TypeVar("M", bound=BaseModel)
SEED_RANGE = {"ge": -(2**63), "le": 2**64 - 1}  # what torch generators accept (vLLM's bounds too)


class Body(BaseModel):
    # Unknown fields are ignored, as vLLM does: clients send vendor extras we have no use for.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """OpenAI sampling fields plus vLLM's extras; None means "the model's generation_config default"."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as by vLLM


class FunctionCall(Body):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(Body):
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None


class FunctionDef(Body):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] | None = None


class ToolDef(Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ResponseFormat(Body):
    # json_object / json_schema are accepted but not enforced: no grammar-constrained decoding (documented).
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolDef | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | FunctionCall | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TGIParameters(Body):
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool = False
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    top_p: float | None = None
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, le=1)  # accepted, not applied (no typical sampling)
    watermark: bool = False  # accepted, not applied
    adapter_id: str | None = None


class TGIRequest(Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class VLLMGenerateRequest(Body):
    """vLLM's legacy api_server body: the prompt plus any SamplingParams field by name."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    stream: bool = False


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # accepted; the tokenizer adds BOS exactly when the model's config says


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


class TGITokenizeRequest(Body):
    inputs: str


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(Kind.TOO_LARGE, f"the request body has {declared} bytes; this server accepts at most "
                       f"{limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(Kind.TOO_LARGE, f"the request body exceeds {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(Kind.INVALID, f"the request body is not valid JSON: {e}") from None


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise APIError(Kind.INVALID, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(list(e.errors(include_url=False)))
        raise APIError(Kind.INVALID, message, param) from None


async def parse(request: Request, model: type[M], limit: int) -> M:
    return validate(model, await read_json(request, limit))


def body_doc(*models: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body read by hand (one model, or any of several)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


DOCUMENTED = (ChatRequest, CompletionRequest, TGIRequest, VLLMGenerateRequest, TokenizeRequest,
              DetokenizeRequest, TGITokenizeRequest)


def install_openapi(app: FastAPI) -> None:
    """Add the hand-read bodies' schemas to the app's OpenAPI document (routes reference them by name)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for m in DOCUMENTED:
                schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[m.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- response pieces shared by the OpenAI routes ---------------------------------------------------------
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens with this floor


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def top_entries(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely ids of an engine logprob entry (which also holds the chosen id, top or not)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def _lp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]], k: int
                  ) -> dict[str, Any]:
    def item(token_id: int, value: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode())}

    return {"content": [item(t, e[t]) | {"top_logprobs": [item(i, v) for i, v in top_entries(e, k)]}
                        for t, e in zip(token_ids, entries, strict=True)]}


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]], k: int,
                        offset: int = 0) -> dict[str, Any]:
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [_lp(e[t]) for t, e in zip(token_ids, entries, strict=True)],
            "top_logprobs": [{tokenizer.decode([i]): _lp(v) for i, v in top_entries(e, k)} for e in entries],
            "text_offset": offsets}
