"""The per-token streaming path (issue 12): the engine thread's one hand-off per step delivers every request's
outputs in order and nothing after a client leaves (no request state left behind), snapshots are independent
copies, and the OpenAI chunks rendered without pydantic are byte-equal to the pydantic models' dumps."""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import fields
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.llm_engine import CompletionOutput, RequestOutput
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.sequence import FinishReason
from qwen_awq.parallel.data_parallel import DataParallelEngine
from qwen_awq.server.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatLogprobs,
    ChunkFrame,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    content_delta,
)
from qwen_awq.server.runner import Run


class CountingEngine:
    """LLMEngine's surface for AsyncEngine: request r's k-th step emits token k-1; it ends after max_tokens."""

    tokenizer = None
    max_model_len = 1 << 20
    config = SimpleNamespace(block_size=16)  # what DataParallelEngine's router reads

    def __init__(self, step_s: float = 0.0) -> None:
        self.requests: dict[str, list[int]] = {}  # id -> [tokens so far, max_tokens]
        self.step_s, self.steps_with_output = step_s, 0

    def check_request(self, num_prompt_tokens: int, params: SamplingParams, pending: int = 0) -> None:
        pass

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt=None,
                    cache_salt=None) -> None:
        self.requests[request_id] = [0, params.max_tokens]

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        outs = []
        for request_id, state in list(self.requests.items()):
            state[0] += 1
            k, done = state[0], state[0] == state[1]
            outs.append(RequestOutput(request_id, None, [], [CompletionOutput(
                0, token_ids=list(range(k)), delta_token_ids=[k - 1],
                finish_reason=FinishReason.LENGTH if done else None)], finished=done))
            if done:
                del self.requests[request_id]
        self.steps_with_output += bool(outs)
        return outs


def test_one_handoff_per_step_delivers_every_delta_in_order():
    core = CountingEngine()
    engine = AsyncEngine(core)
    lengths = [1, 5, 17, 40, 3, 40, 9, 28]
    handoffs = 0

    async def one(i: int, n: int) -> list[int]:
        got = []
        async for out in engine.generate(f"r{i}", [1, 2], SamplingParams(max_tokens=n)):
            assert out.outputs[0].token_ids == got + out.outputs[0].delta_token_ids  # a snapshot of that step
            got += out.outputs[0].delta_token_ids
        assert out.finished
        return got

    async def main() -> list[list[int]]:
        nonlocal handoffs
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal handoffs
            handoffs += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting
        engine.start()
        try:
            return await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))
        finally:
            engine.shutdown()

    got = asyncio.run(main())
    assert got == [list(range(n)) for n in lengths]
    assert handoffs <= core.steps_with_output  # at most one per step for all eight streams, not one per token
    assert not engine._streams and not core.requests


def test_steps_a_busy_loop_has_not_drained_ride_along_in_order():
    core = CountingEngine(step_s=0.001)
    engine = AsyncEngine(core)

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        real, handoffs = loop.call_soon_threadsafe, []
        loop.call_soon_threadsafe = lambda *args: handoffs.append(1) or real(*args)
        engine.start()
        try:
            stream = engine.generate("r", [1], SamplingParams(max_tokens=400))
            first = await anext(stream)
            time.sleep(0.1)  # the loop is busy while the engine steps on
            rest = [t async for out in stream for t in out.outputs[0].delta_token_ids]
            return first.outputs[0].delta_token_ids + rest, len(handoffs)
        finally:
            engine.shutdown()

    tokens, handoffs = asyncio.run(main())
    assert tokens == list(range(400))
    assert handoffs < core.steps_with_output - 10  # the steps made during the sleep crossed in one hand-off


def test_client_leaving_aborts_and_leaves_no_state():
    core = CountingEngine(step_s=0.002)
    engine = AsyncEngine(core)

    async def main() -> tuple[list[int], list[int]]:
        engine.start()
        try:
            stream = engine.generate("gone", [1], SamplingParams(max_tokens=1 << 30))
            kept = engine.generate("kept", [1], SamplingParams(max_tokens=60))
            seen = []
            async with aclosing(stream) as outs:
                async for out in outs:
                    seen += out.outputs[0].delta_token_ids
                    if len(seen) >= 3:
                        break
            assert "gone" not in engine._streams  # dropped at once, before the engine applies the abort
            rest = [t async for out in kept for t in out.outputs[0].delta_token_ids]
            return seen, rest
        finally:
            engine.shutdown()

    seen, rest = asyncio.run(main())
    assert seen == [0, 1, 2]
    assert rest == list(range(60))  # the other stream is untouched by the abort
    assert not core.requests and not engine._streams and engine._pending == 0


