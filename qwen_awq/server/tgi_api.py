"""Hugging Face TGI routes: POST / (what `InferenceClient(url).text_generation` calls), /generate_stream, /info,
and the handlers behind the shared /generate and /tokenize (the app sends TGI's bodies here).

Sampling follows TGI: greedy unless do_sample or a warper (temperature, top_k, top_p, typical_p) is set;
unlike TGI, temperature 0 (greedy) and top_p 1.0 (off) are accepted. `grammar` (json / regex / json_schema) is
enforced; an invalid one is a 422 "grammar is not valid: ...". typical_p and watermark are accepted, not applied;
adapter_id and decoder_input_details are refused with 422.
"""
from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from qwen_awq import __version__
from qwen_awq.server.errors import APIError, Flavor, Kind, as_api_error, set_flavor
from qwen_awq.server.protocol import TGIParameters, TGIRequest, TGITokenizeRequest, body_doc, json_object, read_json
from qwen_awq.server.protocol import validate as validate_body
from qwen_awq.server.responses import (
    BestOfSequence,
    Details,
    Generated,
    Info,
    StreamDetails,
    TokenSpan,
    stream_event,
    tgi_token,
    top_entries,
)
from qwen_awq.server.runner import (
    CompletionOutput,
    Defaults,
    Run,
    SamplingParams,
    ServerState,
    collect,
    event_stream,
    server_state,
)
from qwen_awq.tokenizer import IncrementalDetokenizer

router = APIRouter()
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's classic default when max_new_tokens is absent
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
MAX_BEST_OF = 2  # TGI's default --max-best-of


@dataclass
class TGIJob:
    request_id: str
    ids: list[int]
    params: SamplingParams
    request: TGIRequest


def _refuse_unsupported(p: TGIParameters, stream: bool) -> None:
    unsupported = {"adapter_id": p.adapter_id is not None, "decoder_input_details": p.decoder_input_details}
    for name, given in unsupported.items():
        if given:
            raise APIError(Kind.INVALID, f"`{name}` is not supported by this server; remove it", param=name)
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise APIError(Kind.INVALID, f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. "
                       f"Given: {len(p.stop)}", param="stop")
    if (p.best_of or 1) > 1 and stream:
        raise APIError(Kind.INVALID, "`best_of` != 1 is not supported when streaming tokens", param="best_of")
    if (p.best_of or 1) > MAX_BEST_OF:
        raise APIError(Kind.INVALID, f"`best_of` must be in [1, {MAX_BEST_OF}]. Given: {p.best_of}")
    if p.max_new_tokens is not None and p.max_new_tokens < 1:
        raise APIError(Kind.INVALID, f"`max_new_tokens` must be strictly positive. Given: {p.max_new_tokens}")


def _sampling(p: TGIParameters) -> bool:
    """TGI samples when asked to, or when any warper differs from its neutral value."""
    warpers = (p.temperature not in (None, 1.0) or p.top_k not in (None, 0) or p.top_p not in (None, 1.0)
               or p.typical_p not in (None, 1.0))
    return p.do_sample or warpers


def _fields(p: TGIParameters, input_len: int, max_model_len: int) -> dict[str, Any]:
    """TGI's parameters under vLLM's names, every one given (TGI's defaults are not vLLM's)."""
    sampling = _sampling(p)
    if (p.best_of or 1) > 1 and not sampling:
        raise APIError(Kind.INVALID, "`best_of` > 1 needs sampling: set `do_sample` or a temperature/top_k/top_p")
    # TGI reports the seed it sampled with; draw one so that the reply can be reproduced.
    seed = p.seed if p.seed is not None else (random.getrandbits(63) if sampling else None)
    new = p.max_new_tokens if p.max_new_tokens is not None else max(1, min(DEFAULT_MAX_NEW_TOKENS,
                                                                           max_model_len - input_len))
    return {"n": p.best_of or 1, "temperature": (1.0 if p.temperature is None else p.temperature) if sampling else 0.0,
            "top_p": 1.0 if p.top_p is None else p.top_p, "top_k": p.top_k or 0, "seed": seed, "stop": list(p.stop),
            "logprobs": p.top_n_tokens or 0, "max_tokens": new, "frequency_penalty": p.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if p.repetition_penalty is None else p.repetition_penalty}


