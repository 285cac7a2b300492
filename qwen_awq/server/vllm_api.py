"""vLLM's routes: the legacy api_server's /generate, /tokenize (a prompt or a chat) and /detokenize. The app
sends /generate and /tokenize here unless the body is TGI's ("inputs").

Legacy /generate uses vLLM's SamplingParams defaults (max_tokens 16, temperature 1), echoes the prompt, and
streams cumulative {"text": [...]} objects separated by NUL bytes; vLLM's guided_json/regex/choice/grammar are
enforced.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from qwen_awq.server.errors import APIError, Flavor, Kind, as_api_error, set_flavor
from qwen_awq.server.protocol import (
    DetokenizeRequest,
    GuidedFields,
    TokenizeRequest,
    VLLMGenerateRequest,
    body_doc,
    parse,
    validate,
)
from qwen_awq.server.responses import Detokenized, TextFrame, Tokenized, VLLMOutput
from qwen_awq.server.runner import Defaults, Run, ServerState, collect, event_stream, server_state
from qwen_awq.server.tools import chat_prompt_ids

router = APIRouter()
NUL = b"\0"  # vLLM's legacy stream delimiter


def _sampling_fields(req: VLLMGenerateRequest) -> dict[str, Any]:
    """The SamplingParams fields the body gave, extras included (refused by name when unknown)."""
    guided = set(GuidedFields.model_fields)  # read by the runner as one constraint
    given = req.model_dump(exclude_unset=True, exclude={"prompt", "stream", "use_beam_search", "best_of", *guided})
    # vLLM's own api_client example sends use_beam_search; old SamplingParams also had best_of.
    if req.use_beam_search:
        raise APIError(Kind.INVALID, "beam search is not supported; sample with n instead", param="use_beam_search")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(Kind.INVALID, "best_of other than n is not supported", param="best_of")
    return given


async def generate(request: Request, state: ServerState, data: dict[str, Any]) -> Response:
    """vLLM's legacy POST /generate."""
    if "prompt" not in data:  # still TGI's error body: the path is TGI's as much as vLLM's
        raise APIError(Kind.INVALID, "the body needs `inputs` (TGI's /generate) or `prompt` (vLLM's /generate)")
    set_flavor(request, Flavor.OPENAI)
    req = validate(VLLMGenerateRequest, data, prefix="invalid sampling parameters: ", with_param=False)
    fields = _sampling_fields(req) | {"guided": await state.runner.guided(req.constraints())}
    params = state.runner.params(fields, Defaults.VLLM)
    if params.stop_token_ids:
        state.runner.check_ids(params.stop_token_ids, "stop_token_ids")
    ids = await state.runner.encode_prompt(req.prompt)
    run = await state.start(f"gen-{uuid.uuid4().hex}", [ids], params)
    if req.stream:
        return event_stream(legacy_chunks(req.prompt, run), run, media_type="application/json")
    finals = await collect(request, run)
    body = VLLMOutput(text=[req.prompt + o.text for o in finals[0].outputs])
    return Response(body.model_dump_json(), media_type="application/json")


async def legacy_chunks(prompt: str, run: Run) -> AsyncGenerator[bytes, None]:
    """Each step's cumulative texts, written without a VLLMOutput per chunk (TextFrame)."""
    frame = TextFrame(prompt)
    try:
        async with aclosing(run.outputs()) as outs:
            async for _, out in outs:
                yield frame.chunk([o.text for o in out.outputs]).encode() + NUL
    except Exception as e:
        yield json.dumps(as_api_error(e).body(Flavor.OPENAI), ensure_ascii=False).encode() + NUL


async def tokenize(state: ServerState, data: Any) -> Response:
    """vLLM's POST /tokenize: a raw prompt (special-token text parsed as for generation) or a chat."""
    req = validate(TokenizeRequest, data)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(Kind.INVALID, "send exactly one of `prompt` (text) or `messages` (a chat)", param="prompt")
    runner = state.runner
    if req.prompt is not None:
        ids = await runner.encode_prompt(req.prompt, refuse_long=False)
    else:
        ids, _ = await runner.offload(chat_prompt_ids, runner.tokenizer, req.messages or [], [], runner.chat_window)
    def reply() -> str:  # a megabyte of text is a million ids: validate and write them off the event loop
        return Tokenized(count=len(ids), max_model_len=runner.max_model_len, tokens=ids).model_dump_json()

    return Response(await runner.offload(reply), media_type="application/json")


@router.post("/detokenize", openapi_extra=body_doc(DetokenizeRequest), responses={200: {"model": Detokenized}})
async def detokenize(request: Request) -> Response:
    state = server_state(request)
    req = await parse(request, DetokenizeRequest, state.max_body_bytes)
    state.check_model(req.model)
    state.runner.check_ids(req.tokens, "tokens")
    body = Detokenized(prompt=await state.runner.decode(req.tokens))
    return Response(body.model_dump_json(), media_type="application/json")