class Records(list):
    """Metrics' one method that Run calls."""

    def observe(self, record) -> None:
        self.append(record)


@pytest.mark.parametrize("replicas", [1, 2])
def test_run_of_one_prompt_reads_its_stream_directly_and_cleans_up(replicas):
    cores = [CountingEngine(step_s=0.001) for _ in range(replicas)]
    engine = AsyncEngine(cores[0]) if replicas == 1 else DataParallelEngine([AsyncEngine(c) for c in cores])
    records = Records()

    async def main() -> list[int]:
        engine.start()
        try:
            run = Run(engine, records, "read", [[1, 2, 3]], SamplingParams(max_tokens=7))
            await run.start()
            got = [t async for _, out in run.outputs() for t in out.outputs[0].delta_token_ids]
            gone = Run(engine, records, "gone", [[1]], SamplingParams(max_tokens=1 << 30))
            await gone.start()
            await asyncio.sleep(0.02)  # it generates, unread
            gone.close()  # the client left before the first byte
            gone.close()
            for _ in range(400):
                if not any(c.requests for c in cores):
                    break
                await asyncio.sleep(0.005)
            return got
        finally:
            engine.shutdown()

    assert asyncio.run(main()) == list(range(7))
    assert not any(c.requests for c in cores)  # the unread request was aborted
    served = [engine] if replicas == 1 else engine.replicas
    assert not any(e._streams for e in served)
    if replicas > 1:
        assert engine.router.load == [0, 0] and not engine._routed
    assert [(r.prompt_tokens, r.output_tokens, r.finish_reasons) for r in records] == [
        (3, [7], [FinishReason.LENGTH]), (1, [], [])]  # each recorded once


def test_snapshot_copies_every_field_and_shares_no_list():
    out = CompletionOutput(2, "ab", [5, 6], FinishReason.STOP, 6, [{5: -0.1}, {6: -0.2}], -0.3, "b", [6])
    req = RequestOutput("r", "p", [1, 2], [out], True, 3, 10.0, 11.0)
    snap = req.snapshot()
    assert snap == req
    assert [f.name for f in fields(CompletionOutput)] == ["index", "text", "token_ids", "finish_reason",
                                                          "stop_reason", "logprobs", "cumulative_logprob",
                                                          "delta_text", "delta_token_ids"]  # all copied above
    out.token_ids.append(7)
    out.delta_token_ids.append(7)
    out.logprobs.append({7: -0.4})
    assert snap.outputs[0].token_ids == [5, 6] and snap.outputs[0].delta_token_ids == [6]
    assert snap.outputs[0].logprobs == [{5: -0.1}, {6: -0.2}]


TEXTS = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\n", '"', "\\", "\x00\x1f\x7f", "\u2028\u2029", "你好", "😀", "</script>", "\ufffd"])
FINISH = st.sampled_from([None, "stop", "length", FinishReason.STOP, FinishReason.LENGTH])
HEADS = st.fixed_dictionaries({"id": st.just("cmpl-1"), "created": st.integers(0, 2**40), "model": TEXTS},
                              optional={"usage": st.none()})


def _chat_logprobs(text: str) -> ChatLogprobs:
    top = TopLogprob(token=text, logprob=-1.5, bytes=list(text.encode()))
    return ChatLogprobs(content=[TokenLogprob(**top.model_dump(), top_logprobs=[top])])


@settings(max_examples=300, deadline=None)
@given(head=HEADS, index=st.integers(0, 99), text=TEXTS, finish=FINISH, with_lp=st.booleans())
def test_completion_chunk_equals_the_models_dump(head, index, text, finish, with_lp):
    head = head | {"object": "text_completion"}
    lp = CompletionLogprobs(tokens=[text], token_logprobs=[-0.25], top_logprobs=[{text: -0.25}],
                            text_offset=[0]) if with_lp else None
    want = Completion(**head, choices=[CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)])
    assert ChunkFrame(Completion, head).text(index, text, lp, finish) == f"data: {want.model_dump_json()}\n\n"


@settings(max_examples=300, deadline=None)
@given(head=HEADS, index=st.integers(0, 99), text=TEXTS, finish=FINISH, with_lp=st.booleans())
def test_chat_chunk_equals_the_models_dump(head, index, text, finish, with_lp):
    head = head | {"object": "chat.completion.chunk"}
    lp = _chat_logprobs(text) if with_lp else None
    delta = Delta(content=text) if text else Delta()
    assert content_delta(text) == delta.model_dump_json()
    want = ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=index, delta=delta, logprobs=lp,
                                                                finish_reason=finish)])
    got = ChunkFrame(ChatCompletionChunk, head).delta(index, content_delta(text), lp, finish)
    assert got == f"data: {want.model_dump_json()}\n\n"
