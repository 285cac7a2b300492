"""OpenAI-compatible routes (vLLM's server is the reference): /v1/chat/completions, /v1/completions and
/v1/models. Chat and completions share one handler; a Job of each kind builds the prompts and renders replies.

Absent sampling fields take the model's generation_config.json values. max_tokens defaults: chat, the room
left in the context capped by the model's max_new_tokens; completions, 16 (vLLM's default). best_of (vLLM's
extra) samples best_of and returns the n with the highest cumulative logprob; it cannot stream. response_format
json_object/json_schema and vLLM's guided_json/regex/choice/grammar are enforced by a grammar (at most one per
request); with tools, the ReAct reply is (a call must be, with tool_choice "required" or a named function).
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.responses import Response

from qwen_awq.server.errors import APIError, Flavor, Kind, as_api_error
from qwen_awq.server.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Constraint,
    SamplingFields,
    body_doc,
    parse,
)
from qwen_awq.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkFrame,
    Completion,
    CompletionChoice,
    Delta,
    FunctionCallOut,
    FunctionDelta,
    ModelCard,
    ModelList,
    Out,
    ToolCallDelta,
    ToolCallOut,
    Usage,
    chat_logprobs,
    completion_logprobs,
    content_delta,
)
from qwen_awq.server.runner import (
    CompletionOutput,
    Defaults,
    GuidedSpec,
    RequestOutput,
    Run,
    SamplingParams,
    ServerState,
    collect,
    event_stream,
    server_state,
)
from qwen_awq.server.tools import (
    STOP_WORDS,
    ReplyStream,
    Tool,
    chat_prompt_ids,
    offered_tools,
    parse_reply,
    reply_grammar,
)

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's legacy) default for /v1/completions
PASSED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
          "seed", "min_tokens", "stop_token_ids", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
DONE = "data: [DONE]\n\n"
R = TypeVar("R", bound=SamplingFields)


def sse(payload: Out | dict[str, Any]) -> str:
    text = payload.model_dump_json() if isinstance(payload, Out) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n"


def json_reply(body: Out) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def sampling_params(state: ServerState, req: SamplingFields, max_tokens: int, logprobs: int | None,
                    extra_stop: tuple[str, ...] = (), guided: GuidedSpec | None = None) -> SamplingParams:
    if req.stream_options is not None and not req.stream:
        raise APIError(Kind.INVALID, "stream_options is only allowed with stream=true", param="stream_options")
    if req.stop_token_ids:
        state.runner.check_ids(req.stop_token_ids, "stop_token_ids")
    samples = req.n
    if req.best_of is not None:
        if req.best_of < req.n:
            raise APIError(Kind.INVALID, f"best_of must be >= n, got best_of={req.best_of} and n={req.n}",
                           param="best_of")
        if req.stream and req.best_of > req.n:
            raise APIError(Kind.INVALID, "best_of > n is not supported when streaming", param="best_of")
        samples = req.best_of
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields = {name: getattr(req, name) for name in PASSED}
    return state.runner.params(fields | {"n": samples, "max_tokens": max_tokens, "logprobs": logprobs,
                                         "stop": stop + list(extra_stop), "guided": guided}, Defaults.MODEL)


@dataclass
class Job:
    """What a route asked of the engine, and how to render the answer."""

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    n: int  # choices per prompt in the reply (params.n samples of them with best_of)
    top_logprobs: int | None  # None: no logprobs in the reply
    include_usage: bool

    def head(self, state: ServerState, kind: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": kind, "created": int(time.time()), "model": state.model_name}

    def usage(self, finals: list[RequestOutput]) -> Usage:
        return Usage.of(sum(len(p) for p in self.prompts), sum(len(o.token_ids) for f in finals for o in f.outputs))

    def best(self, out: RequestOutput) -> list[CompletionOutput]:
        """The n choices of one prompt: all of them, or with best_of the n most likely, in that order."""
        if len(out.outputs) == self.n:
            return out.outputs
        ranked = sorted(out.outputs, key=lambda o: -o.cumulative_logprob)[:self.n]
        return [dataclasses.replace(o, index=i) for i, o in enumerate(ranked)]

    def reply(self, state: ServerState, finals: list[RequestOutput]) -> Out:
        raise NotImplementedError

    def events(self, state: ServerState, run: Run) -> AsyncGenerator[str, None]:
        raise NotImplementedError


def _delta_logprobs(state: ServerState, job: Job, o: CompletionOutput, chat: bool, offset: int = 0):
    if job.top_logprobs is None or o.logprobs is None or not o.delta_token_ids:
        return None
    n = len(o.delta_token_ids)
    ids, entries = o.token_ids[-n:], o.logprobs[-n:]
    if chat:
        return chat_logprobs(state.tokenizer, ids, entries, job.top_logprobs)
    return completion_logprobs(state.tokenizer, ids, entries, job.top_logprobs, offset)


async def serve(request: Request, body: type[R], build: Callable[[ServerState, R], Awaitable[Job]]) -> Response:
    """The one handler of chat and completions: parse, build the job, run it, stream or collect the reply."""
    state = server_state(request)
    req = await parse(request, body, state.max_body_bytes)
    state.check_model(req.model)
    job = await build(state, req)
    run = await state.start(job.request_id, job.prompts, job.params)
    if req.stream:
        return event_stream(job.events(state, run), run)
    finals = await collect(request, run)
    return json_reply(await state.runner.offload(job.reply, state, finals))


async def guarded(events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """An OpenAI event stream: an error after the stream started is one error event; then [DONE]."""
    try:
        async with aclosing(events) as inner:
            async for event in inner:
                yield event
    except Exception as e:
        yield sse(as_api_error(e).body(Flavor.OPENAI))
    yield DONE


# --- chat --------------------------------------------------------------------------------------------------
@dataclass
class ChatJob(Job):
    tools: list[Tool]
    legacy_functions: bool

    def finish_reason(self, o: CompletionOutput, called: bool) -> str | None:
        if called and o.finish_reason == "stop":  # a call cut by max_tokens still says "length"
            return "function_call" if self.legacy_functions else "tool_calls"
        return o.finish_reason

    def choice(self, state: ServerState, o: CompletionOutput) -> ChatChoice:
        message, finish = AssistantMessage(content=o.text), o.finish_reason
        if self.tools:
            reply = parse_reply(o.text)
            message = AssistantMessage(content=reply.content)
            finish = self.finish_reason(o, bool(reply.calls))
            if reply.calls:
                calls = [FunctionCallOut(name=c.name, arguments=c.arguments) for c in reply.calls]
                if self.legacy_functions:
                    message = AssistantMessage(content=reply.content, function_call=calls[0])
                else:
                    message = AssistantMessage(content=reply.content, tool_calls=[
                        ToolCallOut(id=_call_id(), function=c) for c in calls])
        logprobs = None
        if self.top_logprobs is not None and o.logprobs is not None:
            logprobs = chat_logprobs(state.tokenizer, o.token_ids, o.logprobs, self.top_logprobs)
        return ChatChoice(index=o.index, message=message, logprobs=logprobs, finish_reason=finish)

    def reply(self, state: ServerState, finals: list[RequestOutput]) -> Out:
        return ChatCompletion(**self.head(state, "chat.completion"), usage=self.usage(finals),
                              choices=[self.choice(state, o) for o in self.best(finals[0])])

    def events(self, state: ServerState, run: Run) -> AsyncGenerator[str, None]:
        return guarded(self._events(state, run))

    def tool_delta(self, pieces: list[tuple[str, str]]) -> Delta:
        """A streamed reply's pieces (tools.ReplyStream) as one OpenAI delta: content, then the call's first
        delta (id, type, name) or pieces of its arguments; the legacy API streams `function_call` instead."""
        content = "".join(p for kind, p in pieces if kind == "content") or None
        name = next((p for kind, p in pieces if kind == "call"), None)
        arguments = "".join(p for kind, p in pieces if kind == "arguments")
        if name is None and not arguments:
            return Delta(content=content) if content else Delta()
        function = FunctionDelta(name=name, arguments=arguments) if name else FunctionDelta(arguments=arguments)
        if self.legacy_functions:
            return Delta(content=content, function_call=function) if content else Delta(function_call=function)
        call = ToolCallDelta(index=0, id=_call_id(), type="function", function=function) if name else \
            ToolCallDelta(index=0, function=function)
        return Delta(content=content, tool_calls=[call]) if content else Delta(tool_calls=[call])

    async def _events(self, state: ServerState, run: Run) -> AsyncGenerator[str, None]:
        head = self.head(state, "chat.completion.chunk") | ({"usage": None} if self.include_usage else {})
        frame = ChunkFrame(ChatCompletionChunk, head)
        for i in range(self.n):
            yield frame.delta(i, Delta(role="assistant", content="").model_dump_json(), None, None)
        final, reported = None, set()
        replies = [ReplyStream() for _ in range(self.n)]
        async with aclosing(run.outputs()) as outs:
            async for _, out in outs:
                final = out
                for o in out.outputs:
                    lp = _delta_logprobs(state, self, o, chat=True)
                    delta, finish = content_delta(o.delta_text), o.finish_reason
                    if self.tools:
                        reply = replies[o.index]
                        delta = self.tool_delta(reply.feed(o.text, final=finish is not None)).model_dump_json()
                        finish = self.finish_reason(o, reply.sent.name is not None)
                    if delta != "{}" or lp or (finish and o.index not in reported):
                        if finish:
                            reported.add(o.index)
                        yield frame.delta(o.index, delta, lp, finish)
        if self.include_usage and final is not None:
            yield sse(ChatCompletionChunk(**head | {"usage": self.usage([final])}, choices=[]))


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _texts(messages: list[ChatMessage]) -> list[str]:
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append(m.content)
        else:
            out += [p.text for p in m.content or [] if p.text is not None]
    return out


async def chat_job(state: ServerState, req: ChatRequest) -> ChatJob:
    offer = offered_tools(req)
    runner = state.runner
    await runner.refuse_oversized(_texts(req.messages), "conversation")
    ids, continued = await runner.offload(chat_prompt_ids, runner.tokenizer, req.messages, offer.tools,
                                          runner.chat_window)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(Kind.INVALID, "top_logprobs requires logprobs=true", param="top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    constraints = req.constraints()
    if offer.forced and constraints:
        raise APIError(Kind.INVALID, "a required tool call cannot also follow " + constraints[0].param,
                       param=constraints[0].param)
    react = bool(offer.tools) and not constraints  # the reply grammar holds the ReAct format
    if react:
        constraints = [Constraint("tools", "grammar", reply_grammar(offer.tools, offer.forced, continued))]
    guided = await runner.guided(constraints)
    stop = STOP_WORDS if offer.tools and not react else ()  # the grammar itself ends a reply after a call
    params = sampling_params(state, req, runner.chat_max_tokens(len(ids)) if asked is None else asked, top, stop,
                             guided)
    usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatJob(f"chatcmpl-{uuid.uuid4().hex}", [ids], params, req.n, top, usage, offer.tools, offer.legacy)


@router.post("/v1/chat/completions", openapi_extra=body_doc(ChatRequest),
             responses={200: {"model": ChatCompletion}})
async def chat_completions(request: Request) -> Response:
    return await serve(request, ChatRequest, chat_job)


# --- completions -------------------------------------------------------------------------------------------
@dataclass
class CompletionJob(Job):
    echo: list[str] | None  # with echo: each prompt's text

    def choice(self, state: ServerState, i: int, o: CompletionOutput) -> CompletionChoice:
        logprobs = None
        if self.top_logprobs is not None and o.logprobs is not None:
            logprobs = completion_logprobs(state.tokenizer, o.token_ids, o.logprobs, self.top_logprobs)
        return CompletionChoice(index=i * self.n + o.index, text=(self.echo[i] if self.echo else "") + o.text,
                                logprobs=logprobs, finish_reason=o.finish_reason)

    def reply(self, state: ServerState, finals: list[RequestOutput]) -> Out:
        choices = [self.choice(state, i, o) for i, out in enumerate(finals) for o in self.best(out)]
        return Completion(**self.head(state, "text_completion"), usage=self.usage(finals), choices=choices)

    def events(self, state: ServerState, run: Run) -> AsyncGenerator[str, None]:
        return guarded(self._events(state, run))

    async def _events(self, state: ServerState, run: Run) -> AsyncGenerator[str, None]:
        head = self.head(state, "text_completion") | ({"usage": None} if self.include_usage else {})
        frame = ChunkFrame(Completion, head)
        finals: dict[int, RequestOutput] = {}
        started, reported = set(), set()
        async with aclosing(run.outputs()) as outs:
            async for i, out in outs:
                finals[i] = out
                for o in out.outputs:
                    index = i * self.n + o.index
                    text = (self.echo[i] if self.echo and index not in started else "") + o.delta_text
                    started.add(index)
                    lp = _delta_logprobs(state, self, o, chat=False, offset=len(o.text) - len(o.delta_text))
                    if text or lp or (o.finish_reason and index not in reported):
                        if o.finish_reason:
                            reported.add(index)
                        yield frame.text(index, text, lp, o.finish_reason)
        if self.include_usage:
            yield sse(Completion(**head | {"usage": self.usage(list(finals.values()))}, choices=[]))


async def completion_job(state: ServerState, req: CompletionRequest) -> CompletionJob:
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt, as text or as token ids
    if not prompt:
        raise APIError(Kind.INVALID, "prompt must not be empty", param="prompt")
    if req.suffix:
        raise APIError(Kind.INVALID, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.echo and req.logprobs is not None:
        raise APIError(Kind.INVALID, "echo with logprobs is not supported: prompt logprobs are not computed",
                       param="echo")
    runner = state.runner
    prompts = [await runner.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompt]
    for ids in prompts:
        runner.check_ids(ids)
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = sampling_params(state, req, max_tokens, req.logprobs, guided=await runner.guided(req.constraints()))
    echo = [p if isinstance(p, str) else await runner.decode(p) for p in prompt] if req.echo else None
    usage = bool(req.stream_options and req.stream_options.include_usage)
    return CompletionJob(f"cmpl-{uuid.uuid4().hex}", prompts, params, req.n, req.logprobs, usage, echo)


@router.post("/v1/completions", openapi_extra=body_doc(CompletionRequest),
             responses={200: {"model": Completion}})
async def completions(request: Request) -> Response:
    return await serve(request, CompletionRequest, completion_job)


# --- models ------------------------------------------------------------------------------------------------
def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=state.created, root=state.model_name,
                     max_model_len=state.runner.max_model_len)


@router.get("/v1/models", responses={200: {"model": ModelList}})
async def models(request: Request) -> Response:
    return json_reply(ModelList(data=[_model_card(server_state(request))]))


@router.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}})
async def model(request: Request, model_id: str) -> Response:
    state = server_state(request)
    state.check_model(model_id)
    return json_reply(_model_card(state))
