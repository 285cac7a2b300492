"""Response bodies of every route (pydantic models, one per wire object of the OpenAI, TGI and vLLM APIs), and
the builders of their token-level parts (logprobs with each token's true bytes, TGI tokens), and the writers of
the per-token stream events that skip building the models (byte-equal to their dumps)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, model_serializer
from pydantic_core import to_json

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens with this floor


class Out(BaseModel):
    """A wire object: the fields named in `optional` are sent only when they were given (as vLLM and TGI dump
    theirs with exclude_unset); the others always, null included."""

    optional: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if k not in self.optional or k in self.model_fields_set}


# --- OpenAI ------------------------------------------------------------------------------------------------
class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(Out):
    token: str
    logprob: float
    bytes: list[int]  # the token's own bytes, which may be part of a character


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Out):
    content: list[TokenLogprob]


class CompletionLogprobs(Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCallOut(Out):
    name: str
    arguments: str


class ToolCallOut(Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionDelta(Out):
    """A streamed piece of a call: its name first (with empty arguments), then pieces of the arguments."""

    optional = frozenset({"name", "arguments"})
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Out):
    """A streamed piece of tool call `index`: id, type and name in its first delta only (OpenAI's chunks)."""

    optional = frozenset({"id", "type"})
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class AssistantMessage(Out):
    optional = frozenset({"tool_calls", "function_call"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None


class Delta(Out):
    optional = frozenset({"role", "content", "tool_calls", "function_call"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None


class ChatChoice(Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatChunkChoice(Out):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class CompletionChoice(Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Head(Out):
    """What every OpenAI reply and chunk starts with; with include_usage every chunk carries "usage", null but
    in the last."""

    optional = frozenset({"usage"})  # chunks: given (as null) only with include_usage
    id: str
    object: Literal["chat.completion", "chat.completion.chunk", "text_completion"]
    created: int
    model: str
    usage: Usage | None = None


class ChatCompletion(Head):
    choices: list[ChatChoice]


class ChatCompletionChunk(Head):
    choices: list[ChatChunkChoice]


class Completion(Head):
    choices: list[CompletionChoice]


class ModelCard(Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen-awq"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- TGI ---------------------------------------------------------------------------------------------------
class TGIToken(Out):
    id: int
    text: str
    logprob: float
    special: bool


class Sequence(Out):
    optional = frozenset({"top_tokens"})
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[TGIToken]
    tokens: list[TGIToken]
    top_tokens: list[list[TGIToken]] | None = None


class BestOfSequence(Sequence):
    generated_text: str


class Details(Sequence):
    optional = frozenset({"top_tokens", "best_of_sequences"})
    best_of_sequences: list[BestOfSequence] | None = None


class Generated(Out):
    optional = frozenset({"details"})
    generated_text: str
    details: Details | None = None


class StreamDetails(Out):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamEvent(Out):
    optional = frozenset({"top_tokens"})
    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = None
    generated_text: str | None
    details: StreamDetails | None


class TokenSpan(Out):
    id: int
    text: str
    start: int
    stop: int


class Info(Out):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int
    max_total_tokens: int
    max_batch_size: int
    max_batch_total_tokens: int
    validation_workers: int = 1
    max_client_batch_size: int = 1
    router: str = "qwen-awq"
    version: str
    sha: str | None = None
    docker_label: str | None = None


# --- vLLM --------------------------------------------------------------------------------------------------
class VLLMOutput(Out):
    text: list[str]  # the prompt followed by each of the n outputs


class Tokenized(Out):
    count: int
    max_model_len: int
    tokens: list[int]


class Detokenized(Out):
    prompt: str


class Version(Out):
    version: str


def dumps(value: Any) -> str:
    """JSON as model_dump_json spells it, by pydantic's own serializer: compact, non-ASCII kept as UTF-8, floats
    in its notation (-0.00001 and 1e-7, where json.dumps writes -1e-05 and 1e-07), NaN and infinities as null;
    for values of the types the model's fields hold (a float field's 0 as 0.0). A quarter of json.dumps's time."""
    return to_json(value, inf_nan_mode="null").decode()


def _json_or_null(body: Out | None) -> str:
    return "null" if body is None else body.model_dump_json()


class ChunkFrame:
    """A stream's chunks as SSE events, its head (id, object, created, model, usage null) serialized once by
    its pydantic model and each chunk's one choice by `dumps`: building and dumping the models for every
    token was a fifth of the event loop's time at 128 streams (issue 12). Tests hold it byte-equal to the
    models."""

    def __init__(self, model: type[Head], head: dict[str, Any]) -> None:
        empty = model(**head, choices=[]).model_dump_json()  # {...,"choices":[]}
        self._prefix = "data: " + empty[:-len("]}")]

    def event(self, choice: str) -> str:
        return f"{self._prefix}{choice}]}}\n\n"

    def text(self, index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None) -> str:
        """A completion chunk (CompletionChoice)."""
        return self.event(f'{{"index":{index},"text":{dumps(text)},"logprobs":{_json_or_null(logprobs)},'
                          f'"finish_reason":{dumps(finish)}}}')

    def delta(self, index: int, delta: str, logprobs: ChatLogprobs | None, finish: str | None) -> str:
        """A chat chunk (ChatChunkChoice) around an already serialized delta (content_delta or a Delta's)."""
        return self.event(f'{{"index":{index},"delta":{delta},"logprobs":{_json_or_null(logprobs)},'
                          f'"finish_reason":{dumps(finish)}}}')


def content_delta(content: str) -> str:
    """Delta(content=...) serialized (Delta() when empty)."""
    return f'{{"content":{dumps(content)}}}' if content else "{}"


def tgi_token(token_id: int, text: str, logprob: float, special: bool) -> dict[str, Any]:
    """A TGIToken's fields as its model holds them (logprob a float: the model writes 0 as 0.0)."""
    return {"id": token_id, "text": text, "logprob": float(logprob), "special": special}


def stream_event(index: int, token: dict[str, Any], top_tokens: list[dict[str, Any]] | None = None,
                 generated_text: str | None = None, details: StreamDetails | None = None) -> str:
    """A TGI stream event as SSE, byte-equal to StreamEvent's dump (tests hold it so) without validating the
    models per token: StreamEvent and TGIToken cost ~7 us a token on the event loop, this ~1 us (issue 12)."""
    event: dict[str, Any] = {"index": index, "token": token}
    if top_tokens is not None:
        event["top_tokens"] = top_tokens
    event |= {"generated_text": generated_text, "details": None if details is None else details.model_dump()}
    return f"data:{dumps(event)}\n\n"


class TextFrame:
    """vLLM's legacy stream chunks, {"text": [prompt + output, ...]}, byte-equal to VLLMOutput's dump: the
    prompt, in every chunk, is escaped once per stream (JSON escapes character by character, so escaped
    pieces concatenate)."""

    def __init__(self, prompt: str) -> None:
        self._prompt = dumps(prompt)[:-1]  # the prompt's JSON string less its closing quote

    def chunk(self, outputs: list[str]) -> str:
        return '{"text":[' + ",".join(self._prompt + dumps(text)[1:] for text in outputs) + "]}"


RESPONSES = (ChatCompletion, ChatCompletionChunk, Completion, ModelList, Generated, StreamEvent, Info,
             VLLMOutput, Tokenized, Detokenized, Version)


# --- token-level builders ----------------------------------------------------------------------------------
def _lp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def top_entries(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely ids of an engine logprob entry (which also holds the chosen id, top or not)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]], k: int) -> ChatLogprobs:
    def item(token_id: int, value: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.decode([token_id]), logprob=_lp(value),
                          bytes=list(tokenizer.id_to_token_bytes(token_id)))

    content = [TokenLogprob(**item(t, e[t]).model_dump(), top_logprobs=[item(i, v) for i, v in top_entries(e, k)])
               for t, e in zip(token_ids, entries, strict=True)]
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]], k: int,
                        offset: int = 0) -> CompletionLogprobs:
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[_lp(e[t]) for t, e in zip(token_ids, entries, strict=True)],
        top_logprobs=[{tokenizer.decode([i]): _lp(v) for i, v in top_entries(e, k)} for e in entries],
        text_offset=offsets)
