"""Request bodies of every route (strict pydantic models: "10" is not an integer, "yes" not a boolean), and the
one reader of request bodies: JSON content type, a size cap, and a parser that refuses lone UTF-16 surrogates,
NaN and nesting deeper than 200 levels as one-line 4xx errors. Range checks of sampling values live in
SamplingParams; structured-output fields of every spelling are read here into `Constraint`s (the runner compiles
them)."""
from __future__ import annotations

from typing import Any, Literal, NamedTuple, TypeVar

import pydantic_core
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen_awq.server.errors import APIError, Kind, validation_message

MAX_N = 128  # OpenAI's documented maximum for n
MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs maximum (vLLM's default max_logprobs is also 20)
M = TypeVar("M", bound=BaseModel)
SEED = {"ge": -(2**63), "le": 2**64 - 1}  # what torch generators accept (vLLM's bounds too)


class Constraint(NamedTuple):
    """One structured-output field of a request, as the engine's kinds name it: json_object, json_schema (value:
    the schema), regex, choice (a list of strings) or grammar (Lark/GBNF text)."""

    param: str  # the field it came from, for the error
    kind: str
    value: Any = None


class Body(BaseModel):
    # Unknown fields are ignored, as vLLM does: clients send vendor extras we have no use for. Strict: a
    # number sent as a string or a boolean as a word is the client's mistake, not something to guess at.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # accepted: the schema is always enforced


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint("response_format", "json_object")
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                return Constraint("response_format.json_schema", "json_schema", None)  # refused by the runner
            return Constraint("response_format.json_schema", "json_schema", self.json_schema.schema_)
        return None


class GuidedFields(Body):
    """vLLM's structured-output extras (and OpenAI's response_format): at most one of them per request."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraints(self) -> list[Constraint]:
        given = [("guided_json", "json_schema", self.guided_json), ("guided_regex", "regex", self.guided_regex),
                 ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "grammar", self.guided_grammar)]
        return [Constraint(*c) for c in given if c[2] is not None]


class SamplingFields(GuidedFields):
    """OpenAI sampling fields plus vLLM's extras; None means "the model's generation_config default"."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # vLLM: sample best_of, return the n most likely
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, **SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as by vLLM
    response_format: ResponseFormat | None = None

    def constraints(self) -> list[Constraint]:
        own = self.response_format.constraint() if self.response_format is not None else None
        return ([own] if own is not None else []) + super().constraints()


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


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolDef | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | FunctionCall | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TGIGrammar(Body):
    """TGI's grammar: {"type": "json", "value": schema} | {"type": "regex", "value": pattern} | {"type":
    "json_schema", "value": {"name", "schema"}} (TGI 3)."""

    type: Literal["json", "regex", "json_schema"]
    value: Any

    def constraint(self) -> Constraint:
        if self.type == "regex":
            return Constraint("grammar", "regex", self.value)
        schema = self.value.get("schema") if self.type == "json_schema" and isinstance(self.value, dict) else \
            self.value
        return Constraint("grammar", "json_schema", schema)


class TGIParameters(Body):
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: TGIGrammar | None = None
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


class VLLMGenerateRequest(GuidedFields):
    """vLLM's legacy api_server body: the prompt plus SamplingParams fields by name (None: vLLM's default), and
    vLLM's guided_* fields. Other names are kept as extras and refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)
    prompt: str
    stream: bool = False
    n: int | None = Field(None, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    use_beam_search: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, **SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    skip_special_tokens: bool | None = None


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


REQUESTS = (ChatRequest, CompletionRequest, TGIRequest, VLLMGenerateRequest, TokenizeRequest,
            DetokenizeRequest, TGITokenizeRequest)


def _check_media_type(request: Request) -> None:
    """A JSON body, as the clients of all three APIs send it; no header at all is read as JSON too."""
    given = request.headers.getlist("content-type")
    media = given[0].split(";")[0].strip().lower() if given else "application/json"
    if len(given) > 1 or not (media == "application/json" or media.endswith("+json")):
        raise APIError(Kind.MEDIA_TYPE, f"the request body must be JSON: send `Content-Type: application/json` "
                       f"(got {', '.join(given)!r})")


def _parse(raw: bytes) -> Any:
    try:
        # pydantic-core's parser: no recursion (it stops at 200 levels), and lone surrogates are an error
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        hint = ""
        if "surrogate" in str(e) or "end of hex escape" in str(e):  # jiter's words for an unpaired \ud800
            hint = " (a lone UTF-16 surrogate escape such as \\ud800 is not a character)"
        elif "recursion limit" in str(e):
            hint = " (it nests deeper than 200 levels)"
        raise APIError(Kind.INVALID, f"the request body is not valid JSON: {e}{hint}") from None


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    _check_media_type(request)
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
    return _parse(b"".join(chunks))


def json_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise APIError(Kind.INVALID, f"the request body must be a JSON object, got {_json_type(data)}")
    return data


def _json_type(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), "null")


def validate(model: type[M], data: Any, prefix: str = "", with_param: bool = True) -> M:
    """`data` as `model`, or a 4xx naming the first bad field (OpenAI's `param`, unless with_param is off)."""
    try:
        return model.model_validate(json_object(data))
    except ValidationError as e:
        message, param = validation_message(list(e.errors(include_url=False)))
        raise APIError(Kind.INVALID, prefix + message, param if with_param else None) from None


async def parse(request: Request, model: type[M], limit: int) -> M:
    return validate(model, await read_json(request, limit))


def body_doc(*models: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body read by hand (one model, or any of several); the app adds the
    models' schemas to its OpenAPI document."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
