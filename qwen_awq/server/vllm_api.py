"""vLLM's legacy api_server route POST /generate (the body tells it from TGI's: "inputs" is TGI, "prompt" is
vLLM), and the shared POST /tokenize (vLLM's body or TGI's) and vLLM's POST /detokenize.

Legacy /generate uses vLLM's SamplingParams defaults (max_tokens 16, temperature 1), echoes the prompt, and
streams cumulative {"text": [...]} objects separated by NUL bytes.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from qwen_awq.chat import window_size
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.server.app import Run, ServerState, collect, event_stream, server_state
from qwen_awq.server.errors import APIError, Flavor, Kind, as_api_error, set_flavor
from qwen_awq.server.protocol import (
    DetokenizeRequest,
    TGIRequest,
    TGITokenizeRequest,
    TokenizeRequest,
    VLLMGenerateRequest,
    body_doc,
    parse,
    read_json,
    validate,
)
from qwen_awq.server.tgi_api import tgi_generate, tgi_tokenize
from qwen_awq.server.tools import chat_prompt_ids

router = APIRouter()
NUL = b"\0"  # vLLM's legacy stream delimiter


def legacy_params(state: ServerState, extra: dict[str, Any]) -> SamplingParams:
    # vLLM's own api_client example sends use_beam_search; old SamplingParams also had best_of.
    if extra.pop("use_beam_search", False):
        raise APIError(Kind.INVALID, "beam search is not supported; sample with n instead",
                       param="use_beam_search")
    best_of = extra.pop("best_of", None)
    if best_of is not None and best_of != extra.get("n", 1):
        raise APIError(Kind.INVALID, "best_of other than n is not supported", param="best_of")
    try:
        params = SamplingParams.from_defaults(None, **extra)
    except (TypeError, ValueError) as e:  # SamplingError is a ValueError; TypeError: a wrong kind of value
        raise APIError(Kind.INVALID, f"invalid sampling parameters: {e}") from None
    if params.stop_token_ids:
        state.check_ids(params.stop_token_ids, "stop_token_ids")
    return params


@router.post("/generate", openapi_extra=body_doc(TGIRequest, VLLMGenerateRequest))
async def generate(request: Request) -> Response:
    state = server_state(request)
    data = await read_json(request, state.max_body_bytes)
    if isinstance(data, dict) and "inputs" in data:
        return await tgi_generate(request, state, data, stream=False, as_list=False)
    if isinstance(data, dict) and "prompt" not in data:
        raise APIError(Kind.INVALID, "the body needs `inputs` (TGI's /generate) or `prompt` "
                       "(vLLM's /generate)")
    set_flavor(request, Flavor.OPENAI)
    req = validate(VLLMGenerateRequest, data)
    params = legacy_params(state, dict(req.model_extra or {}))
    ids = state.tokenizer.encode(req.prompt, allowed_special="all")
    run = Run(state, f"gen-{uuid.uuid4().hex}", [ids], params)
    await run.start()
    if req.stream:
        return event_stream(legacy_chunks(req.prompt, run), run, media_type="application/json")
    finals = await collect(request, run)
    return JSONResponse({"text": [req.prompt + o.text for o in finals[0].outputs]})


async def legacy_chunks(prompt: str, run: Run) -> AsyncGenerator[bytes, None]:
    try:
        async with aclosing(run.outputs()) as outs:
            async for _, out in outs:
                texts = [prompt + o.text for o in out.outputs]
                yield json.dumps({"text": texts}, ensure_ascii=False).encode() + NUL
    except Exception as e:
        yield json.dumps(as_api_error(e).body(Flavor.OPENAI), ensure_ascii=False).encode() + NUL


@router.post("/tokenize", openapi_extra=body_doc(TokenizeRequest, TGITokenizeRequest))
async def tokenize(request: Request) -> Any:
    state = server_state(request)
    data = await read_json(request, state.max_body_bytes)
    if isinstance(data, dict) and "inputs" in data:
        set_flavor(request, Flavor.TGI)
        return tgi_tokenize(state, validate(TGITokenizeRequest, data))
    req = validate(TokenizeRequest, data)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(Kind.INVALID, "send exactly one of `prompt` (text) or `messages` (a chat)",
                       param="prompt")
    if req.prompt is not None:
        ids = state.tokenizer.encode(req.prompt, allowed_special="all")
    else:
        ids = chat_prompt_ids(state.tokenizer, req.messages or [], [], window_size(state.model))
    return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}


@router.post("/detokenize", openapi_extra=body_doc(DetokenizeRequest))
async def detokenize(request: Request) -> dict[str, str]:
    state = server_state(request)
    req = await parse(request, DetokenizeRequest, state.max_body_bytes)
    state.check_model(req.model)
    state.check_ids(req.tokens, "tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}