async def tgi_job(state: ServerState, req: TGIRequest, stream: bool) -> TGIJob:
    p = req.parameters
    _refuse_unsupported(p, stream)
    runner = state.runner
    ids = await runner.encode_prompt(req.inputs, "inputs", refuse_long=p.truncate is None)
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    if not ids:
        raise APIError(Kind.INVALID, "`inputs` cannot be empty", param="inputs")
    guided = await runner.guided([p.grammar.constraint()] if p.grammar else [], prefix="grammar is not valid: ")
    params = runner.params(_fields(p, len(ids), runner.max_model_len) | {"guided": guided}, Defaults.VLLM)
    return TGIJob(f"tgi-{uuid.uuid4().hex}", ids, params, req)


def _finish_reason(o: CompletionOutput) -> str:
    if o.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(o.stop_reason, str) else "eos_token"


def _token(state: ServerState, token_id: int, text: str, logprob: float) -> dict[str, Any]:
    return tgi_token(token_id, text, logprob, token_id in state.tokenizer.special_ids)


def _tokens(state: ServerState, o: CompletionOutput) -> list[dict[str, Any]]:
    detok = IncrementalDetokenizer(state.tokenizer, skip_special_tokens=True)
    entries = o.logprobs or [{}] * len(o.token_ids)
    return [_token(state, t, detok.add([t]), e.get(t, 0.0)) for t, e in zip(o.token_ids, entries, strict=True)]


def _top_tokens(state: ServerState, entries: list[dict[int, float]], k: int) -> list[list[dict[str, Any]]]:
    dec = state.tokenizer.decode
    return [[_token(state, i, dec([i]), v) for i, v in top_entries(e, k)] for e in entries]


def _sequence(state: ServerState, job: TGIJob, o: CompletionOutput) -> dict[str, Any]:
    seed = None if job.params.seed is None else job.params.seed + o.index  # the engine seeds choice i with seed + i
    out: dict[str, Any] = {"finish_reason": _finish_reason(o), "generated_tokens": len(o.token_ids), "seed": seed,
                           "prefill": [], "tokens": _tokens(state, o)}
    top_n = job.request.parameters.top_n_tokens
    if top_n:
        out["top_tokens"] = _top_tokens(state, o.logprobs or [], top_n)
    return out


def _text(job: TGIJob, o: CompletionOutput) -> str:
    return (job.request.inputs if job.request.parameters.return_full_text else "") + o.text


def generated(state: ServerState, job: TGIJob, outputs: list[CompletionOutput]) -> Generated:
    """TGI's reply: the best of the n samples (highest cumulative logprob), others as best_of_sequences."""
    best, *others = sorted(outputs, key=lambda o: -o.cumulative_logprob)
    if not job.request.parameters.details:
        return Generated(generated_text=_text(job, best))
    rest = [BestOfSequence(generated_text=_text(job, o), **_sequence(state, job, o)) for o in others]
    details = Details(**_sequence(state, job, best), **({"best_of_sequences": rest} if rest else {}))
    return Generated(generated_text=_text(job, best), details=details)


async def tgi_generate(request: Request, state: ServerState, data: Any, stream: bool, as_list: bool) -> Response:
    set_flavor(request, Flavor.TGI)
    job = await tgi_job(state, validate_body(TGIRequest, data), stream)
    run = await state.start(job.request_id, [job.ids], job.params, Flavor.TGI)
    if stream:
        return event_stream(tgi_events(state, job, run), run)
    finals = await collect(request, run)
    body = await state.runner.offload(generated, state, job, finals[0].outputs)
    text = body.model_dump_json()
    return Response(f"[{text}]" if as_list else text, media_type="application/json")


