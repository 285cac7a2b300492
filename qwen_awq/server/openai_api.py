"""OpenAI-compatible routes (vLLM's server is the reference): /v1/chat/completions, /v1/completions and
/v1/models.

Absent sampling fields take the model's generation_config.json values. max_tokens defaults: chat, the model's
max_new_tokens (else 512) cut to the room left in the context; completions, 16 (vLLM's default). response_format
json_object/json_schema is accepted but not enforced (no constrained decoding).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from qwen_awq.chat import window_size
from qwen_awq.engine.llm_engine import CompletionOutput, RequestOutput
from qwen_awq.engine.sampling_params import REPLY_MAX_TOKENS, SamplingParams
from qwen_awq.server.app import Run, ServerState, collect, event_stream, server_state
from qwen_awq.server.errors import APIError, Flavor, Kind, as_api_error
from qwen_awq.server.protocol import (
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    body_doc,
    chat_logprobs,
    completion_logprobs,
    parse,
    sse,
    usage,
)
from qwen_awq.server.tools import STOP_WORDS, Tool, chat_prompt_ids, offered_tools, parse_reply

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's legacy) default for /v1/completions
PASSED = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "seed", "min_tokens", "stop_token_ids", "ignore_eos", "skip_special_tokens",
          "include_stop_str_in_output")
DONE = "data: [DONE]\n\n"


def sampling_params(state: ServerState, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    extra_stop: tuple[str, ...] = (), room: int | None = None) -> SamplingParams:
    if req.stream_options is not None and not req.stream:
        raise APIError(Kind.INVALID, "stream_options is only allowed with stream=true",
                       param="stream_options")
    if req.stop_token_ids:
        state.check_ids(req.stop_token_ids, "stop_token_ids")
    if req.n > state.engine.engine.scheduler.max_waiting:
        raise APIError(Kind.INVALID, f"n={req.n} exceeds this server's queue of "
                       f"{state.engine.engine.scheduler.max_waiting} sequences (--max-queue)", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams.from_defaults(state.model.generation_config, room=room, default_max_tokens=REPLY_MAX_TOKENS,
                                        **{name: getattr(req, name) for name in PASSED},
                                        max_tokens=max_tokens, logprobs=logprobs, stop=stop + list(extra_stop))


@dataclass
class Job:
    """What a route asked of the engine, and how to render the answer."""

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs in the reply
    tools: list[Tool]
    legacy_functions: bool = False
    echo: list[str] | None = None  # completions with echo: each prompt's text

    def head(self, state: ServerState, kind: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": kind, "created": int(time.time()), "model": state.model_name}

    def usage(self, finals: list[RequestOutput]) -> dict[str, int]:
        return usage(sum(len(p) for p in self.prompts),
                     sum(len(o.token_ids) for out in finals for o in out.outputs))


def chat_job(state: ServerState, req: ChatRequest) -> Job:
    tools, legacy = offered_tools(req)
    ids = chat_prompt_ids(state.tokenizer, req.messages, tools, window_size(state.model))
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(Kind.INVALID, "top_logprobs requires logprobs=true", param="top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(state, req, asked, top, STOP_WORDS if tools else (),
                             room=state.engine.max_model_len - len(ids))
    return Job(f"chatcmpl-{uuid.uuid4().hex}", [ids], params, top, tools, legacy)


def chat_choice(state: ServerState, job: Job, o: CompletionOutput) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": o.text}
    finish = o.finish_reason
    if job.tools:
        reply = parse_reply(o.text)
        message["content"] = reply.content
        if reply.calls:
            call = reply.calls[0]
            if job.legacy_functions:
                message["function_call"] = {"name": call.name, "arguments": call.arguments}
                finish = "function_call"
            else:
                message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}}
                                         for c in reply.calls]
                finish = "tool_calls"
    logprobs = None
    if job.top_logprobs is not None and o.logprobs is not None:
        logprobs = chat_logprobs(state.tokenizer, o.token_ids, o.logprobs, job.top_logprobs)
    return {"index": o.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


@router.post("/v1/chat/completions", openapi_extra=body_doc(ChatRequest))
async def chat_completions(request: Request) -> Response:
    state = server_state(request)
    req = await parse(request, ChatRequest, state.max_body_bytes)
    state.check_model(req.model)
    job = chat_job(state, req)
    run = Run(state, job.request_id, job.prompts, job.params)
    await run.start()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        return event_stream(chat_events(state, job, run, include_usage), run)
    finals = await collect(request, run)
    return JSONResponse(job.head(state, "chat.completion") | {
        "choices": [chat_choice(state, job, o) for o in finals[0].outputs], "usage": job.usage(finals)})


def _delta_logprobs(state: ServerState, job: Job, o: CompletionOutput, chat: bool, offset: int = 0):
    if job.top_logprobs is None or o.logprobs is None or not o.delta_token_ids:
        return None
    n = len(o.delta_token_ids)
    ids, entries = o.token_ids[-n:], o.logprobs[-n:]
    if chat:
        return chat_logprobs(state.tokenizer, ids, entries, job.top_logprobs)
    return completion_logprobs(state.tokenizer, ids, entries, job.top_logprobs, offset)


async def chat_events(state: ServerState, job: Job, run: Run, include_usage: bool
                      ) -> AsyncGenerator[str, None]:
    head = job.head(state, "chat.completion.chunk") | ({"usage": None} if include_usage else {})

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return sse(head | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}]})

    try:
        for i in range(job.params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        final, reported = None, set()
        async with aclosing(run.outputs()) as outs:
            async for _, out in outs:
                final = out
                for o in out.outputs if not job.tools else ():  # a tool call is only known at the end
                    lp = _delta_logprobs(state, job, o, chat=True)
                    if o.delta_text or lp or (o.finish_reason and o.index not in reported):
                        if o.finish_reason:
                            reported.add(o.index)
                        delta = {"content": o.delta_text} if o.delta_text else {}
                        yield chunk(o.index, delta, o.finish_reason, lp)
        for o in final.outputs if final is not None and job.tools else ():
            choice = chat_choice(state, job, o)
            delta = {k: v for k, v in choice["message"].items() if k != "role" and v is not None}
            for i, call in enumerate(delta.get("tool_calls", [])):
                call["index"] = i
            yield chunk(o.index, delta, choice["finish_reason"], choice["logprobs"])
        if include_usage and final is not None:
            yield sse(head | {"choices": [], "usage": job.usage([final])})
    except Exception as e:
        yield sse(as_api_error(e).body(Flavor.OPENAI))
    yield DONE


# --- completions -------------------------------------------------------------------------------------------
def completion_job(state: ServerState, req: CompletionRequest) -> Job:
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt, as text or as token ids
    if not prompt:
        raise APIError(Kind.INVALID, "prompt must not be empty", param="prompt")
    tok = state.tokenizer
    prompts = [tok.encode(p, allowed_special="all") if isinstance(p, str) else list(p) for p in prompt]
    for ids in prompts:
        state.check_ids(ids)
    if req.suffix:
        raise APIError(Kind.INVALID, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.echo and req.logprobs is not None:
        raise APIError(Kind.INVALID, "echo with logprobs is not supported: prompt logprobs are not computed",
                       param="echo")
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = sampling_params(state, req, max_tokens, req.logprobs)
    echo = [p if isinstance(p, str) else tok.decode(p) for p in prompt] if req.echo else None
    return Job(f"cmpl-{uuid.uuid4().hex}", prompts, params, req.logprobs, [], echo=echo)


def completion_choice(state: ServerState, job: Job, i: int, o: CompletionOutput) -> dict[str, Any]:
    text = (job.echo[i] if job.echo else "") + o.text
    logprobs = None
    if job.top_logprobs is not None and o.logprobs is not None:
        logprobs = completion_logprobs(state.tokenizer, o.token_ids, o.logprobs, job.top_logprobs)
    return {"index": i * job.params.n + o.index, "text": text, "logprobs": logprobs,
            "finish_reason": o.finish_reason}


@router.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
async def completions(request: Request) -> Response:
    state = server_state(request)
    req = await parse(request, CompletionRequest, state.max_body_bytes)
    state.check_model(req.model)
    job = completion_job(state, req)
    run = Run(state, job.request_id, job.prompts, job.params)
    await run.start()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        return event_stream(completion_events(state, job, run, include_usage), run)
    finals = await collect(request, run)
    choices = [completion_choice(state, job, i, o) for i, out in enumerate(finals) for o in out.outputs]
    return JSONResponse(job.head(state, "text_completion") | {"choices": choices, "usage": job.usage(finals)})


async def completion_events(state: ServerState, job: Job, run: Run, include_usage: bool
                            ) -> AsyncGenerator[str, None]:
    head = job.head(state, "text_completion") | ({"usage": None} if include_usage else {})
    finals: dict[int, RequestOutput] = {}
    started, reported = set(), set()
    try:
        async with aclosing(run.outputs()) as outs:
            async for i, out in outs:
                finals[i] = out
                for o in out.outputs:
                    index = i * job.params.n + o.index
                    prefix = job.echo[i] if job.echo and index not in started else ""
                    started.add(index)
                    text = prefix + o.delta_text
                    lp = _delta_logprobs(state, job, o, chat=False, offset=len(o.text) - len(o.delta_text))
                    if text or lp or (o.finish_reason and index not in reported):
                        if o.finish_reason:
                            reported.add(index)
                        choice = {"index": index, "text": text, "logprobs": lp,
                                  "finish_reason": o.finish_reason}
                        yield sse(head | {"choices": [choice]})
        if include_usage:
            yield sse(head | {"choices": [], "usage": job.usage(list(finals.values()))})
    except Exception as e:
        yield sse(as_api_error(e).body(Flavor.OPENAI))
    yield DONE


# --- models ------------------------------------------------------------------------------------------------
def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qwen-awq",
            "root": state.model_name, "parent": None, "max_model_len": state.engine.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(server_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    state = server_state(request)
    state.check_model(model_id)
    return _model_card(state)
