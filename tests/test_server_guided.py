"""Structured output and tool calls over HTTP on the bundled model, with the real clients: the `openai` client's
response_format (json_schema / json_object), vLLM's guided_* extras, TGI's grammar through InferenceClient and raw
bodies, vLLM's legacy /generate; every output that finished with "stop" parses and validates with `jsonschema`;
invalid specs get each API's error body. Tool calls with tool_choice "required" / a named function always parse,
streamed as OpenAI tool-call deltas, and a reply after a tool result shows no ReAct scaffolding."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from server_utils import live_server

import qwen_awq

MODEL = "smollm2"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
                                            "parameters": WEATHER_ARGS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Local time of a city.",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
SCAFFOLDING = re.compile(r"Action:|Action Input:|Thought:|Observation:|Final Answer:")


@pytest.fixture(scope="module")
def srv(bundled_model):
    model, tok = qwen_awq.load(None)
    with live_server(model, tok, name=MODEL, kv_cache_memory=2**26, max_model_len=512) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def person_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def check_finished(texts_and_reasons, schema) -> int:
    finished = [t for t, why in texts_and_reasons if why == "stop"]
    for text in finished:
        jsonschema.validate(json.loads(text), schema)
    return len(finished)


def test_chat_json_schema_greedy_and_sampled_n2(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Describe a person."), max_tokens=40,
                                       temperature=0, response_format=person_format())
    assert check_finished([(c.message.content, c.finish_reason) for c in r.choices], PERSON) == 1
    r = client.chat.completions.create(model=MODEL, messages=user("Describe a person."), max_tokens=40, n=2,
                                       temperature=1.0, seed=3, response_format=person_format())
    assert check_finished([(c.message.content, c.finish_reason) for c in r.choices], PERSON) == 2


def test_chat_json_schema_stream_n2_pieces_join_to_valid_json(client):
    chunks = client.chat.completions.create(model=MODEL, messages=user("Describe a person."), max_tokens=40, n=2,
                                            temperature=0.9, seed=8, response_format=person_format(), stream=True)
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert check_finished(list(zip(texts, reasons, strict=True)), PERSON) == 2


def test_completions_json_object_stream_and_not_and_a_cut_by_length(client):
    kw = dict(model=MODEL, prompt="A JSON object describing a cat:", max_tokens=24, temperature=0,
              extra_body={"response_format": {"type": "json_object"}})  # the client has no such argument here
    r = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert text == r.choices[0].text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    cut = client.completions.create(**kw | {"max_tokens": 3})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].text.startswith("{")


def test_guided_regex_and_choice_extras(client):
    r = client.completions.create(model=MODEL, prompt="Today's date is", max_tokens=16, temperature=0.8, seed=1,
                                  extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=user("Is the sky blue?"), max_tokens=8, n=2,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert all(c.message.content in ("yes", "no") and c.finish_reason == "stop" for c in r.choices)


def test_invalid_specs_are_400s_with_the_validators_message(client, srv):
    bad = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError, match="Invalid type: strin") as e:
        client.chat.completions.create(model=MODEL, messages=user("x"), response_format=bad)
    assert e.value.body["param"] == "response_format.json_schema"
    r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "guided_regex": "[0-9"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "unclosed character class" in r.text
    r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]},
                      timeout=30)
    assert r.status_code == 400 and "at most one structured-output constraint" in r.json()["error"]["message"]
    r = requests.post(srv.url + "/generate", json={"prompt": "x", "guided_json": {"type": "strin"}}, timeout=30)
    assert r.status_code == 400 and "Invalid type: strin" in r.json()["error"]["message"]
    assert srv.wait_idle()


def test_tgi_grammar_through_inference_client_and_raw_bodies(srv):
    tgi = InferenceClient(srv.url)
    out = tgi.text_generation("A person as JSON:", max_new_tokens=40, grammar={"type": "json", "value": PERSON},
                              details=True)
    assert check_finished([(out.generated_text, {"eos_token": "stop"}.get(out.details.finish_reason))], PERSON) == 1
    pieces = list(tgi.text_generation("A person as JSON:", max_new_tokens=40, stream=True, do_sample=True, seed=4,
                                      grammar={"type": "json", "value": PERSON}))
    jsonschema.validate(json.loads("".join(pieces)), PERSON)
    r = requests.post(srv.url + "/generate", json={"inputs": "My phone number is", "parameters": {
        "max_new_tokens": 20, "grammar": {"type": "regex", "value": r"\+1 [0-9]{3}-[0-9]{4}"}}}, timeout=60)
    assert re.fullmatch(r"\+1 [0-9]{3}-[0-9]{4}", r.json()["generated_text"])
    r = requests.post(srv.url + "/generate", json={"inputs": "x", "parameters": {
        "grammar": {"type": "json", "value": {"type": "strin"}}}}, timeout=30)
    assert r.status_code == 422 and r.json() == {
        "error": "Input validation error: grammar is not valid: invalid json_schema: Invalid type: strin",
        "error_type": "validation"}
    with pytest.raises(ValidationError, match="grammar is not valid"):
        tgi.text_generation("x", grammar={"type": "regex", "value": "[0-9"})


def test_vllm_legacy_generate_with_guided_fields(srv):
    r = requests.post(srv.url + "/generate", json={"prompt": "Pick one:", "guided_choice": ["alpha", "beta"],
                                                   "max_tokens": 8, "n": 2, "temperature": 0.8}, timeout=60)
    assert [t.removeprefix("Pick one:") in ("alpha", "beta") for t in r.json()["text"]] == [True, True]


# --- tool calls ----------------------------------------------------------------------------------------------
def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_always_parse_and_follow_the_schema(client, choice):
    r = client.chat.completions.create(model=MODEL, messages=user("What's the weather like in Paris?"),
                                       n=2 if choice == "required" else 1,
                                       tools=[WEATHER, CLOCK] if choice == "required" else [CLOCK, WEATHER],
                                       tool_choice=choice, max_tokens=120, temperature=0.8, seed=2)
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c.message
        [(name, args)] = calls_of(c.message)
        assert name in ("get_weather", "get_time") if choice == "required" else name == "get_weather"
        jsonschema.validate(args, WEATHER_ARGS if name == "get_weather" else CLOCK["function"]["parameters"])
        assert not SCAFFOLDING.search(c.message.content or "")


def test_streamed_tool_call_arrives_as_openai_deltas(client):
    kw = dict(model=MODEL, messages=user("Weather in Rome, please."), tools=[WEATHER], tool_choice="required",
              max_tokens=120, temperature=0)
    raw = list(client.chat.completions.create(**kw, stream=True))
    deltas = [d for chunk in raw for c in chunk.choices for d in c.delta.tool_calls or []]
    first, *rest = deltas
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and rest and all(d.id is None and d.function.name is None
                                                                 for d in rest)
    assert raw[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(**kw) as stream:  # the client's own assembly of the deltas
        message = stream.get_final_completion().choices[0].message
    whole = client.chat.completions.create(**kw).choices[0].message
    assert calls_of(message) == calls_of(whole) and len(calls_of(whole)) == 1
    jsonschema.validate(calls_of(whole)[0][1], WEATHER_ARGS)


@pytest.mark.parametrize("stream", [False, True])
def test_reply_after_a_tool_result_has_no_react_scaffolding(client, stream):
    messages = user("What's the weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=60, temperature=0)
    if stream:
        with client.chat.completions.stream(**kw) as s:
            choice = s.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
    if choice.message.tool_calls:  # a further call is fine too: then it parses
        jsonschema.validate(calls_of(choice.message)[0][1], WEATHER_ARGS)
    else:
        assert choice.message.content and not SCAFFOLDING.search(choice.message.content)
        assert choice.finish_reason == "stop"