async def tgi_events(state: ServerState, job: TGIJob, run: Run) -> AsyncGenerator[str, None]:
    """One event per token, written without pydantic models (stream_event); the last carries generated_text
    (and details when asked). No [DONE]."""
    index, top_n = 0, job.request.parameters.top_n_tokens
    try:
        async with aclosing(run.outputs()) as outs:
            async for _, out in outs:
                o = out.outputs[0]
                step = len(o.delta_token_ids)
                for k, t in enumerate(o.delta_token_ids):
                    index += 1
                    last = k == step - 1
                    entry = o.logprobs[len(o.token_ids) - step + k] if o.logprobs else {}
                    token = _token(state, t, o.delta_text if last else "", entry.get(t, 0.0))
                    top = _top_tokens(state, [entry], top_n)[0] if top_n else None
                    if last and out.finished:
                        yield stream_event(index, token, top, _text(job, o), _stream_details(job, o))
                    else:
                        yield stream_event(index, token, top)
    except Exception as e:
        yield f"data: {json.dumps(as_api_error(e).body(Flavor.TGI), ensure_ascii=False)}\n\n"


def _stream_details(job: TGIJob, o: CompletionOutput) -> StreamDetails | None:
    if not job.request.parameters.details:
        return None
    return StreamDetails(finish_reason=_finish_reason(o), seed=job.params.seed, generated_tokens=len(o.token_ids),
                         input_length=len(job.ids))


@router.post("/", openapi_extra=body_doc(TGIRequest), responses={200: {"model": list[Generated]}})
async def root(request: Request) -> Response:
    state = server_state(request)
    set_flavor(request, Flavor.TGI)
    data = json_object(await read_json(request, state.max_body_bytes))
    return await tgi_generate(request, state, data, stream=data.get("stream") is True, as_list=True)


@router.post("/generate_stream", openapi_extra=body_doc(TGIRequest))
async def generate_stream(request: Request) -> Response:
    state = server_state(request)
    set_flavor(request, Flavor.TGI)
    data = await read_json(request, state.max_body_bytes)
    return await tgi_generate(request, state, data, stream=True, as_list=False)


@router.get("/info", responses={200: {"model": Info}})
async def info(request: Request) -> Response:
    state = server_state(request)
    total, limits = state.runner.max_model_len, state.runner.limits()
    body = Info(model_id=state.model_name, model_dtype=limits["model_dtype"],
                model_device_type=limits["model_device_type"],
                max_concurrent_requests=limits["max_batch_size"] + limits["max_waiting"], max_best_of=MAX_BEST_OF,
                max_stop_sequences=MAX_STOP_SEQUENCES, max_input_tokens=total - 1, max_input_length=total - 1,
                max_total_tokens=total, max_batch_size=limits["max_batch_size"],
                max_batch_total_tokens=limits["max_batch_total_tokens"], version=__version__)
    return Response(body.model_dump_json(), media_type="application/json")


def _spans_json(state: ServerState, ids: list[int]) -> str:
    """TGI's tokens as a JSON list, built in the tokenizer threads (a megabyte of text is a million tokens)."""
    detok = IncrementalDetokenizer(state.tokenizer, skip_special_tokens=False)
    out, pos = [], 0
    for t in ids:
        piece = detok.add([t])
        out.append(TokenSpan(id=t, text=piece, start=pos, stop=pos + len(piece)).model_dump_json())
        pos += len(piece)
    return "[" + ",".join(out) + "]"


async def tgi_tokenize(state: ServerState, req: TGITokenizeRequest) -> Response:
    """TGI's /tokenize: each token with its text and character span in the input."""
    ids = await state.runner.encode_prompt(req.inputs, "inputs", refuse_long=False)
    return Response(await state.runner.offload(_spans_json, state, ids), media_type="application/json")
