"""The TGI and vLLM stream events written without pydantic models (issue 12) are byte-equal to the models' own
dumps for any text (control characters, quotes, surrogate-free Unicode, special-token text), any float
(-0.00001, 1e-7, infinities, NaN, an int 0) and every optional field given or not."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_awq.server.responses import (
    StreamDetails,
    StreamEvent,
    TextFrame,
    TGIToken,
    VLLMOutput,
    dumps,
    stream_event,
    tgi_token,
)

TEXTS = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\n", '"', "\\", "\x00\x1f\x7f", "\b\f\r\t", "\u2028\u2029", "你好", "😀", "</script>", "\ufffd",
     "<|im_end|>", "<|endoftext|>", "\\u0000"])
LOGPROBS = st.floats() | st.integers(-5, 0) | st.sampled_from([-1e-5, -1e-7, -1e-4, -0.0, -9999.0, -1e16, -1e22])
TOKENS = st.builds(lambda *f: f, st.integers(0, 2**31), TEXTS, LOGPROBS, st.booleans())  # (id, text, logprob, special)
DETAILS = st.none() | st.builds(StreamDetails, finish_reason=st.sampled_from(["length", "eos_token", "stop_sequence"]),
                                generated_tokens=st.integers(1, 10**6), seed=st.none() | st.integers(0, 2**63 - 1),
                                input_length=st.integers(1, 10**6))


def _model(fields: tuple) -> TGIToken:
    token_id, text, logprob, special = fields
    return TGIToken(id=token_id, text=text, logprob=logprob, special=special)


@settings(max_examples=400, deadline=None)
@given(token=TOKENS)
def test_token_equals_the_models_dump(token):
    assert dumps(tgi_token(*token)) == _model(token).model_dump_json()


@settings(max_examples=400, deadline=None)
@given(index=st.integers(1, 10**6), token=TOKENS, top=st.none() | st.lists(TOKENS, max_size=3),
       generated_text=st.none() | TEXTS, details=DETAILS)
def test_stream_event_equals_the_models_dump(index, token, top, generated_text, details):
    fields = {"top_tokens": [_model(t) for t in top]} if top is not None else {}
    want = StreamEvent(index=index, token=_model(token), generated_text=generated_text, details=details, **fields)
    got = stream_event(index, tgi_token(*token), None if top is None else [tgi_token(*t) for t in top],
                       generated_text, details)
    assert got == f"data:{want.model_dump_json()}\n\n"


@settings(max_examples=300, deadline=None)
@given(prompt=TEXTS, outputs=st.lists(TEXTS, min_size=1, max_size=4))
def test_vllm_chunk_equals_the_models_dump(prompt, outputs):
    frame = TextFrame(prompt)
    want = VLLMOutput(text=[prompt + text for text in outputs]).model_dump_json()
    assert frame.chunk(outputs) == want
    assert frame.chunk(outputs[::-1]) == VLLMOutput(text=[prompt + text for text in outputs[::-1]]).model_dump_json()
