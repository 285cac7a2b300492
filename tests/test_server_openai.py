"""The OpenAI-compatible routes through the official `openai` client against a real server on loopback:
outputs equal the plain generation path; wire formats, usage, stop strings, n, seeds, logprobs, tools, errors.
"""
from __future__ import annotations

import json

import openai
import pytest
import requests
import torch
from server_utils import live_server

import qwen_awq
from qwen_awq.chat import DEFAULT_SYSTEM
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.generation import TextStream
from qwen_awq.models.loader import load_model
from qwen_awq.server.tools import Tool, ToolCall, Turn, fold, parse_reply
from qwen_awq.tokenizer import load_tokenizer

MODEL = "tiny-qwen"
CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
GREEDY = {"ignore_eos": True, "repetition_penalty": 1.0, "top_p": 1.0}  # vLLM extras, sent in the body


@pytest.fixture(scope="module")
def tiny(qwen_dir):
    return load_model(qwen_dir, dtype="float32", device="cpu"), load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def srv(tiny):
    with live_server(*tiny, name=MODEL, kv_cache_memory=2**22, max_model_len=256) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chatml_ids(tok, user: str, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Qwen's ChatML prompt, built as one string: an independent check of the server's piecewise encoding."""
    return tok.encode(CHATML.format(system=system, user=user), allowed_special="all")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_equals_generation_path_with_the_models_defaults(tiny, client):
    model, tok = tiny
    r = client.chat.completions.create(model=MODEL, messages=user("Tell me a story"), max_tokens=8, seed=7,
                                       extra_body={"ignore_eos": True})
    ids = chatml_ids(tok, "Tell me a story")
    # Qwen-7B-Chat's generation_config.json (sampling, top_p 0.8, repetition_penalty 1.1) fills omitted
    # fields.
    ref = TextStream(model, tok, ids, SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.1,
                                                     seed=7, max_tokens=8, ignore_eos=True)).run()
    plain = TextStream(model, tok, ids, SamplingParams(temperature=1.0, seed=7, max_tokens=8,
                                                       ignore_eos=True)).run()
    assert ref.text != plain.text, "the prompt must make the defaults matter"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and r.model == MODEL
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 8, len(ids) + 8)


def test_chat_stream_pieces_join_to_the_reply_and_end_with_usage(srv, client):
    kw = dict(model=MODEL, messages=user("Hello there"), temperature=0, max_tokens=10, extra_body=GREEDY)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == full.choices[0].message.content
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    raw = requests.post(srv.url + "/v1/chat/completions", json=kw["extra_body"] | {
        "messages": kw["messages"], "temperature": 0, "max_tokens": 3, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][len("data: "):])["object"] == "chat.completion.chunk"


def test_completion_stop_string_is_trimmed_in_both_modes(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=16, extra_body=GREEDY)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"pick another prompt: no usable stop string in {full!r}"
    expected = full[:full.index(stop)]
    r = client.completions.create(**kw, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_completion_defaults_to_16_tokens_and_echoes(tiny, client):
    model, tok = tiny
    r = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, echo=True,
                                  extra_body=GREEDY)
    ids = tok.encode("Once upon")
    ref = TextStream(model, tok, ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)).run()
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text == "Once upon" + ref.text


def test_token_id_prompts_batch_into_indexed_choices(tiny, client):
    model, tok = tiny
    prompts = [[1000, 2000, 3000], [4000, 5000]]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, temperature=0, max_tokens=4,
                                  extra_body=GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, ids in enumerate(prompts):
        ref = TextStream(model, tok, ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)).run()
        ref = ref.text
        assert [r.choices[2 * i + j].text for j in range(2)] == [ref, ref]  # greedy: both samples agree
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 16


def test_n2_and_a_seeded_request_reproduced_exactly(tiny, client):
    model, tok = tiny
    kw = dict(model=MODEL, messages=user("Pick a word"), temperature=1.0, top_p=1.0, max_tokens=6, n=2,
              seed=1234, extra_body={"ignore_eos": True, "repetition_penalty": 1.0})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1] and texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1] and a.usage.completion_tokens == 12
    # One sample with seed s equals the generation path seeded with s.
    one = client.chat.completions.create(**(kw | {"n": 1}))
    ref = TextStream(model, tok, chatml_ids(tok, "Pick a word"),
                     SamplingParams(temperature=1.0, seed=1234, max_tokens=6, ignore_eos=True)).run()
    assert one.choices[0].message.content == ref.text == texts[0]
    other = client.chat.completions.create(**(kw | {"seed": 99}))
    assert [c.message.content for c in other.choices] != texts


def test_logprobs_match_a_plain_forward_pass(tiny, client):
    model, tok = tiny
    r = client.chat.completions.create(model=MODEL, messages=user("Hi"), temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=3, extra_body=GREEDY)
    ids = chatml_ids(tok, "Hi")
    with torch.inference_mode():
        for item in r.choices[0].logprobs.content:
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1, :tok.vocab_size], -1)  # (V,)
            top = torch.topk(logp, 3)
            ids.append(int(top.indices[0]))  # greedy
            assert item.token == tok.decode([ids[-1]])
            assert item.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
            assert [t.token for t in item.top_logprobs] == [tok.decode([int(i)]) for i in top.indices]
            assert [t.logprob for t in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


# --- tools -------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "properties": {"city": {}}}}}
REACT = ("Answer the following questions as best you can. You have access to the following APIs:\n\n"
         "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API "
         'useful for? Weather of a city. Parameters: {"type": "object", "properties": {"city": {}}}\n\n'
         "Use the following format:\n\nQuestion: the input question you must answer\nThought: you should "
         "always think about what to do\nAction: the action to take, should be one of [get_weather]\n"
         "Action Input: the input to the action\nObservation: the result of the action\n... (this Thought/"
         "Action/Action Input/Observation can be repeated zero or more times)\nThought: I now know the final "
         "answer\nFinal Answer: the final answer to the original input question\n\nBegin!")


def test_tool_reply_parsing():
    call = parse_reply('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n')
    assert call.content == "I need the weather."
    assert call.calls == [ToolCall("get_weather", '{"city": "Paris"}')]
    assert parse_reply("Thought: done.\nFinal Answer: 21 degrees").content == "21 degrees"
    assert parse_reply("plain text").calls == []


def test_tool_results_fold_into_a_continued_assistant_turn():
    tools = [Tool("get_weather", "Weather of a city.", {"type": "object", "properties": {"city": {}}})]
    turns = [Turn("user", "Weather in Paris?"),
             Turn("assistant", "", [ToolCall("get_weather", '{"city": 1}')]), Turn("tool", "sunny")]
    messages, continuation = fold(turns, tools)
    assert messages == [{"role": "user", "content": REACT + "\n\nQuestion: Weather in Paris?"}]
    assert continuation == ("Thought: I should use the get_weather API.\nAction: get_weather\n"
                            'Action Input: {"city": 1}\nObservation: sunny\nThought:')


def test_tools_put_the_react_prompt_on_the_wire(tiny, client):
    _, tok = tiny
    r = client.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), tools=[WEATHER],
                                       temperature=0, max_tokens=4, extra_body=GREEDY)
    assert r.usage.prompt_tokens == len(chatml_ids(tok, REACT + "\n\nQuestion: Weather in Paris?"))
    messages = user("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0,
                                       max_tokens=4, extra_body=GREEDY)
    continued = chatml_ids(tok, REACT + "\n\nQuestion: Weather in Paris?") + tok.encode(
        "Thought: I should use the get_weather API.\nAction: get_weather\nAction Input: "
        '{"city": 1}\nObservation: sunny\nThought:', allowed_special=set())
    assert r.usage.prompt_tokens == len(continued)


# --- errors and auth ---------------------------------------------------------------------------------------
def test_errors_raise_the_clients_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.chat.completions.create(model=MODEL, messages=user("x"), temperature=-1)
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 256 tokens.*requested 1020"):
        client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=1000)
    with pytest.raises(openai.NotFoundError, match="`nope` does not exist"):
        client.chat.completions.create(model="nope", messages=user("x"))
    assert [m.id for m in client.models.list()] == [MODEL]


def test_api_key_guards_every_route_but_health(tiny):
    with live_server(*tiny, api_key="sekrit", kv_cache_memory=2**20, max_model_len=64) as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in good.models.list()] == [MODEL]
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        guarded = [("GET", "/metrics"), ("GET", "/version"), ("POST", "/generate"), ("GET", "/info")]
        for method, path in guarded:
            assert requests.request(method, server.url + path, timeout=10).status_code == 401


def test_smollm2_answers_paris():
    model, tok = qwen_awq.load(None)
    with live_server(model, tok, name="smollm2", kv_cache_memory=2**26, max_model_len=512) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2", messages=user("What is the capital of France?"),
                                      temperature=0, max_tokens=24)
        assert "Paris" in r.choices[0].message.content


def test_page_is_served_at_get_root_without_the_key(tiny, tmp_path, monkeypatch):
    import qwen_awq.server.app as server_app

    (tmp_path / "index.html").write_text("<!doctype html><title>chat</title>", encoding="utf-8")
    monkeypatch.setattr(server_app, "STATIC_DIR", tmp_path)
    with live_server(*tiny, api_key="sekrit", kv_cache_memory=2**20, max_model_len=64) as server:
        page = requests.get(server.url + "/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == "<!doctype html><title>chat</title>"
        assert requests.post(server.url + "/", json={"inputs": "x"}, timeout=10).json() == {
            "error": "missing or wrong API key: send `Authorization: Bearer <key>` with the key given to "
                     "--api-key", "error_type": "authentication"}


def test_serve_flags_build_the_engine_config():
    import argparse

    from qwen_awq.server.serve import engine_config, register_serve, served_name, urls

    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "/m/Qwen-1.8B-Chat/", "--max-queue", "3",
                              "--kv-cache-memory", "64MiB", "--kv-cache-dtype", "int8", "--no-prefix-caching",
                              "--max-num-seqs", "8"])
    config = engine_config(args)
    assert (config.max_waiting, config.kv_cache_memory, config.kv_cache_dtype, config.max_num_seqs) == (
        3, 64 << 20, "int8", 8)
    assert not config.enable_prefix_caching and args.host == "127.0.0.1" and args.port == 8000
    assert served_name(args) == "Qwen-1.8B-Chat"
    assert urls("0.0.0.0", 8000) == ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1")
